"""`rlhfdpo doctor RUN`: known failure modes read off a run's metrics.jsonl, each with what to do.

Every check is a pure function of the run's logged records, registered under its name in
`CHECKS`; each returns a `Diagnosis` or None. A trend compares the mean of the first third of a
series with that of the last third, so one noisy step neither raises nor hides a diagnosis. The
thresholds are named constants below; they flag what is worth a look, not a proof of failure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError

PROBLEM, WARNING = "problem", "warning"

CHOSEN_LOGP_DROP = 1.0  # nats the chosen log-probability falls, while margins grow, to be flagged
KL_NEGATIVE = -0.05  # a KL estimate below this (nats, mean of the last third) is not a KL
KL_EXPLODING = 20.0  # nats: a KL to the reference past this, and tripled since the start
EOS_DROP = 0.3  # the share of finished rollouts falling by this much (absolute) ...
EOS_FLOOR = 0.5  # ... to below this
LENGTH_DRIFT = 0.5  # response length changing by this fraction between the first and last third
GOLD_DROP = 0.02  # the gold reward falling by this much while the proxy rises: over-optimisation


@dataclass(frozen=True)
class Diagnosis:
    name: str
    severity: str  # PROBLEM or WARNING
    finding: str  # what the metrics show, with the numbers
    advice: str  # what to do about it

    def line(self) -> str:
        return f"{self.severity}: {self.name}: {self.finding}. {self.advice}"


Records = list[dict]


def series(records: Records, key: str) -> list[float]:
    """The values of `key` in logged order, from the records that hold it as a number."""
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]


def thirds(values: list[float]) -> tuple[float, float] | None:
    """(mean of the first third, mean of the last third), or None for fewer than 3 values."""
    if len(values) < 3:
        return None
    k = len(values) // 3
    return sum(values[:k]) / k, sum(values[-k:]) / k


def non_finite(records: Records) -> Diagnosis | None:
    for record in records:
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            return Diagnosis(
                "non-finite values",
                PROBLEM,
                f"{', '.join(bad)} = {record[bad[0]]} at step {record.get('step', '?')}",
                "Lower optim.lr or optim.max_grad_norm, look for empty or corrupt rows with "
                "`rlhfdpo data inspect`, and resume from the last checkpoint before that step",
            )
    return None


def chosen_logps_falling(records: Records) -> Diagnosis | None:
    chosen, margins = thirds(series(records, "logps/chosen")), thirds(series(records, "rewards/margins"))
    if chosen is None or margins is None:
        return None
    drop, growth = chosen[0] - chosen[1], margins[1] - margins[0]
    if drop >= CHOSEN_LOGP_DROP and growth > 0:
        return Diagnosis(
            "chosen log-probs falling",
            WARNING,
            f"DPO's log-probability of the chosen responses fell by {drop:.2f} nats while the margins grew by "
            f"{growth:.3f}: both responses lose likelihood, the rejected ones faster",
            "The policy moves probability to responses in neither set; add an SFT term on the chosen responses "
            "(loss.rpo_alpha, RPO), raise loss.beta or lower optim.lr",
        )
    return None


def kl_out_of_range(records: Records) -> Diagnosis | None:
    kl = series(records, "objective/kl")
    ends = thirds(kl)
    if ends is None:
        return None
    first, last = ends
    if last < KL_NEGATIVE:
        return Diagnosis(
            "negative KL",
            PROBLEM,
            f"the KL to the reference averages {last:.3f} over the last third of the run",
            "A sampled KL estimate this negative means rollouts are not drawn from the distribution they are scored "
            "under (temperature, top-p, a mismatched tokenizer or reference); check sample.temperature and the "
            "reference model, or use the k3 estimator (kl.estimator)",
        )
    if last > KL_EXPLODING and last > 3 * max(first, 1e-3):
        return Diagnosis(
            "exploding KL",
            WARNING,
            f"the KL to the reference grew from {first:.2f} to {last:.2f} nats",
            "The policy is leaving the reference fast; raise kl.coef (or set kl.target for adaptive control), lower optim.lr, "
            "or keep an earlier checkpoint",
        )
    return None


def eos_collapse(records: Records) -> Diagnosis | None:
    ends = thirds(series(records, "rollout/finished"))
    if ends is None:
        return None
    first, last = ends
    if first - last >= EOS_DROP and last < EOS_FLOOR:
        return Diagnosis(
            "EOS rate collapsing",
            WARNING,
            f"the share of rollouts that end with EOS fell from {first:.0%} to {last:.0%}",
            "The policy learned to run to sample.max_new_tokens; a reward that favours long text does this. Penalise "
            "unfinished responses (reward.missing_eos_penalty), raise kl.coef, or check the reward model's length bias",
        )
    return None


def length_drift(records: Records) -> Diagnosis | None:
    ends = thirds(series(records, "rollout/response_length"))
    if ends is None or ends[0] <= 0:
        return None
    first, last = ends
    change = (last - first) / first
    if abs(change) >= LENGTH_DRIFT:
        return Diagnosis(
            "response length drifting",
            WARNING,
            f"the mean response length went from {first:.1f} to {last:.1f} tokens ({change:+.0%})",
            "Reward models often reward length; compare gold reward at matched length, raise kl.coef, or train the "
            "reward model on pairs balanced for length",
        )
    return None


def over_optimisation(records: Records) -> Diagnosis | None:
    proxy, gold = thirds(series(records, "objective/scores")), thirds(series(records, "gold/mean"))
    if proxy is None or gold is None:
        return None
    if proxy[1] > proxy[0] and gold[0] - gold[1] >= GOLD_DROP:
        return Diagnosis(
            "over-optimisation",
            PROBLEM,
            f"the reward model's score rose from {proxy[0]:+.3f} to {proxy[1]:+.3f} while the gold reward fell from "
            f"{gold[0]:+.3f} to {gold[1]:+.3f}",
            "The policy exploits the reward model (reward hacking): keep an earlier checkpoint, raise kl.coef, "
            "or improve the reward model (more pairs, a larger model)",
        )
    return None


def accuracy_near_chance(records: Records) -> Diagnosis | None:
    for key, what, consequence in (
        ("eval/accuracy", "reward model", "PPO against such a reward model optimises noise"),
        ("eval/rewards/accuracies", "DPO implicit reward", "the DPO policy has learned little of the preference"),
    ):
        finals = [r for r in records if isinstance(r.get(key), (int, float)) and f"{key}_low" in r]
        if not finals:
            continue
        final = finals[-1]
        if final[f"{key}_low"] <= 0.5:
            return Diagnosis(
                "accuracy near chance",
                WARNING,
                f"the {what}'s held-out accuracy is {final[key]:.1%} [{final[f'{key}_low']:.1%}, "
                f"{final[f'{key}_high']:.1%}], an interval that holds 50%",
                "It has not learned the preference beyond chance (more or cleaner pairs, more steps, or a larger "
                f"model would help); {consequence}",
            )
    return None


CHECKS: dict[str, Callable[[Records], Diagnosis | None]] = {
    "non-finite values": non_finite,
    "chosen log-probs falling": chosen_logps_falling,
    "KL out of range": kl_out_of_range,
    "EOS rate collapsing": eos_collapse,
    "response length drifting": length_drift,
    "over-optimisation": over_optimisation,
    "accuracy near chance": accuracy_near_chance,
}


def read_records(run: Path) -> Records:
    """A run's metrics.jsonl; NaN and Infinity are read as the floats they stand for."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{run}: no metrics.jsonl (is it a run folder, and has the run logged a step?)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise InputError(f"{path}: line {number} is not JSON") from None
    return records


def diagnose_runs(runs: list[str | Path]) -> dict[str, list[str]]:
    """Each run folder that has metrics -> its diagnoses as lines (for the comparison's report)."""
    return {
        str(run): [d.line() for d in diagnose(Path(run))] for run in runs if (Path(run) / "metrics.jsonl").is_file()
    }


def diagnose(run: Path) -> list[Diagnosis]:
    """Every known failure mode the run's metrics show, problems first."""
    records = read_records(run)
    found = [d for check in CHECKS.values() if (d := check(records)) is not None]
    return sorted(found, key=lambda d: d.severity != PROBLEM)
