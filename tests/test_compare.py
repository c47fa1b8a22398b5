"""`rlhfdpo compare` on the small pipeline: every table, picture and number of the report."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess

import pytest
import yaml

from helpers import run_cli, sets, write_yaml
from pipeline.evaluation import distinct_n, win_indicators

pytestmark = pytest.mark.slow

SEEDS = [0, 1]


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
        for seed in SEEDS:  # two training seeds of each method
            result = run_cli(
                stage,
                str(small_pipeline[stage]),
                *sets(f"output_dir={runs[stage] / f'seed-{seed}'}", f"train.seed={seed}"),
                *extra,
            )
            assert result.returncode == 0, result.stderr[-3000:]
    config = write_yaml(
        work / "compare.yaml",
        {
            "output_dir": str(work / "report"),
            "sft": str(root / "sft"),
            "reward": str(small_reward_model),
            "policies": [
                {"name": "dpo", "method": "dpo", "run": str(runs["dpo"] / "seed-{seed}")},
                {"name": "ppo", "method": "ppo", "run": str(runs["ppo"] / "seed-{seed}")},
            ],
            "seeds": SEEDS,
            "samples_per_prompt": 2,
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
    assert results["seeds"] == SEEDS and results["prompts"]["samples_per_prompt"] == 2
    for m in results["methods"]:
        for key in ("win_vs_sft", "proxy_win_vs_sft", "win_vs_dataset"):
            if key in m:
                assert 0.0 <= m[key]["low"] <= m[key]["mean"] <= m[key]["high"] <= 1.0
        assert ("win_vs_sft" in m) == (m["name"] != "sft")
        assert m["gold"]["low"] <= m["gold"]["mean"] <= m["gold"]["high"]
        trained = m["name"] in ("dpo", "ppo")
        assert m["seeds"] == (SEEDS if trained else [0]) and len(m["gold"]["per_seed"]) == len(m["seeds"])
        # The mean over seeds and prompts is the mean of the seeds' means.
        assert m["gold"]["mean"] == pytest.approx(sum(m["gold"]["per_seed"]) / len(m["seeds"]))
        if m["temperature"] == 0:
            assert m["kl"] is None  # one greedy sequence is not a sample: no KL
        elif m["name"] == "sft":
            assert m["kl"]["mean"] == 0.0
        elif trained:  # the full-distribution KL is never negative, per sample
            assert 0.0 < m["kl"]["low"] <= m["kl"]["mean"] <= m["kl"]["high"]
    best = next(m for m in results["methods"] if m["name"] == "best-of-2")
    assert best["kl"]["mean"] == pytest.approx(0.6931472 - 0.5)  # log N - (N - 1) / N
    (h0, h1) = results["head_to_head"]  # the one DPO run against the one PPO run, at both temperatures
    assert (h0["dpo"], h0["ppo"], h0["temperature"], h1["temperature"]) == ("dpo", "ppo", 0.0, 1.0)
    assert "kl_intervals_overlap" in h0 and h0["dpo_kl"]["mean"] > 0
    steps = {(p["name"], p["step"]) for p in results["frontier"]}
    assert {("dpo", 15), ("dpo", "final"), ("ppo", 2), ("ppo", "final")} <= steps
    for point in results["frontier"]:
        assert len(point["kl"]["per_seed"]) == len(SEEDS) and point["kl"]["low"] <= point["kl"]["high"]
    (verdict,) = results["frontier_verdicts"]
    assert (verdict["a"], verdict["b"]) == ("dpo", "ppo")
    for row in verdict["grid"]:
        assert row["low"] <= row["high"] and row["verdict"] in ("above", "below", "no difference the data supports")
    cost_names = {c["name"] for c in results["cost"]}
    assert {"sft", "pairs", "reward", "dpo", "ppo"} <= cost_names
    ppo_cost = next(c for c in results["cost"] if c["name"] == "ppo")
    assert ppo_cost["inputs"] == ["pairs", "reward"] and ppo_cost["wall_s_with_inputs"] > ppo_cost["wall_s"]
    assert ppo_cost["seeds"] == len(SEEDS)  # one seed's run, on average
    for cost in results["cost"]:  # the work each run did, beside its wall time
        assert cost["cpu_s"] > 0 and cost["flops"] > 0


def test_samples_and_pictures_are_written(comparison):
    out, config = comparison
    results = json.loads((out / "results.json").read_text())
    lines = (out / "samples.jsonl").read_text().splitlines()
    # sft and best-of-2 at their temperatures (3), dpo and ppo at 2 temperatures for 2 seeds (8): 2 samples per prompt
    assert len(lines) == (3 + 8) * 40 * 2
    first = json.loads(lines[0])
    assert set(first) == {
        "method",
        "seed",
        "temperature",
        "prompt",
        "completion",
        "gold",
        "proxy",
        "kl",
        "length",
        "finished",
    }
    for picture in ("frontier.png", "win_rate_vs_temperature.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for heading in (
        "## Temperature 0 (greedy)",
        "## Temperature 1",
        "## DPO against PPO",
        "## Reward against KL",
        "### Frontier verdicts",
        "## Cost",
        "## Diagnoses",
    ):
        assert heading in report
    assert "config digest" in report
    # Every trained run of the comparison is read by the doctor and listed, with or without findings.
    compared = yaml.safe_load(config.read_text())
    runs = [
        compared["sft"],
        compared["reward"],
        *[p["run"].replace("{seed}", str(seed)) for p in compared["policies"] for seed in SEEDS],
    ]
    assert list(results["diagnoses"]) == runs
    assert all(f"- `{run}`:" in report for run in runs)


def test_the_same_seed_gives_the_same_numbers(comparison, tmp_path):
    out, config = comparison
    again = tmp_path / "again"
    result = run_cli("compare", str(config), "--set", f"output_dir={again}")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((d / "results.json").read_text()) for d in (out, again))
    assert first["methods"] == second["methods"] and first["frontier"] == second["frontier"]
    assert first["frontier_verdicts"] == second["frontier_verdicts"]


def test_an_evaluation_is_kept_and_reused_while_its_models_and_settings_are_unchanged(comparison, tmp_path):
    out, config = comparison
    copied = tmp_path / "report"
    shutil.copytree(out, copied)
    kept = copied / "evaluations" / "dpo" / "seed-0" / "evaluation.json"
    first = json.loads(kept.read_text())
    assert first["unit"] == "dpo" and sorted(first["models"]) == ["15", "final"]  # a checkpoint, the final model

    evaluate = ("evaluate", str(config), *sets(f"output_dir={copied}", "policy=dpo", "seeds=[0]"))
    again = run_cli(*evaluate)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused the evaluation" in again.stdout + again.stderr and json.loads(kept.read_text()) == first

    kept.write_text('{"key": "' + first["key"] + '", "samples": [{"torn')  # a write cut short
    torn = run_cli(*evaluate)
    assert torn.returncode == 0, torn.stderr[-3000:]
    assert "reused the evaluation" not in torn.stdout + torn.stderr and json.loads(kept.read_text()) == first

    shorter = run_cli(*evaluate, *sets("max_new_tokens=6"))  # a sampling setting: evaluated afresh
    assert shorter.returncode == 0, shorter.stderr[-3000:]
    assert "reused the evaluation" not in shorter.stdout + shorter.stderr
    changed = json.loads(kept.read_text())
    assert changed["key"] != first["key"]
    longest = [max(n for s in held["samples"] for n in s["lengths"]) for held in (changed, first)]
    assert longest[0] <= 6 < longest[1]

    # The compare reuses what matches and never what does not: dpo seed 0's kept evaluation (6 tokens)
    # is of other settings, so it evaluates that run again; the report equals the one made in one go.
    report = run_cli("compare", str(config), *sets(f"output_dir={copied}"), "--overwrite")
    assert report.returncode == 0, report.stderr[-3000:]
    assert (report.stdout + report.stderr).count("reused the evaluation") == 4  # sft, dpo seed 1, ppo seeds 0 and 1
    assert json.loads(kept.read_text())["key"] == first["key"]
    fresh = json.loads((out / "results.json").read_text())
    assert json.loads((copied / "results.json").read_text())["methods"] == fresh["methods"]


def test_an_experiment_evaluates_each_run_in_its_own_step_and_the_compare_reuses_them(comparison, tmp_path):
    _, config = comparison
    settings = yaml.safe_load(config.read_text()) | {"output_dir": str(tmp_path / "report")}
    compare = write_yaml(tmp_path / "compare.yaml", settings)
    plan = write_yaml(
        tmp_path / "experiment.yaml",
        {
            "seeds": SEEDS,
            "jobs": 2,
            "steps": [
                {"name": "eval-sft", "stage": "evaluate", "config": str(compare)},
                {
                    "name": "eval-dpo",
                    "stage": "evaluate",
                    "config": str(compare),
                    "seeded": True,
                    "set": ["policy=dpo"],
                },
                {"name": "compare", "stage": "compare", "config": str(compare), "after": ["eval-sft", "eval-dpo"]},
            ],
        },
    )
    first = run_cli("experiment", str(plan))
    assert first.returncode == 0, first.stderr[-3000:]
    kept = tmp_path / "report" / "evaluations"
    assert sorted(p.name for p in (kept / "dpo").iterdir()) == [f"seed-{s}" for s in SEEDS]
    log = (tmp_path / "report" / "experiment.log").read_text()  # the compare's own output
    assert log.count("reused the evaluation") == 1 + len(SEEDS)  # sft, and dpo per seed; ppo evaluated there
    again = run_cli("experiment", str(plan))
    assert again.returncode == 0 and "running" not in again.stdout  # every step, evaluations too, reused


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium (CI installs it)")
def test_report_html_renders_in_headless_chromium_without_console_errors(comparison, tmp_path):
    out, _ = comparison
    page = out / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing to fetch: it opens offline
    assert CHROMIUM is not None, "CI must install chromium for this test"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dom = result.stdout
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    assert 'data-rendered="yes"' in dom  # the page's script ran to its end
    # The sample browser shows the first prompt with a row per method: sft, best-of-2, dpo, ppo.
    browser = dom[dom.index('id="browser-body"') :]
    browser = browser[: browser.index("</tbody>")]
    assert browser.count("<tr>") == 4
    results = json.loads((out / "results.json").read_text())
    first_prompt = json.loads((out / "samples.jsonl").read_text().splitlines()[0])["prompt"]
    assert html.escape(first_prompt) in dom
    for m in results["methods"]:
        assert f"<td>{m['name']}</td>" in dom
    assert "data:image/png;base64," in dom
