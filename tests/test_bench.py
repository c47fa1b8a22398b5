"""The benchmark's arithmetic by hand, and one real timed run of our DPO stage through its worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import fixtures
from benchmarks.hardware import matmul_params, training_flops_per_token
from benchmarks.run import markdown
from benchmarks.stats import steady_throughput, summarize

ROOT = Path(__file__).resolve().parents[1]


def test_steady_throughput_skips_warmup_and_takes_the_median_window():
    # Steps end at t = 0, 10 (slow first interval), 11, 12, 14, 15, 16: durations 10, 1, 1, 2, 1, 1.
    times = [0.0, 10.0, 11.0, 12.0, 14.0, 15.0, 16.0]
    # warmup 1 drops the 10 s interval; windows of 2: (1+1), (2+1) -> 8 examples / 2 s, / 3 s; one
    # leftover interval is not a full window. Median of {4.0, 2.667} is their mean.
    assert steady_throughput(times, examples_per_step=4, warmup=1, window=2) == pytest.approx((4.0 + 8 / 3) / 2)
    with pytest.raises(ValueError, match="fewer than one window"):
        steady_throughput(times[:3], 4, warmup=1, window=2)


def test_flops_per_token_is_palm_formula():
    # 6N + 12 L d T with N = 1000, L = 2, d = 8, T = 10: 6000 + 1920.
    assert training_flops_per_token(1000, 2, 8, 10) == 7920


def test_summary_mfu_and_time_to_first_step():
    result = {
        "spec": {"framework": "ours", "stage": "sft", "size": "3M", "batch_size": 2},
        "process_start": 100.0,
        "step_times": [105.0, 106.0, 107.0, 108.0],
        "peak_rss_mb": 500.0,
    }
    row = summarize(result, peak_gflops=1.0, flops_per_token=1e6, tokens_per_example=50, warmup=0, window=1)
    assert row["examples_per_s"] == 2.0 and row["tokens_per_s"] == 100.0
    assert row["time_to_first_step_s"] == 5.0
    assert row["mfu"] == pytest.approx(100 * 1e6 / 1e9)  # 1e8 FLOP/s of a 1 GFLOP/s peak


@pytest.mark.slow
def test_worker_times_our_dpo_stage(tmp_path):
    """Build tiny fixtures, run our DPO stage for a few steps in the worker, and summarize it."""
    fx = fixtures.build(tmp_path / "fx", n_rows=64, sizes={"tiny": {"n_embd": 32, "n_layer": 1, "n_head": 2}})
    assert fx["max_tokens"] <= fixtures.MAX_LENGTH
    assert fx["tokens_per_example"]["pair"] > fx["tokens_per_example"]["sft"]
    spec = {
        "framework": "ours",
        "stage": "dpo",
        "size": "tiny",
        "batch_size": 4,
        "steps": 5,
        "max_length": fixtures.MAX_LENGTH,
        "lr": 1e-4,
        "warmup_steps": 1,
        "seed": 0,
        "reference_batch_size": 8,
        "fixtures": str(tmp_path / "fx" / "fixtures.json"),
        "out": str(tmp_path / "run"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", str(tmp_path / "spec.json"), str(tmp_path / "result.json")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["step_times"]) == 5  # one optimizer step recorded per training step
    assert result["step_times"][0] > result["process_start"]
    n, layers, d = matmul_params(fx["models"]["tiny"], with_lm_head=True)
    assert (layers, d) == (1, 32)
    row = summarize(result, 10.0, training_flops_per_token(n, layers, d, 100), fx["tokens_per_example"]["pair"], 1, 2)
    assert row["examples_per_s"] > 0 and 0 < row["mfu"]


def test_markdown_has_ratio_rollout_and_scaling_tables():
    row = {
        "stage": "dpo",
        "size": "3M",
        "batch_size": 8,
        "examples_per_s": 10.0,
        "tokens_per_s": 2000.0,
        "peak_rss_mb": 900.0,
        "time_to_first_step_s": 3.0,
        "mfu": 0.5,
    }
    from benchmarks.run import over_rounds

    # Three rounds each: the ratio is the median of the ratios within a round (10/8, 14/7, 6/6),
    # 1.25x, not the ratio of the medians (10/7).
    ours = over_rounds([{**row, "examples_per_s": e} for e in (10.0, 14.0, 6.0)], "ours")
    trl = over_rounds([{**row, "examples_per_s": e, "peak_rss_mb": 1000.0} for e in (8.0, 7.0, 6.0)], "trl")
    assert ours["examples_per_s"] == 10.0 and ours["examples_per_s_range"] == [6.0, 14.0] and ours["rounds"] == 3
    bench = {
        "matmul_peak_gflops": 100.0,
        "machine": "2 CPU cores",
        "command": "python -m benchmarks.run",
        "training": [ours, trl],
        "rollout": [
            {
                "size": "3M",
                "batch": 32,
                "new_tokens": 96,
                "ours_tokens_per_s": 3000.0,
                "ours_tokens_per_s_range": [2900.0, 3100.0],
                "generate_tokens_per_s": 1500.0,
                "generate_tokens_per_s_range": [1400.0, 1600.0],
                "speedup": 2.0,
                "speedup_range": [1.9, 2.1],
                "same_greedy_outputs": True,
            }
        ],
        "ppo_iteration": {
            "size": "3M",
            "rollout_batch_size": 32,
            "seconds": {"generate": 1.0, "score": 1.0, "advantages": 0.0, "update": 2.0},
        },
        "scaling": [{**row, "framework": "ours", "seq_len": 128}],
        "prefix": [
            {
                "shape": "hh",
                "size": "25M",
                "batch": 8,
                "prompt_len": 160,
                "response_len": 80,
                "tokens_saved": 0.4,
                "per_side_s": 1.0,
                "shared_s": 0.6,
                "speedup": 1.6,
                "speedup_range": [1.5, 1.7],
                "max_logp_difference": 2e-6,
            }
        ],
    }
    text = markdown(bench)
    assert "| hh | 25M | 8 | 160 + 2 x 80 | 40% | 1.000 | 0.600 | 1.60x (1.50–1.70) | 2.0e-06 |" in text
    assert "| dpo | 3M | ours | 10.00 (6.00–14.00) | 2000 (2000–2000) | 900 | 3.0 | 50.0% |" in text
    assert "| dpo | 3M | ours | 1.25x (1.00–2.00) | -100 MB |" in text
    assert "| 3M | 32 x 96 | 3000 (2900–3100) | 1500 (1400–1600) | 2.00x (1.90–2.10) | True |" in text
    assert "update 2.00 s (50%)" in text

    # On a GPU: the bf16 ceiling, GPU memory where RSS was, and no empty scaling table.
    gpu = {**bench, "device": {"type": "cuda", "dtype": "bfloat16"}, "scaling": []}
    gpu["training"] = [{**r, "peak_gpu_mb": mb} for r, mb in zip(bench["training"], (2000.0, 2500.0))]
    text = markdown(gpu)
    assert "Measured bf16 matmul peak" in text and "peak GPU memory (MB)" in text
    assert "| dpo | 3M | ours | 1.25x (1.00–2.00) | -500 MB |" in text
    assert "scaling" not in text


@pytest.mark.slow
def test_worker_splits_a_ppo_iteration_into_phases(tmp_path):
    fixtures.build(tmp_path / "fx", n_rows=32, sizes={"tiny": {"n_embd": 32, "n_layer": 1, "n_head": 2}})
    spec = {
        "framework": "ours",
        "stage": "ppo",
        "size": "tiny",
        "iterations": 3,
        "rollout_batch_size": 4,
        "new_tokens": 6,
        "batch_size": 4,
        "steps": 3,
        "max_length": fixtures.MAX_LENGTH,
        "lr": 1e-5,
        "warmup_steps": 0,
        "seed": 0,
        "fixtures": str(tmp_path / "fx" / "fixtures.json"),
        "out": str(tmp_path / "ppo"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", str(tmp_path / "spec.json"), str(tmp_path / "result.json")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    phases = json.loads((tmp_path / "result.json").read_text())["ppo_phases"]
    assert set(phases) == {"generate", "score", "advantages", "update"}
    assert all(seconds > 0 for seconds in phases.values())


def test_rollout_speed_times_both_sides_in_rounds_and_checks_their_greedy_tokens(tiny_folders):
    from benchmarks.rollout import rollout_speed

    row = rollout_speed(str(tiny_folders("policy")), batch=2, prompt_len=4, new_tokens=3, rounds=3)
    assert row["same_greedy_outputs"] and row["rounds"] == 3
    for key in ("ours_tokens_per_s", "generate_tokens_per_s", "speedup"):
        low, high = row[f"{key}_range"]
        assert 0 < low <= row[key] <= high


def test_prefix_sharing_bench_times_both_layouts_and_finds_the_same_log_probs(tiny_folders):
    from benchmarks.prefix import prefix_sharing_speed

    row = prefix_sharing_speed(str(tiny_folders("policy", n_positions=512)), "hh", batch=2, rounds=2)
    assert row["max_logp_difference"] < 1e-4 and row["rounds"] == 2
    assert 0.3 < row["tokens_saved"] < 0.5  # a 160-token prompt once instead of twice, beside 2 x ~80
    low, high = row["speedup_range"]
    assert 0 < low <= row["speedup"] <= high
