"""Intervals over seeds and prompts, frontier envelopes and the verdict between two frontiers, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluation import bootstrap_mean
from pipeline.uncertainty import (
    NO_DIFFERENCE,
    FrontierRun,
    Resampling,
    envelope,
    frontier_difference,
    per_prompt,
    verdict_ranges,
)


def test_per_prompt_averages_each_prompts_samples():
    assert per_prompt([1.0, 3.0, 0.0, 1.0], 2) == [2.0, 0.5]
    assert per_prompt([1.0, 2.0], 1) == [1.0, 2.0]
    with pytest.raises(ValueError, match="not 2 samples"):
        per_prompt([1.0, 2.0, 3.0], 2)


def test_seeds_that_disagree_widen_the_interval_to_what_three_draws_of_two_seeds_give():
    # Two seeds, every prompt 0 under one and 1 under the other: prompts add nothing, and a resample
    # draws the seeds (0,0), (0,1), (1,0), (1,1) with probability 1/4 each: means 0, 0.5, 0.5, 1.
    resampling = Resampling(n_prompts=50, n_resamples=2000, seed=0)
    interval = resampling.interval([[0.0] * 50, [1.0] * 50], "run")
    assert interval["mean"] == 0.5 and interval["per_seed"] == [0.0, 1.0]
    assert interval["low"] == 0.0 and interval["high"] == 1.0
    replicates = resampling.replicates([[0.0] * 50, [1.0] * 50], "run")
    shares = {value: float((replicates == value).double().mean()) for value in (0.0, 0.5, 1.0)}
    assert shares[0.5] == pytest.approx(0.5, abs=0.05) and shares[0.0] == pytest.approx(0.25, abs=0.05)


def test_one_seed_is_the_prompt_bootstrap():
    values = [float(i % 7) for i in range(40)]
    interval = Resampling(n_prompts=40, n_resamples=2000, seed=3).interval([values], "run")
    mean, low, high = bootstrap_mean(values, 2000, seed=3)
    assert interval["mean"] == pytest.approx(mean)
    assert interval["low"] == pytest.approx(low, abs=0.2) and interval["high"] == pytest.approx(high, abs=0.2)
    # Constant values have nothing to resample.
    flat = Resampling(n_prompts=10, n_resamples=100).interval([[2.0] * 10, [2.0] * 10], "x")
    assert (flat["low"], flat["mean"], flat["high"]) == (2.0, 2.0, 2.0)


def test_prompt_draws_are_shared_and_seed_draws_belong_to_a_run():
    resampling = Resampling(n_prompts=20, n_resamples=50, seed=1)
    assert torch.equal(resampling.seed_draws(3, "dpo"), resampling.seed_draws(3, "dpo"))
    assert not torch.equal(resampling.seed_draws(3, "dpo"), resampling.seed_draws(3, "ppo"))
    # Two methods that differ by a constant on every prompt differ by exactly it in every resample
    # where their seed draws agree: the prompt draw pairs them.
    a = torch.rand(1, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(
        resampling.replicates(a + 0.3, "x") - resampling.replicates(a, "y"), torch.tensor(0.3, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match=r"\(S, 20\)"):
        resampling.interval([[1.0] * 19], "x")


def test_envelope_runs_through_the_pareto_points_and_stays_at_the_best():
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    gold = torch.tensor([0.1, 0.5, 0.3, 0.6, 0.2])  # (3, 0.3) and (5, 0.2) are beaten at lower KL
    grid = torch.tensor([0.5, 1.0, 1.5, 3.0, 4.0, 4.5, 5.0, 5.5])
    out = envelope(kl, gold, grid)
    expected = [math.nan, 0.1, 0.3, 0.55, 0.6, 0.6, 0.6, math.nan]
    for got, want in zip(out.tolist(), expected):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    # Unsorted input gives the same envelope.
    order = torch.tensor([3, 0, 4, 2, 1])
    assert torch.allclose(envelope(kl[order], gold[order], grid[1:-1]), out[1:-1])


def _run(key: str, method: str, points: list[tuple[float, float]], noise: float, seeds: int = 3, prompts: int = 60):
    generator = torch.Generator().manual_seed(len(key) * 17 + int(points[0][0] * 10))
    run = FrontierRun(key=key, method=method, kl=[], gold=[])
    for kl, gold in points:
        run.kl.append(kl + noise * torch.randn(seeds, prompts, generator=generator, dtype=torch.float64))
        run.gold.append(gold + noise * torch.randn(seeds, prompts, generator=generator, dtype=torch.float64))
    return run


def test_frontier_verdict_finds_a_clear_gap_and_no_gap_where_there_is_none():
    resampling = Resampling(n_prompts=60, n_resamples=300, seed=0)
    low = [_run("b1", "b", [(1.0, 0.1), (4.0, 0.4)], noise=0.05), _run("b2", "b", [(2.0, 0.2), (8.0, 0.6)], noise=0.05)]
    high = [_run("a1", "a", [(1.0, 0.6), (5.0, 0.9), (9.0, 1.1)], noise=0.05)]
    result = frontier_difference(high, low, resampling, grid_size=9)
    assert [r["verdict"] for r in result["ranges"]] == ["above"]
    assert result["ranges"][0]["from"] == pytest.approx(1.0, abs=0.05)
    assert result["ranges"][0]["to"] == pytest.approx(8.0, abs=0.05)  # the common KL range
    for row in result["grid"]:
        assert row["low"] <= row["mean"] <= row["high"] and row["low"] > 0

    reversed_ = frontier_difference(low, high, resampling, grid_size=9)
    assert [r["verdict"] for r in reversed_["ranges"]] == ["below"]

    same = [_run("c1", "c", [(1.0, 0.1), (4.0, 0.4)], noise=0.5)]
    twin = [_run("d1", "d", [(1.0, 0.1), (4.0, 0.4)], noise=0.5)]
    assert {r["verdict"] for r in frontier_difference(same, twin, resampling, grid_size=9)["ranges"]} == {NO_DIFFERENCE}

    apart = [_run("e1", "e", [(20.0, 0.1), (30.0, 0.4)], noise=0.05)]
    assert frontier_difference(low, apart, resampling) is None


def test_verdict_ranges_merge_neighbours():
    rows = [
        {"kl": 1.0, "verdict": NO_DIFFERENCE},
        {"kl": 2.0, "verdict": NO_DIFFERENCE},
        {"kl": 3.0, "verdict": "above"},
        {"kl": 4.0, "verdict": "above"},
    ]
    assert verdict_ranges(rows) == [
        {"from": 1.0, "to": 2.0, "verdict": NO_DIFFERENCE},
        {"from": 3.0, "to": 4.0, "verdict": "above"},
    ]
