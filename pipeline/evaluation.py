"""Sampling a policy on held-out prompts, scoring with the gold reward, and honest intervals.

Shared by the behaviour tests, `scripts/gold_eval.py` and the comparison: the same prompts, the
same sampling settings and the same seed for every policy, so differences are paired by prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.config import DataConfig, SampleConfig
from pipeline.data.tokenize import encode_prompt
from pipeline.sampling import generate


@dataclass
class Scored:
    prompts: list[str]
    completions: list[str]
    gold: list[float]

    @property
    def mean(self) -> float:
        return sum(self.gold) / len(self.gold)


@torch.no_grad()
def sample_and_score(
    model, tokenizer, prompts: Sequence[str], gold: Callable[[list[str]], list[float]],
    sample: SampleConfig, data: DataConfig, seed: int = 0, batch_size: int = 64,
) -> Scored:
    """One completion per prompt (the gold reward scores the completion alone)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        part = prompts[start : start + batch_size]
        out = generate(
            model, [encode_prompt(tokenizer, p, data) for p in part],
            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
            max_new_tokens=sample.max_new_tokens, temperature=sample.temperature, top_p=sample.top_p,
            generator=generator,
        )
        completions += tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    return Scored(list(prompts), completions, gold(completions))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over paired items, with a percentile bootstrap interval: (mean, low, high)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two equally long, non-empty lists")
    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples))
    tail = (1.0 - level) / 2.0
    low = means[int(tail * n_resamples)]
    high = means[min(n_resamples - 1, int((1.0 - tail) * n_resamples))]
    return sum(diffs) / n, low, high
