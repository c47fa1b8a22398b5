"""The README's commands, run as a newcomer runs them: a fresh shell, a clean PATH, the first line on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# Small overrides so the path runs in about a minute; the commands themselves are the README's.
FASTER = {
    "make sft": ' ARGS="--set train.max_steps=3 --set data.train.0.max_rows=2000 --set data.max_eval_examples=16'
    ' --set sample.num_prompts=1"',
    "rlhfdpo data pairs configs/pairs.yaml": " --set num_train_prompts=48 --set num_eval_prompts=16"
    " --set data.train.0.max_rows=200 --set data.eval.0.max_rows=50",
    "rlhfdpo reward configs/reward.yaml": " --set train.max_steps=2 --set train.batch_size=16 --set train.micro_batch_size=16",
    "rlhfdpo dpo configs/dpo.yaml": " --set train.max_steps=2 --set train.batch_size=16 --set train.micro_batch_size=16"
    " --set sample.num_prompts=1",
}
LAST = "rlhfdpo dpo configs/dpo.yaml"


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, in order, up to and including LAST."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            command = line.split("#")[0].strip()
            if not command:
                continue
            commands.append(command)
            if command == LAST:
                return commands
    raise AssertionError(f"the README never reaches `{LAST}`")


def copy_of_the_project(target):
    """The project's files (tracked, or new and not ignored) with their times, and its .venv linked."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(ROOT / ".venv")


def test_the_readme_path_from_the_first_line_to_dpo(tmp_path):
    commands = readme_commands()
    assert commands[:2] == ["make sft", "make test"] and commands[2] == ". .venv/bin/activate"
    project = tmp_path / "project"
    copy_of_the_project(project)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    if subprocess.run(["make", "-q", "setup"], cwd=project, env=env).returncode != 0:
        pytest.skip("`make setup` is not up to date here (pyproject.toml changed since .venv was built)")
    script = "\n".join(c + FASTER.get(c, "") for c in commands if c != "make test")  # make test: what runs this
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (script, result.stdout[-2000:], result.stderr[-3000:])
    assert "next: . .venv/bin/activate" in result.stdout  # make sft says where to go from there
    assert (project / "runs" / "dpo" / "model" / "model.safetensors").is_file()
    assert (project / "runs" / "reward" / "model" / "config.json").is_file()
