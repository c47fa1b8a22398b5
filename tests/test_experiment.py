"""`make compare-quick` (rlhfdpo experiment configs/experiment-quick.yaml): the whole comparison,
for one seed (the shipped two, overridden: two seeds' aggregation is test_compare's), then a second run that reuses everything, then one
changed step that re-runs only what depends on it."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import ROOT, run_cli, sets
from pipeline.config import ExperimentConfig, load_config
from pipeline.experiment import expand_seeds

pytestmark = pytest.mark.slow


def steps_by_outcome(output: str) -> dict[str, list[str]]:
    outcome = {"running": [], "reused": [], "finished": []}
    for line in output.splitlines():
        words = line.split()
        if words and words[0] in outcome:
            outcome[words[0]].append(words[1].rstrip(":"))
    return outcome


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("experiment")
    shutil.copytree(ROOT / "configs", work / "configs")
    result = run_cli("experiment", "configs/experiment-quick.yaml", *sets(SEEDS), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


SEEDS = "seeds=[0]"
SEEDED = [
    "dpo-b0.1",
    "dpo-b0.5",
    "ppo-kl0.05",
    "ppo-kl0.2",
    "ppo-gt",
    "rloo-kl0.05",
    "grpo-kl0.05",
    "rs-pairs",
    "rs",
    "odpo-pairs-1",
    "odpo-1",
    "odpo-pairs-2",
    "online-dpo",
]
# Pair sets and intermediate rounds are inputs to a policy, not policies the comparison scores.
NOT_POLICIES = {"rs-pairs", "odpo-pairs-1", "odpo-1", "odpo-pairs-2"}
POLICIES = [name for name in SEEDED if name not in NOT_POLICIES]


def test_quick_comparison_writes_the_report(quick):
    work, result = quick
    outcome = steps_by_outcome(result.stdout + result.stderr)
    assert sorted(outcome["running"]) == sorted(["sft", "pairs", "reward", *[f"{n}/seed-0" for n in SEEDED], "compare"])
    # The shipped plan runs two steps at once: each started only after every step it reads had finished.
    lines = (result.stdout + result.stderr).splitlines()
    at = {(words[0], words[1].rstrip(":")): i for i, words in enumerate(map(str.split, lines)) if len(words) > 1}
    cfg = load_config(ExperimentConfig, str(work / "configs" / "experiment-quick.yaml"), [SEEDS])
    assert cfg.jobs == 2
    for step, after in expand_seeds(cfg):
        assert all(at[("finished", name)] < at[("running", step.name)] for name in after), step.name
    assert (work / "runs" / "quick" / "ppo-kl0.05" / "seed-0" / "experiment.log").is_file()
    report = work / "runs" / "quick" / "compare"
    results = json.loads((report / "results.json").read_text())
    names = {m["name"] for m in results["methods"]}
    assert names == {"sft", "best-of-4", *POLICIES}
    assert results["seeds"] == [0]
    for m in results["methods"]:
        assert m["seeds"] == [0] and len(m["gold"]["per_seed"]) == 1
    frontier = results["frontier"]
    for method in ("dpo", "ppo"):
        assert sum(p["method"] == method for p in frontier) >= 3  # runs and their checkpoints
    assert len(results["head_to_head"]) == 2 * 2  # each DPO run against the nearest-KL PPO run, 2 temperatures
    methods = ["dpo", "ppo", "ppo_gt", "rloo", "grpo", "rs", "online_dpo"]
    assert [(v["a"], v["b"]) for v in results["frontier_verdicts"]] == [
        (a, b) for i, a in enumerate(methods) for b in methods[i + 1 :]
    ]
    assert (work / "runs" / "quick" / "dpo-b0.1" / "seed-0" / "model" / "config.json").is_file()
    # The arms: no value model without a critic; RS and online DPO trained on pairs the reward model labelled.
    assert not (work / "runs" / "quick" / "rloo-kl0.05" / "seed-0" / "value").exists()
    for pairs in ("rs-pairs/seed-0", "online-dpo/pairs-2/seed-0"):
        first = json.loads((work / "runs" / "quick" / pairs / "train.jsonl").read_text().splitlines()[0])
        assert "chosen_gold" in first and first["chosen_score"] >= first["rejected_score"]
    costs = {c["name"]: c for c in results["cost"]}
    assert costs["online-dpo"]["inputs"][2:] == [
        "runs/quick/online-dpo/pairs-1/seed-{seed}",
        "runs/quick/online-dpo/round-1/seed-{seed}",
        "runs/quick/online-dpo/pairs-2/seed-{seed}",
    ]
    assert costs["ppo-gt"]["inputs"] == []  # the gold reward needs neither pairs nor a reward model
    implicit = results["implicit_reward"]
    assert [m["name"] for m in implicit["models"]] == ["reward model", "dpo-b0.1 (implicit)", "dpo-b0.5 (implicit)"]
    for m in implicit["models"]:
        assert 0 <= m["accuracy"]["low"] <= m["accuracy"]["mean"] <= m["accuracy"]["high"] <= 1
        assert sum(level["pairs"] for level in m["by_rating"].values()) == implicit["pairs"]
        assert -1 <= m["spearman_gold_gap"] <= 1
    assert (report / "report.md").is_file() and (report / "frontier.png").is_file()


def test_a_second_run_reuses_every_step_and_a_change_reruns_only_its_dependents(quick):
    work, _ = quick
    report = work / "runs" / "quick" / "compare" / "report.md"
    before = report.stat().st_mtime_ns
    again = run_cli("experiment", "configs/experiment-quick.yaml", *sets(SEEDS), cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    outcome = steps_by_outcome(again.stdout + again.stderr)
    assert outcome["running"] == [] and len(outcome["reused"]) == 3 + len(SEEDED) + 1
    assert report.stat().st_mtime_ns == before

    changed = run_cli(
        "experiment",
        "configs/experiment-quick.yaml",
        *sets(SEEDS, "steps.4.set=[loss.beta=0.7, 'output_dir=runs/quick/dpo-b0.5/seed-{seed}']"),
        cwd=work,
    )
    assert changed.returncode == 0, changed.stderr[-3000:]
    running = steps_by_outcome(changed.stdout + changed.stderr)["running"]
    assert running == ["dpo-b0.5/seed-0", "compare"]


def test_seeded_steps_expand_per_seed_read_their_own_seed_and_unseeded_ones_read_every_seed():
    from pipeline.config import ExperimentConfig, StepSpec
    from pipeline.experiment import expand_seeds

    cfg = ExperimentConfig(
        steps=[
            StepSpec("sft", "sft", "configs/sft.yaml"),
            StepSpec("dpo", "dpo", "configs/dpo.yaml", ["output_dir=runs/dpo/seed-{seed}"], ["sft"], seeded=True),
            StepSpec("pairs", "pairs", "configs/pairs.yaml", ["output_dir=runs/p-{seed}"], ["sft"], seeded=True),
            StepSpec("eval", "evaluate", "configs/compare.yaml", ["policy=dpo-b0.1"], ["sft", "dpo"], seeded=True),
            StepSpec("compare", "compare", "configs/compare.yaml", [], ["sft", "dpo", "eval"]),
        ],
        seeds=[3, 5],
    )
    expanded = [(step.name, step.set, after) for step, after in expand_seeds(cfg)]
    assert expanded == [
        ("sft", [], []),
        ("dpo/seed-3", ["output_dir=runs/dpo/seed-3", "train.seed=3"], ["sft"]),
        ("dpo/seed-5", ["output_dir=runs/dpo/seed-5", "train.seed=5"], ["sft"]),
        ("pairs/seed-3", ["output_dir=runs/p-3", "seed=3"], ["sft"]),  # pairs has no train section
        ("pairs/seed-5", ["output_dir=runs/p-5", "seed=5"], ["sft"]),
        # an evaluation reads its own seed's run and is told that seed (its sampling seed stays)
        ("eval/seed-3", ["policy=dpo-b0.1", "seeds=[3]"], ["sft", "dpo/seed-3"]),
        ("eval/seed-5", ["policy=dpo-b0.1", "seeds=[5]"], ["sft", "dpo/seed-5"]),
        ("compare", ["seeds=[3, 5]"], ["sft", "dpo/seed-3", "dpo/seed-5", "eval/seed-3", "eval/seed-5"]),
    ]


def test_a_seeded_step_without_a_seed_in_its_output_dir_is_one_line(tmp_path):
    config = tmp_path / "experiment.yaml"
    config.write_text(
        "steps:\n  - {name: dpo, stage: dpo, config: configs/dpo.yaml, seeded: true, set: [output_dir=runs/dpo]}\n"
    )
    result = run_cli("experiment", str(config), cwd=ROOT)
    assert result.returncode != 0
    assert "add output_dir=<folder with {seed}>" in result.stderr and "Traceback" not in result.stderr
