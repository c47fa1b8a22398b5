"""The reference log-prob cache: reused when whole, computed again when it is not."""

from __future__ import annotations

import os

import pytest
import torch

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
    pairs = [tokenize_pair(tiny_tokenizer, PreferencePair("the film", f" is good {i}.", " is bad.", str(i)), data)
             for i in range(6)]
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
