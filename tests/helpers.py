"""Plain helpers the tests share: paths, small configs, hand-worked tensors, and the command line.

(Fixtures live in conftest.py; this is an ordinary module, imported as `from helpers import ...`.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

TOL = 1e-6  # numbers worked by hand, to six decimals


class StubTokenizer:
    """The few tokenizer fields a scratch model reads: a 64-token vocabulary, pad 0, BOS and EOS 1."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 1

    def __len__(self):
        return 64


def t(*rows, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def m(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def assert_close(actual, expected, tol: float = TOL) -> None:
    got = actual.detach().tolist() if isinstance(actual, torch.Tensor) else actual
    exp = expected

    def flat(x):
        return [v for row in x for v in flat(row)] if isinstance(x, list) else [x]

    got_f, exp_f = flat(got), flat(exp)
    assert len(got_f) == len(exp_f), (got, exp)
    for g, e in zip(got_f, exp_f):
        assert abs(g - e) < tol, (got, exp)


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
        "train": {
            "batch_size": 8,
            "micro_batch_size": 4,
            "max_steps": 6,
            "log_every": 1,
            "eval_every": 3,
            "save_every": 3,
            **train,
        },
        "sample": {"num_prompts": 2, "max_new_tokens": 8},
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


CLI_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def run_cli(*args: str, timeout: int = 900, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`rlhfdpo ARGS` with its exit status, stdout and stderr.

    It runs in this process through typer's CliRunner: a fresh `python -m pipeline.cli` spends
    about 7 s importing torch and transformers, which was most of the suite's time. What the
    command starts (accelerate's processes, an experiment's steps) still runs in processes of its
    own. RLHFDPO_TEST_SUBPROCESS=1 runs every command in a fresh process instead (and honours
    `timeout`); tests that must see the real process exit use subprocess themselves.
    """
    if os.environ.get("RLHFDPO_TEST_SUBPROCESS") == "1":
        env = {**os.environ, **CLI_ENV}
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout,
        )
    from typer.testing import CliRunner

    from pipeline.cli import app

    os.environ.update(CLI_ENV)
    previous_dir, previous_argv = Path.cwd(), sys.argv
    os.chdir(cwd)
    sys.argv = ["rlhfdpo", *args]  # what a run card and a report name as the command
    try:
        result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    finally:
        os.chdir(previous_dir)
        sys.argv = previous_argv
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["rlhfdpo", *args], result.exit_code, result.stdout, stderr)


def sets(*overrides: str) -> list[str]:
    """`--set` arguments for the command line: sets("a=1", "b=2") -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for override in overrides for arg in ("--set", override)]


def run_ok(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """run_cli that must succeed; the failure shows the end of stderr."""
    result = run_cli(*args, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------- a small but real pipeline


def small_pipeline_configs(root: Path) -> dict[str, Path]:
    """SFT, pairs, reward and DPO configs for a 2-layer GPT-2 on the built-in task.

    Small enough for the test suite (about a minute of SFT and sampling), large enough that the
    SFT model writes recognisable reviews and the later stages have something real to learn.
    """
    data_pairs = {
        "train": [{"path": str(root / "pairs" / "train.jsonl"), "format": "prompt_chosen_rejected"}],
        "eval": [{"path": str(root / "pairs" / "test.jsonl"), "format": "prompt_chosen_rejected"}],
        "max_length": 64,
        "max_prompt_length": 16,
    }
    sft_model = str(root / "sft" / "model")
    configs = {
        "sft": {
            "output_dir": str(root / "sft"),
            "model": {
                "name_or_path": "scratch",
                "architecture": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 96, "vocab_size": 512},
            },
            "data": {
                "train": [{"path": "builtin:sentiment", "format": "reviews", "split": "train", "max_rows": 9600}],
                "eval": [{"path": "builtin:sentiment", "format": "reviews", "split": "test", "max_rows": 64}],
                "max_length": 96,
                "max_prompt_length": 16,
            },
            "optim": {"lr": 5e-3, "min_warmup_steps": 10},
            "train": {"batch_size": 32, "micro_batch_size": 32, "eval_every": 0, "save_every": 0, "log_every": 25},
            "sample": {"num_prompts": 2, "max_new_tokens": 16},
        },
        "pairs": {
            "output_dir": str(root / "pairs"),
            "model": {"name_or_path": sft_model},
            "data": {
                "train": [{"path": "builtin:sentiment", "format": "reviews", "split": "train", "max_rows": 1500}],
                "eval": [{"path": "builtin:sentiment", "format": "reviews", "split": "test", "max_rows": 200}],
                "max_length": 96,
                "max_prompt_length": 16,
            },
            "num_train_prompts": 1200,
            "num_eval_prompts": 150,
            "pairing": {"samples_per_prompt": 4},
            "sample": {"max_new_tokens": 40},
            "batch_size": 128,
        },
        "reward": {
            "output_dir": str(root / "reward"),
            "model": {"name_or_path": sft_model},
            "data": data_pairs,
            "optim": {"lr": 1e-3, "min_warmup_steps": 5},
            "train": {"batch_size": 32, "micro_batch_size": 32, "eval_every": 0, "save_every": 0},
        },
        "dpo": {
            "output_dir": str(root / "dpo"),
            "model": {"name_or_path": sft_model},
            "data": data_pairs,
            "loss": {"beta": 0.1},
            "optim": {"lr": 5e-4, "min_warmup_steps": 5},
            "reference": {"cache_dir": str(root / "cache")},
            "train": {"batch_size": 32, "micro_batch_size": 32, "eval_every": 0, "save_every": 0, "log_every": 1},
            "sample": {"num_prompts": 2, "max_new_tokens": 16},
        },
        "ppo": {
            "output_dir": str(root / "ppo"),
            "model": {"name_or_path": sft_model},
            "reward": {"kind": "model", "models": [str(root / "reward" / "model")]},
            "data": {
                "train": [{"path": "builtin:sentiment", "format": "reviews", "split": "train", "max_rows": 3000}],
                "max_length": 96,
                "max_prompt_length": 16,
            },
            "rollout": {"max_new_tokens": 32},
            "ppo": {"rollout_batch_size": 64, "mini_batch_size": 16, "micro_batch_size": 16, "epochs": 4},
            "kl": {"coef": 0.05},
            "optim": {"lr": 1e-4, "schedule": "constant", "warmup_ratio": 0.0},
            "train": {"max_steps": 12, "log_every": 1, "save_every": 0},
            "sample_table_every": 0,
        },
    }
    return {name: write_yaml(root / f"{name}.yaml", config) for name, config in configs.items()}


def value_classifier(policy, seed: int | None = None):
    """A one-label sequence classifier of `policy`'s shape, freshly initialised (from `seed`, if given):
    a reward or value model for in-process PPO tests."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


def ppo_rollout(policy, reference, value, tokenizer, cfg, prompts, seed: int = 0, kl_coef: float = 0.05):
    """One PPO rollout in this process (pipeline.ppo.collect_rollout): (rollout, stats, sample table)."""
    from pipeline.launch import init_distributed
    from pipeline.ppo import Scorer, collect_rollout

    dist = init_distributed()
    scorer = Scorer(cfg, tokenizer, dist)
    generator = torch.Generator().manual_seed(seed)
    return collect_rollout(policy, reference, value, scorer, tokenizer, prompts, cfg, kl_coef, dist, generator)
