"""The reference log-prob cache: reused when whole, computed again when it is not."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import read_metrics, run_ok
from pipeline.config import DataConfig, ModelConfig
from pipeline.data.records import PreferencePair
from pipeline.data.tokenize import tokenize_pair
from pipeline.launch import init_distributed
from pipeline.reference import reference_logps


def truncate(path):
    path.write_bytes(path.read_bytes()[:40])


def randomize(path):
    path.write_bytes(os.urandom(path.stat().st_size))


def wrong_size(path):
    torch.save({"chosen": torch.zeros(3), "rejected": torch.zeros(3)}, path)


def non_finite(path):
    cached = torch.load(path)
    cached["chosen"][1] = float("nan")
    torch.save(cached, path)


@pytest.mark.parametrize("damage", [truncate, randomize, wrong_size, non_finite])
def test_a_damaged_cache_is_computed_again_and_said_so(tmp_path, tiny_folders, tiny_tokenizer, damage, capsys):
    model = ModelConfig(name_or_path=str(tiny_folders("policy")))
    data = DataConfig(max_length=32, max_prompt_length=8)
    pairs = [
        tokenize_pair(tiny_tokenizer, PreferencePair("the film", f" is good {i}.", " is bad.", str(i)), data)
        for i in range(6)
    ]
    cache = tmp_path / "cache"
    args = (model, pairs, str(cache), 4, tiny_tokenizer.pad_token_id, init_distributed())
    chosen, rejected, hit = reference_logps(*args)
    assert not hit and chosen.shape == (6,)
    assert reference_logps(*args)[2]  # whole: reused
    (path,) = cache.iterdir()
    damage(path)
    again_chosen, again_rejected, hit = reference_logps(*args)
    assert not hit
    assert torch.equal(again_chosen, chosen) and torch.equal(again_rejected, rejected)
    assert "computing it again" in " ".join(capsys.readouterr().err.split())
    assert reference_logps(*args)[2]  # the cache was written whole again


@pytest.mark.slow
def test_reference_cache_is_reused_and_invalidated(small_pipeline, small_dpo_run, tmp_path):
    root = small_pipeline["root"]
    cache = root / "cache"
    files = set(cache.iterdir())
    assert len(files) == 1
    quick = ["--set", "train.max_steps=1", "--set", f"output_dir={tmp_path / 'run'}", "--overwrite"]
    reference_passes = lambda: json.loads((tmp_path / "run" / "cost.json").read_text())["forward_passes"].get(
        "reference", 0
    )  # noqa: E731

    run_ok("dpo", str(small_pipeline["dpo"]), *quick, "--set", "loss.beta=0.5")  # a beta sweep point
    assert read_metrics(tmp_path / "run")[0]["reference_cache_hit"] is True
    assert set(cache.iterdir()) == files
    assert reference_passes() == 0  # the reference model never ran

    run_ok("dpo", str(small_pipeline["dpo"]), *quick, "--set", "data.train.0.max_rows=2000")  # other data
    assert read_metrics(tmp_path / "run")[0]["reference_cache_hit"] is False
    assert len(set(cache.iterdir())) == 2
    # One reference forward per batch of 32 pairs (train and eval together), no more.
    n_pairs = 2000 + sum(1 for _ in (root / "pairs" / "test.jsonl").open())
    assert 0 < reference_passes() <= -(-n_pairs // 32)

    changed = tmp_path / "reference"
    shutil.copytree(root / "sft" / "model", changed)
    weights = load_file(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    run_ok("dpo", str(small_pipeline["dpo"]), *quick, "--set", f"model.name_or_path={changed}")  # other reference
    assert read_metrics(tmp_path / "run")[0]["reference_cache_hit"] is False
    assert len(set(cache.iterdir())) == 3
