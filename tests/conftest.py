"""Shared fixtures: the real data folder, the small pipeline built once, tiny models in process.

Plain helpers (paths, configs, the CLI runner) are in helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import SHARED_DATA, run_cli, run_ok, small_pipeline_configs


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_pipeline(tmp_path_factory) -> dict[str, Path]:
    """An SFT model and its gold-scored pairs, built once per test session through the CLI."""
    root = tmp_path_factory.mktemp("pipeline")
    configs = small_pipeline_configs(root)
    for command in (["sft"], ["data", "pairs"]):
        result = run_cli(*command, str(configs[command[-1]]))
        assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, **configs}


@pytest.fixture(scope="session")
def small_dpo_run(small_pipeline) -> Path:
    """A DPO run on the small pipeline's pairs (which also fills its reference log-prob cache)."""
    run_ok("dpo", str(small_pipeline["dpo"]))
    return small_pipeline["root"] / "dpo"


@pytest.fixture(scope="session")
def small_reward_model(small_pipeline) -> Path:
    """The reward model of the small pipeline (trained once per session)."""
    result = run_cli("reward", str(small_pipeline["reward"]))
    assert result.returncode == 0, result.stderr[-3000:]
    return small_pipeline["root"] / "reward"


# ------------------------------------------------------------------- tiny models, in process


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE trained on 300 built-in reviews (pad and EOS distinct, as for scratch models)."""
    from pipeline.data.builtin_sentiment import load_rows
    from pipeline.models import train_tokenizer

    return train_tokenizer([row["review"] for row in load_rows("train", 300)], vocab_size=400)


@pytest.fixture
def tiny_folders(tmp_path, tiny_tokenizer):
    """Writes tiny save_pretrained folders: `make("policy")` a causal LM, `make("rm", reward=True)` a reward model."""
    from transformers import GPT2ForSequenceClassification

    from pipeline.config import ArchitectureConfig
    from pipeline.models import create_scratch_model

    def make(name: str, reward: bool = False, tokenizer=None, seed: int = 0, **arch) -> Path:
        tokenizer = tokenizer or tiny_tokenizer
        shape = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 96, **arch}
        model = create_scratch_model(ArchitectureConfig(**shape), tokenizer, seed)
        folder = tmp_path / name
        if reward:
            model.config.num_labels = 1
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                head = GPT2ForSequenceClassification(model.config)
            head.transformer.load_state_dict(model.transformer.state_dict())
            head.config.reward_mean, head.config.reward_std = 0.0, 1.0
            model = head
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return make
