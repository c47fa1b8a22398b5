"""Intervals for an experiment of several training seeds on the same prompts, and frontier verdicts.

Every number of the comparison is a mean over seeds (independent training runs) and prompts. Its
interval comes from a two-way bootstrap: each resample draws the seeds with replacement and the
prompts with replacement, and takes the mean over the drawn (seed, prompt) cells. The prompt draw
is the same for every method and run of one resample, so a comparison between methods stays
paired by prompt; a run's seed draw is its own (its seeds are independent of another run's) but is
the same for every quantity of that run (KL and gold of one frontier point move together). With
one seed it is the ordinary percentile bootstrap over prompts. Three seeds are few: the seed part
of the interval is itself uncertain, which the report says where it matters.

Shapes: S seeds, P prompts, R resamples, N frontier points, G grid points.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

NO_DIFFERENCE = "no difference the data supports"


@dataclass
class Resampling:
    """R bootstrap draws of prompts (shared by everything) and of seeds (per run, by its key)."""

    n_prompts: int
    n_resamples: int = 1000
    seed: int = 0
    level: float = 0.95
    _prompt_draws: torch.Tensor | None = field(default=None, repr=False)

    @property
    def prompt_draws(self) -> torch.Tensor:
        """(R, P) prompt indices, drawn once."""
        if self._prompt_draws is None:
            generator = torch.Generator().manual_seed(self.seed)
            self._prompt_draws = torch.randint(self.n_prompts, (self.n_resamples, self.n_prompts), generator=generator)
        return self._prompt_draws

    def seed_draws(self, n_seeds: int, key: str) -> torch.Tensor:
        """(R, S) seed indices for the run named `key`: the same every time that run is resampled."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        return torch.randint(n_seeds, (self.n_resamples, n_seeds), generator=generator)

    def replicates(self, values: Sequence[Sequence[float]] | torch.Tensor, key: str) -> torch.Tensor:
        """(R,) resampled means of per-(seed, prompt) values (S, P)."""
        table = _table(values, self.n_prompts)
        n_seeds = table.shape[0]
        by_seed = table[self.seed_draws(n_seeds, key)]  # (R, S, P)
        prompts = self.prompt_draws[:, None, :].expand(-1, n_seeds, -1)  # (R, S, P)
        return by_seed.gather(2, prompts).mean(dim=(1, 2))

    def interval(self, values: Sequence[Sequence[float]] | torch.Tensor, key: str) -> dict:
        """{mean, low, high, per_seed}: the mean over seeds and prompts, its percentile interval,
        and each seed's own mean over prompts."""
        table = _table(values, self.n_prompts)
        low, high = self.bounds(self.replicates(table, key))
        return {"mean": float(table.mean()), "low": low, "high": high, "per_seed": table.mean(dim=1).tolist()}

    def bounds(self, replicates: torch.Tensor) -> tuple[float, float]:
        tail = (1.0 - self.level) / 2.0
        finite = replicates[torch.isfinite(replicates)]
        if finite.numel() == 0:
            return float("nan"), float("nan")
        return float(torch.quantile(finite, tail)), float(torch.quantile(finite, 1.0 - tail))


def _table(values, n_prompts: int) -> torch.Tensor:
    table = torch.as_tensor(values, dtype=torch.float64)
    if table.dim() != 2 or table.shape[1] != n_prompts or table.shape[0] == 0:
        raise ValueError(f"expected per-(seed, prompt) values of shape (S, {n_prompts}), got {tuple(table.shape)}")
    return table


def per_prompt(values: Sequence[float], samples_per_prompt: int) -> list[float]:
    """The mean of each prompt's consecutive samples: P * K values -> P."""
    k = samples_per_prompt
    if len(values) % k:
        raise ValueError(f"{len(values)} values are not {k} samples for each prompt")
    return [sum(values[i : i + k]) / k for i in range(0, len(values), k)]


# ------------------------------------------------------------------------------------ frontiers


