"""DPO's implicit reward read as a reward model, beside the explicit one, on the same held-out pairs.

A DPO policy defines r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) up to a term of the prompt alone
(DPO paper, Eq. 5), so it ranks the two responses of a pair as a reward model does. This asks how
well it does so where the reward model is judged: accuracy on the held-out pairs the DPO run
evaluated on, per Llama 2 rating level and per bin of the pair's gold-reward gap, and the rank
correlation between each pair's reward difference and its gold gap (a difference, because the
prompt's term cancels in it). The explicit reward model is scored on exactly the same pairs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from pipeline.config import RATING_LEVELS, DPOConfig, load_config
from pipeline.data.loading import load_pairs
from pipeline.data.records import DropLedger, PreferencePair
from pipeline.data.tokenize import TokenizedExample, tokenize_example
from pipeline.errors import InputError
from pipeline.evaluation import response_logps
from pipeline.stage_common import chat_renderer
from pipeline.uncertainty import Resampling

GAP_BINS = (0.5, 1.0, 2.0, 4.0)  # the reward stage's default bins, here of the gold gap


def held_out_pairs(dpo_run: Path, tokenizer) -> tuple[list[PreferencePair], list[TokenizedExample], DPOConfig]:
    """(pairs, their sides tokenized as the DPO run tokenized them: chosen then rejected per pair, its config)."""
    cfg: DPOConfig = load_config(DPOConfig, dpo_run / "config.yaml")
    _, pairs = load_pairs(cfg.data, DropLedger(strict=False), chat_renderer(tokenizer))
    sides = [
        tokenize_example(tokenizer, pair.prompt, response, cfg.data, done)
        for pair in pairs
        for response, done in ((pair.chosen, pair.chosen_finished), (pair.rejected, pair.rejected_finished))
    ]
    return pairs, sides, cfg


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN where either side is constant."""
    ra, rb = _ranks(torch.tensor(a, dtype=torch.float64)), _ranks(torch.tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(values)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    for value in torch.unique(values):  # ties: the mean of their ranks
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def reward_model_report(
    name: str,
    chosen: list[list[float]],
    rejected: list[list[float]],
    pairs: list[PreferencePair],
    resampling: Resampling,
) -> dict:
    """Accuracy (with its interval over seeds and pairs), per rating level and gold-gap bin, and rank
    correlation with the gold gap, of rewards given per seed (S, N) to each pair's two sides."""
    right = [[float(c > r) for c, r in zip(cs, rs)] for cs, rs in zip(chosen, rejected)]  # (S, N)
    by_rating: dict[str, list[float]] = defaultdict(list)
    by_gap: dict[str, list[float]] = defaultdict(list)
    edges = [0.0, *GAP_BINS, float("inf")]
    for i, pair in enumerate(pairs):
        mean_right = sum(seed[i] for seed in right) / len(right)
        by_rating[pair.rating or "unrated"].append(mean_right)
        gap = abs(pair.margin) if pair.margin is not None else None
        if gap is not None:
            lo, hi = next((lo, hi) for lo, hi in zip(edges, edges[1:]) if lo <= gap < hi)
            by_gap[f"[{lo:g}, {hi:g})"].append(mean_right)
    gaps = [pair.margin for pair in pairs]
    correlations = (
        [spearman([c - r for c, r in zip(cs, rs)], gaps) for cs, rs in zip(chosen, rejected)]
        if all(g is not None for g in gaps)
        else []
    )
    return {
        "name": name,
        "accuracy": resampling.interval(right, name),
        "by_rating": {
            level: {"accuracy": sum(v) / len(v), "pairs": len(v)}
            for level, v in sorted(by_rating.items(), key=lambda kv: _level_order(kv[0]))
        },
        "by_gap": {
            label: {"accuracy": sum(v) / len(v), "pairs": len(v)}
            for label, v in sorted(by_gap.items(), key=lambda kv: float(kv[0][1:].split(",")[0]))
        },
        "spearman_gold_gap": sum(correlations) / len(correlations) if correlations else None,
    }


def _level_order(level: str) -> int:
    return RATING_LEVELS.index(level) if level in RATING_LEVELS else len(RATING_LEVELS)


@torch.no_grad()
def compare_implicit_rewards(dpo_runs: dict[str, list[Path]], sft, proxy, tokenizer, cfg, load) -> dict | None:
    """The reward model and each DPO configuration's implicit reward (every seed) on the held-out
    pairs of the first DPO run: None where there is no DPO run or it held no pairs out."""
    if not dpo_runs:
        return None
    first = next(iter(dpo_runs.values()))[0]
    pairs, sides, first_cfg = held_out_pairs(first, tokenizer)
    if not pairs:
        return None
    resampling = Resampling(len(pairs), cfg.bootstrap_resamples, cfg.seed)
    pad = tokenizer.pad_token_id
    reference = response_logps(sft, sides, pad, batch_size=cfg.batch_size)
    models = []
    if proxy is not None:
        examples = proxy.examples(
            [p.prompt for p in pairs for _ in (0, 1)],
            [r for p in pairs for r in (p.chosen, p.rejected)],
            [f for p in pairs for f in (p.chosen_finished, p.rejected_finished)],
            None,
            first_cfg.data.max_prompt_length,
        )
        scores = proxy.score(examples, cfg.batch_size, next(proxy.head.parameters()).device).tolist()
        models.append(reward_model_report("reward model", [scores[0::2]], [scores[1::2]], pairs, resampling))
    for name, runs in dpo_runs.items():
        chosen, rejected = [], []
        for run in runs:
            _, own_sides, run_cfg = held_out_pairs(run, tokenizer)
            if [s.input_ids for s in own_sides] != [s.input_ids for s in sides]:
                raise InputError(
                    f"{run}: its held-out pairs are not those of {first}, so their implicit rewards would not compare; "
                    "compare DPO runs trained on the same pairs"
                )
            beta = run_cfg.loss.beta
            policy = response_logps(load(run / "model"), sides, pad, batch_size=cfg.batch_size)
            rewards = [beta * (p - r) for p, r in zip(policy, reference)]  # DPO paper, Eq. 5, up to beta log Z(x)
            chosen.append(rewards[0::2])
            rejected.append(rewards[1::2])
        models.append(reward_model_report(f"{name} (implicit)", chosen, rejected, pairs, resampling))
    return {"pairs": len(pairs), "source": str(first), "models": models}
