"""`rlhfdpo doctor`: one metrics file per known failure mode, built by hand, and a healthy run that
must raise nothing; then the command line and the comparison report's section."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli
from pipeline.doctor import CHECKS, PROBLEM, WARNING, diagnose


def write_run(folder, records: list[dict]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def steps(**columns: list[float]) -> list[dict]:
    """Records step 1..n with one value per column per step."""
    n = len(next(iter(columns.values())))
    return [{"step": i + 1, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


HEALTHY_PPO = steps(
    **{
        "objective/kl": [0.1, 0.5, 1.0, 1.5, 2.0, 2.4],
        "rollout/finished": [0.6, 0.62, 0.6, 0.63, 0.61, 0.62],
        "rollout/response_length": [30, 31, 30, 32, 31, 30],
        "objective/scores": [0.0, 0.1, 0.2, 0.3, 0.35, 0.4],
        "gold/mean": [0.0, 0.05, 0.1, 0.12, 0.15, 0.16],
    }
)
HEALTHY_DPO = steps(
    **{"logps/chosen": [-40, -40.2, -40.1, -40.5, -40.3, -40.6], "rewards/margins": [0, 0.1, 0.2, 0.3, 0.4, 0.5]}
) + [
    {
        "step": 6,
        "eval/rewards/accuracies": 0.7,
        "eval/rewards/accuracies_low": 0.64,
        "eval/rewards/accuracies_high": 0.75,
    }
]


def names(tmp_path, records) -> list[str]:
    return [d.name for d in diagnose(write_run(tmp_path / "run", records))]


def test_healthy_runs_raise_nothing(tmp_path):
    assert names(tmp_path / "ppo", HEALTHY_PPO) == []
    assert names(tmp_path / "dpo", HEALTHY_DPO) == []


@pytest.mark.parametrize(
    ("records", "name", "severity", "numbers"),
    [
        (  # a NaN in any logged value
            HEALTHY_PPO[:3] + [{"step": 4, "loss/policy": float("nan")}],
            "non-finite values",
            PROBLEM,
            "loss/policy = nan at step 4",
        ),
        (  # DPO pushing both responses down, the rejected faster: margins up, chosen log-probs down
            steps(**{"logps/chosen": [-40, -41, -42, -44, -45, -46], "rewards/margins": [0, 0.2, 0.4, 0.6, 0.8, 1.0]}),
            "chosen log-probs falling",
            WARNING,
            "fell by 5.00 nats while the margins grew by 0.800",
        ),
        (
            steps(**{"objective/kl": [0.0, -0.1, -0.2, -0.3, -0.3, -0.4]}),
            "negative KL",
            PROBLEM,
            "averages -0.350",
        ),
        (
            steps(**{"objective/kl": [1.0, 2.0, 5.0, 10.0, 30.0, 50.0]}),
            "exploding KL",
            WARNING,
            "grew from 1.50 to 40.00 nats",
        ),
        (
            steps(**{"rollout/finished": [0.9, 0.8, 0.6, 0.4, 0.2, 0.1]}),
            "EOS rate collapsing",
            WARNING,
            "fell from 85% to 15%",
        ),
        (
            steps(**{"rollout/response_length": [20, 22, 28, 34, 40, 44]}),
            "response length drifting",
            WARNING,
            "from 21.0 to 42.0 tokens (+100%)",
        ),
        (  # the proxy rises while the gold reward falls: reward hacking
            steps(**{"objective/scores": [0, 0.5, 1.0, 1.5, 2.0, 2.5], "gold/mean": [0.2, 0.2, 0.1, 0.05, 0.0, -0.1]}),
            "over-optimisation",
            PROBLEM,
            "rose from +0.250 to +2.250 while the gold reward fell from +0.200 to -0.050",
        ),
        (
            [{"step": 10, "eval/accuracy": 0.53, "eval/accuracy_low": 0.48, "eval/accuracy_high": 0.58}],
            "accuracy near chance",
            WARNING,
            "reward model's held-out accuracy is 53.0% [48.0%, 58.0%]",
        ),
    ],
)
def test_each_failure_mode_is_named_with_its_numbers(tmp_path, records, name, severity, numbers):
    found = diagnose(write_run(tmp_path / "run", records))
    assert [d.name for d in found] == [name]
    assert found[0].severity == severity and numbers in found[0].finding and found[0].advice


def test_one_noisy_step_raises_nothing_and_every_check_is_tested():
    noisy = [dict(r) for r in HEALTHY_PPO]
    noisy[3]["rollout/finished"] = 0.05  # one bad step among steady ones: the thirds' means barely move
    noisy[4]["objective/kl"] = -1.0
    assert [c(noisy) for c in CHECKS.values()] == [None] * len(CHECKS)
    assert len(CHECKS) == 7  # a new check needs its case in the test above


def test_doctor_on_the_command_line(tmp_path):
    bad = write_run(tmp_path / "bad", steps(**{"objective/kl": [0.0, -0.1, -0.2, -0.3, -0.3, -0.4]}))
    good = write_run(tmp_path / "good", HEALTHY_DPO)
    result = run_cli("doctor", str(good), str(bad))
    assert result.returncode == 0
    assert f"{good}: no known failure mode" in result.stdout and "problem: negative KL" in result.stdout
    assert run_cli("doctor", "--strict", str(bad)).returncode == 1
    missing = run_cli("doctor", str(good), str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr and f"{good}:" in missing.stdout
    (tmp_path / "torn" / "metrics.jsonl").parent.mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    torn = run_cli("doctor", str(tmp_path / "torn"))
    assert torn.returncode == 2 and "line 2 is not JSON" in torn.stderr and "Traceback" not in torn.stderr


def test_the_comparison_report_lists_each_runs_diagnoses(tmp_path):
    from pipeline.doctor import diagnose_runs

    bad = write_run(tmp_path / "ppo", steps(**{"objective/kl": [1.0, 2.0, 5.0, 10.0, 30.0, 50.0]}))
    good = write_run(tmp_path / "dpo", HEALTHY_DPO)
    found = diagnose_runs([good, bad, tmp_path / "not-a-run"])
    assert list(found) == [str(good), str(bad)] and found[str(good)] == []
    assert found[str(bad)][0].startswith("warning: exploding KL: the KL to the reference grew from 1.50 to 40.00")