def envelope(kl: torch.Tensor, gold: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The upper envelope of points (kl, gold), each (N,), evaluated at `grid` (G,): (G,).

    It runs through the Pareto points (those no point of lower KL beats on gold reward), linearly
    between them, and stays at the best gold reward from there up to the highest KL of any point:
    the most gold reward the method reached within a KL budget. NaN outside [lowest KL, highest KL].
    """
    order = torch.argsort(kl)
    kl, gold = kl[order].double(), gold[order].double()
    best_before = torch.cummax(gold, dim=0).values
    pareto = torch.ones_like(gold, dtype=torch.bool)
    pareto[1:] = gold[1:] > best_before[:-1]
    px, py = kl[pareto], gold[pareto]
    grid = grid.double()
    out = torch.full_like(grid, float("nan"))
    out[(grid >= px[-1]) & (grid <= kl[-1])] = py[-1]
    if px.numel() > 1:
        inside = (grid >= px[0]) & (grid < px[-1])
        right = torch.searchsorted(px, grid[inside], right=True).clamp(1, px.numel() - 1)
        x0, x1, y0, y1 = px[right - 1], px[right], py[right - 1], py[right]
        out[inside] = y0 + (y1 - y0) * (grid[inside] - x0) / (x1 - x0)
    return out


def _clamped_envelope(kl: torch.Tensor, gold: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """envelope() with grid points beyond the points' KL range moved to its nearest end: a resampled
    frontier that ends a little short of a grid point still speaks for it."""
    return envelope(kl, gold, grid.clamp(float(kl.min()), float(kl.max())))


@dataclass
class FrontierRun:
    """One trained configuration's points on the frontier: its checkpoints and final model, each
    with per-(seed, prompt) KL and gold values (S, P). `key` names the run for its seed draws."""

    key: str
    method: str
    kl: list[torch.Tensor]
    gold: list[torch.Tensor]


def frontier_difference(
    a: list[FrontierRun], b: list[FrontierRun], resampling: Resampling, grid_size: int = 25
) -> dict | None:
    """Gold reward of A's frontier minus B's at matched KL, over their common KL range.

    Returns {grid: [{kl, mean, low, high, verdict}], ranges: [{from, to, verdict}]}, or None where
    the two frontiers share no KL range. The estimate is on the point estimates, on a grid over the
    KL range both frontiers reach; the interval comes from the frontiers of the resampled points.
    """
    estimate_a = _points(a, lambda values, key: values.mean())
    estimate_b = _points(b, lambda values, key: values.mean())
    low = max(estimate_a[0].min(), estimate_b[0].min())
    high = min(estimate_a[0].max(), estimate_b[0].max())
    if not low < high:
        return None
    grid = torch.linspace(float(low), float(high), grid_size, dtype=torch.float64)
    estimate = envelope(*estimate_a, grid) - envelope(*estimate_b, grid)
    replicate_a = _points(a, lambda values, key: resampling.replicates(values, key))  # (N, R) each
    replicate_b = _points(b, lambda values, key: resampling.replicates(values, key))
    differences = torch.stack(
        [
            _clamped_envelope(replicate_a[0][:, r], replicate_a[1][:, r], grid)
            - _clamped_envelope(replicate_b[0][:, r], replicate_b[1][:, r], grid)
            for r in range(resampling.n_resamples)
        ]
    )  # (R, G)
    rows = []
    for g in range(grid_size):
        lo, hi = resampling.bounds(differences[:, g])
        rows.append(
            {"kl": float(grid[g]), "mean": float(estimate[g]), "low": lo, "high": hi, "verdict": _verdict(lo, hi)}
        )
    return {"grid": rows, "ranges": verdict_ranges(rows)}


def _points(runs: list[FrontierRun], reduce) -> tuple[torch.Tensor, torch.Tensor]:
    kl = [reduce(values, run.key) for run in runs for values in run.kl]
    gold = [reduce(values, run.key) for run in runs for values in run.gold]
    return torch.stack(kl), torch.stack(gold)


def _verdict(low: float, high: float) -> str:
    if low > 0:
        return "above"
    if high < 0:
        return "below"
    return NO_DIFFERENCE


def verdict_ranges(rows: list[dict]) -> list[dict]:
    """Consecutive grid points of the same verdict merged: [{from, to, verdict}]."""
    ranges: list[dict] = []
    for row in rows:
        if ranges and ranges[-1]["verdict"] == row["verdict"]:
            ranges[-1]["to"] = row["kl"]
        else:
            ranges.append({"from": row["kl"], "to": row["kl"], "verdict": row["verdict"]})
    return ranges


def verdict_sentence(name_a: str, name_b: str, verdict: str) -> str:
    if verdict == "above":
        return f"{name_a} above {name_b}"
    if verdict == "below":
        return f"{name_b} above {name_a}"
    return NO_DIFFERENCE
