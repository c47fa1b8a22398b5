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
from benchmarks.stats import steady_rate, steady_throughput, summarize

ROOT = Path(__file__).resolve().parents[1]


def test_steady_throughput_skips_warmup_and_takes_the_median_window():
    # Steps end at t = 0, 10 (slow first interval), 11, 12, 14, 15, 16: durations 10, 1, 1, 2, 1, 1.
    times = [0.0, 10.0, 11.0, 12.0, 14.0, 15.0, 16.0]
    # warmup 1 drops the 10 s interval; windows of 2: (1+1), (2+1) -> 8 examples / 2 s, / 3 s; one
    # leftover interval is not a full window. Median of {4.0, 2.667} is their mean.
    assert steady_throughput(times, examples_per_step=4, warmup=1, window=2) == pytest.approx((4.0 + 8 / 3) / 2)
    with pytest.raises(ValueError, match="fewer than one window"):
        steady_throughput(times[:3], 4, warmup=1, window=2)


def test_a_counted_rate_sums_each_windows_own_amounts():
    times = [0.0, 10.0, 11.0, 12.0, 14.0, 15.0, 16.0]
    tokens = [999, 999, 100, 300, 50, 70, 0]  # the step ending at times[i] did tokens[i]
    # warmup 1 drops the step ending at 10; windows (10 -> 11 -> 12) and (12 -> 14 -> 15), the step
    # ending at 16 left over: 400 tokens in 2 s and 120 in 3 s.
    assert steady_rate(times, tokens, warmup=1, window=2) == pytest.approx((400 / 2 + 120 / 3) / 2)


def test_counted_tokens_replace_the_mean_length_estimate():
    result = {
        "spec": {"framework": "ours", "stage": "sft", "size": "3M", "batch_size": 2},
        "process_start": 100.0,
        "step_times": [105.0, 106.0, 107.0, 108.0],
        "step_tokens": [10, 30, 50, 70],
        "peak_rss_mb": 500.0,
    }
    row = summarize(result, peak_gflops=1.0, flops_per_token=1e6, tokens_per_example=50, warmup=0, window=3)
    assert row["tokens_counted"] and row["tokens_per_s"] == pytest.approx(150 / 3)
    assert row["examples_per_s"] == 2.0  # not 100 tokens/s, what 2 examples/s of the mean 50 would say


