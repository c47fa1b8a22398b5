"""`make compare-quick` (rlhfdpo experiment configs/experiment-quick.yaml): the whole comparison,
then a second run that reuses everything, then one changed step that re-runs only what depends on it."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import ROOT, run_cli, sets

pytestmark = pytest.mark.slow


def steps_by_outcome(output: str) -> dict[str, list[str]]:
    outcome = {"running": [], "reused": []}
    for line in output.splitlines():
        words = line.split()
        if words and words[0] in outcome:
            outcome[words[0]].append(words[1].rstrip(":"))
    return outcome


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("experiment")
    shutil.copytree(ROOT / "configs", work / "configs")
    result = run_cli("experiment", "configs/experiment-quick.yaml", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def test_quick_comparison_writes_the_report(quick):
    work, result = quick
    assert len(steps_by_outcome(result.stdout + result.stderr)["running"]) == 9
    report = work / "runs" / "quick" / "compare"
    results = json.loads((report / "results.json").read_text())
    names = {m["name"] for m in results["methods"]}
    assert names == {"sft", "best-of-4", "dpo-b0.1", "dpo-b0.5", "ppo-kl0.05", "ppo-kl0.2", "ppo-gt"}
    frontier = results["frontier"]
    for method in ("dpo", "ppo"):
        assert sum(p["method"] == method for p in frontier) >= 3  # runs and their checkpoints
    assert len(results["head_to_head"]) == 2 * 3 * 2  # 2 DPO runs x 3 PPO runs x 2 temperatures
    assert (report / "report.md").is_file() and (report / "frontier.png").is_file()


def test_a_second_run_reuses_every_step_and_a_change_reruns_only_its_dependents(quick):
    work, _ = quick
    report = work / "runs" / "quick" / "compare" / "report.md"
    before = report.stat().st_mtime_ns
    again = run_cli("experiment", "configs/experiment-quick.yaml", cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    outcome = steps_by_outcome(again.stdout + again.stderr)
    assert outcome["running"] == [] and len(outcome["reused"]) == 9
    assert report.stat().st_mtime_ns == before

    changed = run_cli(
        "experiment",
        "configs/experiment-quick.yaml",
        *sets("steps.4.set=[loss.beta=0.7, output_dir=runs/quick/dpo-b0.5]"),
        cwd=work,
    )
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert steps_by_outcome(changed.stdout + changed.stderr)["running"] == ["dpo-b0.5", "compare"]
