"""The learning-rate schedule's shape and the batch plan."""

from __future__ import annotations

import math

import pytest

from pipeline.config import OptimConfig, TrainConfig
from pipeline.launch import Dist
from pipeline.training import BatchPlan, lr_at, warmup_steps


def test_cosine_schedule_warms_up_then_decays_to_ten_percent():
    optim = OptimConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    total = 102
    lrs = [lr_at(s, total, optim) for s in range(total)]
    warmup = warmup_steps(optim, total)
    assert warmup == 11
    assert lrs[0] == pytest.approx(1 / 11)
    assert lrs[warmup - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # rising
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # falling
    assert lrs[-1] == pytest.approx(0.1)
    mid = warmup + (total - warmup - 1) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # 0.55


def test_min_warmup_steps_and_other_schedules():
    optim = OptimConfig(lr=2.0, warmup_ratio=0.0, min_warmup_steps=5, schedule="linear", min_lr_ratio=0.0)
    assert warmup_steps(optim, 10) == 5
    assert lr_at(4, 10, optim) == pytest.approx(2.0)
    assert lr_at(9, 10, optim) == pytest.approx(0.0)
    constant = OptimConfig(lr=2.0, warmup_ratio=0.0, schedule="constant")
    assert {lr_at(s, 10, constant) for s in range(10)} == {2.0}


def dist(rank: int, world: int) -> Dist:
    import torch

    return Dist(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def test_batch_plan_is_the_same_global_batch_for_one_or_two_processes():
    train = TrainConfig(batch_size=8, micro_batch_size=2, seed=3, epochs=2)
    one = BatchPlan.build(50, train, 1)
    two = BatchPlan.build(50, train, 2)
    assert one.total_steps == two.total_steps == 12  # 6 full batches per epoch, 2 epochs
    assert (one.accumulation, two.accumulation) == (4, 2)
    for step in range(one.total_steps):
        single = [i for mb in one.micro_batches(step, dist(0, 1)) for i in mb]
        pair = [i for r in range(2) for mb in two.micro_batches(step, dist(r, 2)) for i in mb]
        assert single == pair and len(set(single)) == 8
    epoch0 = {i for s in range(6) for mb in one.micro_batches(s, dist(0, 1)) for i in mb}
    assert len(epoch0) == 48  # no example twice within an epoch


def test_batch_plan_rejects_too_little_data():
    with pytest.raises(ValueError, match="no full batch"):
        BatchPlan.build(3, TrainConfig(batch_size=8), 1)
