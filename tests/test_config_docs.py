"""`rlhfdpo config show` and `config new`: every key with its comment, and configs that load and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, sets, write_yaml
from pipeline.config import STAGES, config_from_dict, load_config, to_dict
from pipeline.config.docs import commented_yaml

ROOT = Path(__file__).resolve().parents[1]


def fake_models(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder and a reward-model folder that pass the config's checks (nothing loads them)."""
    model, reward = tmp_path / "model", tmp_path / "reward"
    model.mkdir()
    (model / "config.json").write_text("{}")
    reward.mkdir()
    (reward / "config.json").write_text(
        json.dumps({"architectures": ["GPT2ForSequenceClassification"], "id2label": {"0": "LABEL_0"}})
    )
    return model, reward


def test_the_defaults_of_every_stage_round_trip_through_the_commented_yaml():
    for name, cls in STAGES.items():
        default = config_from_dict(cls, {}, check=False)
        text = commented_yaml(default)
        assert to_dict(config_from_dict(cls, yaml.safe_load(text), check=False)) == to_dict(default), name


@pytest.mark.parametrize("stage", ["sft", "pairs", "reward", "dpo", "ppo", "compare", "experiment"])
def test_config_show_of_a_shipped_config_loads_back_unchanged(stage, tmp_path):
    model, reward = fake_models(tmp_path)
    overrides = {
        "sft": [],
        "experiment": [],
        "pairs": [f"model.name_or_path={model}"],
        "reward": [f"model.name_or_path={model}"],
        "dpo": [f"model.name_or_path={model}"],
        "ppo": [f"model.name_or_path={model}", f"reward.models.0={reward}"],
        "compare": [
            f"sft={model.parent}",
            "policies=[]",
            "reward=null",
            "best_of_n=[]",
        ],  # sft names the run: <sft>/model
    }[stage]
    config = ROOT / "configs" / f"{stage}.yaml"
    args = [a for o in overrides for a in ("--set", o)]
    result = run_cli("config", "show", stage, str(config), *args)
    assert result.returncode == 0, result.stderr
    shown = write_yaml(tmp_path / "shown.yaml", {})
    shown.write_text(result.stdout)
    assert to_dict(load_config(STAGES[stage], shown)) == to_dict(load_config(STAGES[stage], config, overrides))


def test_config_show_carries_the_schema_comments():
    result = run_cli("config", "show", "sft")
    assert result.returncode == 0, result.stderr
    assert "n_positions: 256  # longest sequence the model can see, prompt and response together" in result.stdout
    assert "lr: 2.0e-05" in result.stdout and "betas: [0.9, 0.95]" in result.stdout
    result = run_cli("config", "show", "sfx")
    assert result.returncode == 2 and "no stage 'sfx'" in result.stderr


def test_every_shipped_config_starts_with_the_command_that_runs_it():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path.parent.name == "accelerate":
            continue  # accelerate's own configs, named by launch.accelerate_config
        first = path.read_text().splitlines()[0]
        relative = str(path.relative_to(ROOT))
        assert first.startswith("# rlhfdpo ") and relative in first, (relative, first)
        stage = first.split()[2] if first.split()[2] != "data" else first.split()[3]
        assert stage in STAGES, (relative, first)


def test_version_and_completion():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == "rlhfdpo 0.1.0"
    assert "--install-completion" in run_cli("--help").stdout


def test_config_new_names_a_file_it_cannot_read_the_format_of(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    result = run_cli("config", "new", "sft", "--model", "scratch", "--data", str(data), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data}: columns question, answer match no format; pass --format (text, prompt_completion, reviews, messages, "
        "hh_rlhf, prompt_chosen_rejected, conversational, ultrafeedback, shp) and map columns with data.train.0.columns"
    ]
    assert not (tmp_path / "sft.yaml").exists()


@pytest.mark.slow
def test_config_new_on_the_shared_imdb_and_hh_files_writes_configs_that_run(shared_data, tmp_path, tiny_folders):
    imdb = shared_data / "imdb" / "imdb-reviews-sample.csv.gz"
    result = run_cli("config", "new", "sft", "--model", "scratch", "--data", str(imdb), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    written = (tmp_path / "sft.yaml").read_text()
    assert written.startswith("# rlhfdpo sft sft.yaml\n") and "format: reviews" in written
    small = [
        *sets(
            "train.max_steps=2",
            "data.train.0.max_rows=300",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "model.architecture.n_layer=1",
            "model.architecture.n_embd=32",
            "model.architecture.vocab_size=400",
            "data.max_eval_examples=8",
            "sample.num_prompts=1",
        ),
    ]
    result = run_cli("sft", "sft.yaml", *small, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]

    policy = tiny_folders("policy")
    hh = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    result = run_cli("config", "new", "dpo", "--model", str(policy), "--data", str(hh), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    written = (tmp_path / "dpo.yaml").read_text()
    assert "format: hh_rlhf" in written and "max_length: 96" in written  # fitted to the model's 96 positions
    assert "kept 2303, dropped 9" in " ".join(result.stderr.split())  # the data was read and counted on the spot
    result = run_cli(
        "dpo",
        "dpo.yaml",
        *sets(
            "train.max_steps=1",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "data.train.0.max_rows=200",
            "sample.num_prompts=1",
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