def test_our_batches_count_under_the_step_they_are_made_for(monkeypatch):
    from benchmarks import worker

    monkeypatch.setattr(worker, "STEP_TIMES", [])
    monkeypatch.setattr(worker, "STEP_TOKENS", {})
    make = worker.counting(lambda examples, pad: (examples, pad), len)
    assert make(["ab", "c"], 0) == (["ab", "c"], 0)  # step 0: 3 tokens
    worker.STEP_TIMES.append(1.0)
    make(["abcd"], 0)
    make(["ef"], 0)  # a second micro-batch of step 1
    assert worker.STEP_TOKENS == {0: 3, 1: 6}


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
    # HH-shaped pairs: the multi-turn prompt about two thirds of the tokens, everything within length
    assert 0.6 < fx["prompt_share"]["pair_hh"] < 0.75 and fx["prompt_share"]["pair"] < 0.5
    assert fx["max_tokens_hh"] <= fixtures.HH_MAX_LENGTH and fx["max_prompt_tokens_hh"] <= fixtures.HH_MAX_PROMPT_LENGTH
    first = json.loads(Path(fx["data"]["pairs_hh"]).read_text().splitlines()[0])
    assert first["prompt"].startswith("\n\nHuman:") and first["prompt"].endswith("\n\nAssistant:")
    assert first["prompt"].count("\n\nHuman:") >= 2
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
    # every step's 4 pairs counted, both sides: more than 8 tokens each, less than the length limit
    assert len(result["step_tokens"]) == 5
    assert all(8 * 4 < tokens <= 8 * fixtures.MAX_LENGTH for tokens in result["step_tokens"])
    assert result["step_times"][0] > result["process_start"]
    n, layers, d = matmul_params(fx["models"]["tiny"], with_lm_head=True)
    assert (layers, d) == (1, 32)
    row = summarize(result, 10.0, training_flops_per_token(n, layers, d, 100), fx["tokens_per_example"]["pair"], 1, 2)
    assert row["examples_per_s"] > 0 and 0 < row["mfu"] and row["tokens_counted"]


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

    # Three rounds each: the ratio is the median of the tokens/s ratios within a round (10/8, 14/7,
    # 6/6), 1.25x, not the ratio of the medians (10/7).
    ours = over_rounds([{**row, "examples_per_s": e, "tokens_per_s": 200 * e} for e in (10.0, 14.0, 6.0)], "ours")
    trl = over_rounds(
        [{**row, "examples_per_s": e, "tokens_per_s": 200 * e, "peak_rss_mb": 1000.0} for e in (8.0, 7.0, 6.0)], "trl"
    )
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
            "variants": {
                "separate": {
                    "seconds": {"generate": 1.0, "score": 1.0, "advantages": 0.0, "update": 2.0},
                    "total_s_rounds": [4.0, 5.0, 4.0],
                },
                "shared": {
                    "seconds": {"generate": 1.0, "score": 0.5, "advantages": 0.0, "update": 1.0},
                    "total_s_rounds": [2.0, 2.5, 4.0],
                },
            },
        },
        "rl_anchor": [
            {
                "method": "grpo",
                "framework": framework,
                "size": "25M",
                "prompts": 8,
                "samples_per_prompt": 4,
                "new_tokens": 96,
                "completions_per_s": rates[1],
                "completions_per_s_range": [min(rates), max(rates)],
                "completions_per_s_rounds": rates,
                "peak_rss_mb": rss,
            }
            for framework, rates, rss in (("ours", [2.0, 3.0, 4.0], 1500.0), ("trl", [1.0, 2.0, 4.0], 1000.0))
        ],
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
    assert "| dpo | 3M | ours | 10.00 (6.00–14.00) | 2000 (1200–2800) | 900 | 3.0 | 50.0% |" in text
    assert "| dpo | 3M | ours | 1.25x (1.00–2.00) | -100 MB |" in text
    assert "| 3M | 32 x 96 | 3000 (2900–3100) | 1500 (1400–1600) | 2.00x (1.90–2.10) | True |" in text
    assert "| separate | 1.00 s (25%) | 1.00 s (25%) | 0.00 s (0%) | 2.00 s (50%) | 4.00 s | - |" in text
    # the speedup within each round: 4/2, 5/2.5, 4/4
    assert "| shared | 1.00 s (40%) | 0.50 s (20%) | 0.00 s (0%) | 1.00 s (40%) | 2.50 s | 2.00x (1.00–2.00) |" in text
    # ratios within rounds: 2/1, 3/2, 4/4
    assert "| grpo | 25M | 8 x 4, 96 | 3.00 (2.00–4.00) | 2.00 (1.00–4.00) | 1.50x (1.00–2.00) | +500 MB |" in text
    assert "each run (the higher)" not in text  # rows measured against the start's peak only
    # the range of every run's peak, not of the rows' medians
    peaked = [
        over_rounds([{**row, "matmul_peak_gflops": p} for p in peaks], label)
        for label, peaks in (("ours", (350.0, 380.0, 360.0)), ("trl", (340.0, 370.0, 410.0)))
    ]
    assert [r["matmul_peak_gflops"] for r in peaked] == [360.0, 370.0]
    assert "each run (the higher): 340–410 GFLOP/s over this table's rows." in markdown({**bench, "training": peaked})
    hh = over_rounds([{**row, "shape": "hh"}], "ours+shared")
    assert "| dpo (HH-shaped) | 3M | ours+shared | 10.00 (10.00–10.00) |" in markdown({**bench, "training": [hh]})

    # On a GPU: the bf16 ceiling, GPU memory where RSS was, and no empty scaling table.
    gpu = {**bench, "device": {"type": "cuda", "dtype": "bfloat16"}, "scaling": []}
    gpu["training"] = [{**r, "peak_gpu_mb": mb} for r, mb in zip(bench["training"], (2000.0, 2500.0))]
    text = markdown(gpu)
    assert "Measured bf16 matmul peak" in text and "peak GPU memory (MB)" in text
    assert "| dpo | 3M | ours | 1.25x (1.00–2.00) | -500 MB |" in text
    assert "scaling" not in text


