"""`rlhfdpo compare` on the small pipeline: every table, picture and number of the report."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import run_cli, write_yaml
from pipeline.evaluation import distinct_n, win_indicators

pytestmark = pytest.mark.slow


def test_win_indicators_and_distinct_n_by_hand():
    assert win_indicators([1.0, 0.5, 0.2], [0.5, 0.5, 0.9]) == [1.0, 0.5, 0.0]
    # "a b a b": bigrams (a b), (b a), (a b) -> 2 distinct of 3; unigrams 2 of 4.
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def comparison(small_pipeline, small_reward_model, tmp_path_factory):
    root = small_pipeline["root"]
    work = tmp_path_factory.mktemp("compare")
    runs = {"dpo": work / "dpo", "ppo": work / "ppo"}
    for stage, extra in (
        ("dpo", ["--set", "train.max_steps=30", "--set", "train.save_every=15"]),
        ("ppo", ["--set", "train.max_steps=4", "--set", "train.save_every=2"]),
    ):
        result = run_cli(stage, str(small_pipeline[stage]), "--set", f"output_dir={runs[stage]}", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    config = write_yaml(
        work / "compare.yaml",
        {
            "output_dir": str(work / "report"),
            "sft": str(root / "sft"),
            "reward": str(small_reward_model),
            "policies": [
                {"name": "dpo", "method": "dpo", "run": str(runs["dpo"])},
                {"name": "ppo", "method": "ppo", "run": str(runs["ppo"])},
            ],
            "best_of_n": [2],
            "num_prompts": 40,
            "temperatures": [0.0, 1.0],
            "max_new_tokens": 24,
            "bootstrap_resamples": 200,
        },
    )
    result = run_cli("compare", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "report", config


def test_report_holds_every_method_temperature_and_interval(comparison):
    out, _ = comparison
    results = json.loads((out / "results.json").read_text())
    keys = {(m["name"], m["temperature"]) for m in results["methods"]}
    assert keys == {
        ("sft", 0.0),
        ("sft", 1.0),
        ("best-of-2", 1.0),
        ("dpo", 0.0),
        ("dpo", 1.0),
        ("ppo", 0.0),
        ("ppo", 1.0),
    }
    for m in results["methods"]:
        for key in ("win_vs_sft", "proxy_win_vs_sft", "win_vs_dataset"):
            if key in m:
                assert 0.0 <= m[key]["low"] <= m[key]["mean"] <= m[key]["high"] <= 1.0
        assert ("win_vs_sft" in m) == (m["name"] != "sft")
        if m["temperature"] == 0:
            assert m["kl"] is None  # one greedy sequence is not a sample: no KL
        elif m["name"] == "sft":
            assert m["kl"] == 0.0
    best = next(m for m in results["methods"] if m["name"] == "best-of-2")
    assert best["kl"] == pytest.approx(0.6931472 - 0.5)  # log N - (N - 1) / N
    assert {(h["dpo"], h["ppo"], h["temperature"]) for h in results["head_to_head"]} == {
        ("dpo", "ppo", 0.0),
        ("dpo", "ppo", 1.0),
    }
    steps = {(p["name"], p["step"]) for p in results["frontier"]}
    assert {("dpo", 15), ("dpo", "final"), ("ppo", 2), ("ppo", "final")} <= steps
    cost_names = {c["name"] for c in results["cost"]}
    assert {"sft", "pairs", "reward", "dpo", "ppo"} <= cost_names
    ppo_cost = next(c for c in results["cost"] if c["name"] == "ppo")
    assert ppo_cost["inputs"] == ["pairs", "reward"] and ppo_cost["wall_s_with_inputs"] > ppo_cost["wall_s"]
    for cost in results["cost"]:  # the work each run did, beside its wall time
        assert cost["cpu_s"] > 0 and cost["flops"] > 0


def test_samples_and_pictures_are_written(comparison):
    out, config = comparison
    results = json.loads((out / "results.json").read_text())
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 7 * 40
    first = json.loads(lines[0])
    assert set(first) == {"method", "temperature", "prompt", "completion", "gold", "proxy", "kl", "length", "finished"}
    for picture in ("frontier.png", "win_rate_vs_temperature.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for heading in (
        "## Temperature 0 (greedy)",
        "## Temperature 1",
        "## DPO against PPO",
        "## Reward against KL",
        "## Cost",
        "## Diagnoses",
    ):
        assert heading in report
    assert "config digest" in report
    # Every trained run of the comparison is read by the doctor and listed, with or without findings.
    compared = yaml.safe_load(config.read_text())
    runs = [compared["sft"], compared["reward"], *[p["run"] for p in compared["policies"]]]
    assert list(results["diagnoses"]) == runs
    assert all(f"- `{run}`:" in report for run in runs)


def test_the_same_seed_gives_the_same_numbers(comparison, tmp_path):
    out, config = comparison
    again = tmp_path / "again"
    result = run_cli("compare", str(config), "--set", f"output_dir={again}")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((d / "results.json").read_text()) for d in (out, again))
    assert first["methods"] == second["methods"] and first["frontier"] == second["frontier"]
