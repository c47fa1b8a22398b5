"""Shared fixtures: paths, a tiny SFT config, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

TINY_ARCH = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 96, "vocab_size": 400}


def tiny_sft_config(output_dir: Path, **train) -> dict:
    """SFT on a few hundred built-in reviews with a 2-layer, 32-wide GPT-2: seconds on a CPU."""
    return {
        "output_dir": str(output_dir),
        "model": {"name_or_path": "scratch", "architecture": dict(TINY_ARCH)},
        "data": {
            "train": [{"path": "builtin:sentiment", "format": "reviews", "split": "train", "max_rows": 400}],
            "eval": [{"path": "builtin:sentiment", "format": "reviews", "split": "test", "max_rows": 40}],
            "max_length": 96,
            "max_prompt_length": 16,
        },
        "optim": {"lr": 1e-2, "min_warmup_steps": 2},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 6, "log_every": 1,
                  "eval_every": 3, "save_every": 3, **train},
        "sample": {"num_prompts": 2, "max_new_tokens": 8},
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    return SHARED_DATA