def test_a_runs_mfu_is_against_the_higher_of_the_peaks_measured_just_before_and_after_it(tmp_path, monkeypatch):
    from benchmarks import run

    peaks = iter([300.0, 360.0, 420.0, 330.0])
    measured = []

    def peak(device):
        measured.append(device)
        return next(peaks)

    def worker(command, **kwargs):
        measured.append("run")
        Path(command[-1]).write_text(json.dumps({"step_times": [1.0]}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(run, "matmul_peak_gflops", peak)
    monkeypatch.setattr(run.subprocess, "run", worker)
    spec = {"framework": "ours", "stage": "sft", "size": "3M"}
    assert run.run_worker(spec, tmp_path / "a", peak_on="cpu")["matmul_peak_gflops"] == 360.0
    assert run.run_worker({**spec, "size": "25M"}, tmp_path / "b", peak_on="cpu")["matmul_peak_gflops"] == 420.0
    assert measured == ["cpu", "run", "cpu"] * 2  # bracketing the run, on its device
    # reused as it was measured, peak included, without measuring again
    assert run.run_worker(spec, tmp_path / "a", peak_on="cpu")["matmul_peak_gflops"] == 360.0
    assert len(measured) == 6
    assert "matmul_peak_gflops" not in run.run_worker({**spec, "size": "1M"}, tmp_path / "c")  # not asked


def run_ppo_worker(tmp_path: Path, name: str, **extra) -> dict:
    from benchmarks.run import ppo_spec

    fx_path = tmp_path / "fx" / "fixtures.json"
    if not fx_path.is_file():
        fixtures.build(tmp_path / "fx", n_rows=32, sizes={"tiny": {"n_embd": 32, "n_layer": 1, "n_head": 2}})
    spec = ppo_spec("tiny", 3, 4, 6, fx_path, tmp_path / name, **extra)
    (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", str(tmp_path / f"{name}.json"), str(tmp_path / f"{name}-out.json")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return json.loads((tmp_path / f"{name}-out.json").read_text())


@pytest.mark.slow
def test_worker_splits_a_ppo_iteration_into_phases_with_either_value_model(tmp_path):
    for name, extra in (("separate", {}), ("shared", {"value_model": "shared"})):
        result = run_ppo_worker(tmp_path, name, **extra)
        phases = result["ppo_phases"]
        assert set(phases) == {"generate", "score", "advantages", "update"}
        assert all(seconds > 0 for seconds in phases.values())
    config = (tmp_path / "shared" / "config.yaml").read_text()
    assert "value_model: shared" in config


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["ours", "trl"])
def test_the_rl_anchor_runs_one_optimizer_step_per_iteration(tmp_path, framework):
    """The GRPO iteration both ways: 2 prompts x 2 samples, one step on all 4 per iteration."""
    if framework == "trl":
        pytest.importorskip("trl")  # the optional 'bench' extra
    ppo = {
        "advantage": "grpo",
        "samples_per_prompt": 2,
        "rollout_batch_size": 2,
        "mini_batch_size": 4,
        "micro_batch_size": 4,
        "epochs": 1,
    }
    result = run_ppo_worker(tmp_path, framework, framework=framework, stage="grpo", batch_size=4, ppo=ppo)
    assert len(result["step_times"]) == 3
    prompts = (tmp_path / framework / "prompts.jsonl").read_text().splitlines()
    tokenizer_folder = json.loads((tmp_path / "fx" / "fixtures.json").read_text())["models"]["tiny"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    assert prompts and all(len(tokenizer(json.loads(r)["prompt"])["input_ids"]) <= 64 for r in prompts)


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


def test_trl_runs_without_gradient_checkpointing_as_ours_do():
    """TRL 1.x's configs default to gradient checkpointing; the bench's TRL runs must not recompute
    activations that ours keep, or the two sides do different work at different memory."""
    trl = pytest.importorskip("trl")  # the optional 'bench' extra
    from benchmarks.worker import trl_arguments

    args = trl_arguments({"out": "unused", "lr": 1e-4, "seed": 0})
    for config in (trl.GRPOConfig, trl.RLOOConfig, trl.DPOConfig, trl.RewardConfig, trl.SFTConfig):
        assert config(**args).gradient_checkpointing is False, config.__name__


def test_the_sampler_profile_prints_both_samplers_the_floor_and_the_operators(capsys):
    from benchmarks.sampler_profile import main

    main(["--batch", "2", "--prompt-len", "4", "--new-tokens", "3", "--rows", "5"])
    out = capsys.readouterr().out
    for line in ("ours ", "generate ", "weight matmuls alone", "aten::addmm"):
        assert line in out, out


def test_the_sft_profile_prints_padded_and_packed_rates_the_matmul_share_and_the_operators(capsys):
    from benchmarks.sft_profile import main

    main(["--batch", "3", "--steps", "2", "--scale", "0.0625", "--rows", "5"])
    out = capsys.readouterr().out
    for line in (
        "padded ",
        "packed, one bucket ",
        "packed, buckets ",
        "weight matmuls",
        "against a measured peak",
        "aten::",
    ):
        assert line in out, out
