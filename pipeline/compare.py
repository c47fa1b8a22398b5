"""`rlhfdpo compare`: every policy on the same held-out prompts, scored the same way.

For each method (SFT, Best-of-N from SFT ranked by the reward model, and each DPO/PPO/PPO-GT run,
for each of its training seeds) and each temperature: `samples_per_prompt` completions per
held-out prompt, their gold reward, the reward model's score (the proxy), length, the KL to the
SFT model along each sample (the full next-token distributions of both models, at the sampling
temperature), and distinct-n. Every number is a mean over seeds and prompts with a two-way
bootstrap interval (pipeline/uncertainty.py). Win rates are per prompt (ties count half): against
SFT, against the dataset's own completion, and each DPO run against the PPO run of the nearest KL.
The frontier puts every run and saved checkpoint at (KL, gold reward), and for each two methods
says over which KL ranges one frontier lies above the other. report.py writes it all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.config import (
    COMPARE_PROMPT_DATA,
    EVALUATION_FILE,
    EVALUATIONS,
    CompareConfig,
    ModelConfig,
    PolicySpec,
    SampleConfig,
    evaluation_folder,
    to_dict,
)
from pipeline.console import console, plain
from pipeline.data.builtin_sentiment import heldout_prompts_with_references
from pipeline.data.loading import load_prompts
from pipeline.data.records import DropLedger
from pipeline.doctor import diagnose_runs
from pipeline.evaluation import Scored, distinct_n, kl_along_samples, sample_and_score, win_indicators
from pipeline.files import atomic_write
from pipeline.implicit_reward import compare_implicit_rewards
from pipeline.judges import gold_reward
from pipeline.launch import init_distributed, shard
from pipeline.models import from_pretrained, load_tokenizer
from pipeline.reference import folder_digest
from pipeline.runs import checkpoint_folders, prepare_output_dir
from pipeline.scoring import RewardModel, load_reward_model
from pipeline.training import seed_everything
from pipeline.uncertainty import FrontierRun, Resampling, frontier_difference, per_prompt


@dataclass
class MethodSamples:
    """One method, one training seed, one temperature: K completions per prompt (prompt-major) and their scores."""

    name: str
    method: str
    temperature: float
    seed: int
    completions: list[str]
    gold: list[float]
    proxy: list[float] | None
    kl: list[float] | None  # KL(pi_T || SFT_T) along each sample at this temperature T; None at T = 0
    lengths: list[int]
    finished: list[bool]
    step: int | str = "final"  # a checkpoint's step, for frontier points
    extra: dict = field(default_factory=dict)


OUTPUTS = ("report.md", "report.html", "results.json", "samples.jsonl", "frontier.png", "win_rate_vs_temperature.png")
# Bump when a change to sampling or scoring makes earlier cached evaluations wrong.
EVALUATION_VERSION = 1
# The settings an evaluation's samples and scores depend on (the rest only shape the report).
SAMPLING_SETTINGS = (
    "best_of_n",
    "best_of_n_temperatures",
    "num_prompts",
    "prompt_seed",
    "prompt_data",
    "temperatures",
    "frontier_temperature",
    "checkpoints",
    "max_new_tokens",
    "gold",
    "batch_size",
    "seed",
    "samples_per_prompt",
)


def run(cfg: CompareConfig, overwrite: bool = False) -> Path:
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    dist = init_distributed()
    prepare_output_dir(out_dir, dist, resume=False, overwrite=overwrite, produces=OUTPUTS, reads=(EVALUATIONS,))
    evaluator = Evaluator(cfg, dist)
    prompts, tokenizer, sft, proxy = evaluator.prompts, evaluator.tokenizer, evaluator.sft, evaluator.proxy
    dataset_gold = evaluator.gold(evaluator.dataset_completions)

    samples = evaluator.baselines()
    checkpoints: list[MethodSamples] = []
    for policy in cfg.policies:
        for seed in cfg.seeds:
            for evaluated in evaluator.policy_run(policy, seed):
                (samples if evaluated.step == "final" else checkpoints).append(evaluated)

    results = summarize(samples, checkpoints, dataset_gold, cfg)
    dpo_runs = {p.name: [Path(p.run_for(s)) for s in cfg.seeds] for p in cfg.policies if p.method == "dpo"}
    results["implicit_reward"] = compare_implicit_rewards(dpo_runs, sft, proxy, tokenizer, cfg, evaluator.load)
    results["cost"] = collect_costs(cfg)
    results["prompts"] = {
        "count": len(prompts),
        "seed": cfg.prompt_seed,
        "samples_per_prompt": cfg.samples_per_prompt,
        "dataset_gold_mean": sum(dataset_gold) / len(dataset_gold),
    }
    results["seeds"] = cfg.seeds
    # what actually scored (a classifier may fall back to vader)
    results["gold"] = getattr(evaluator.gold, "name", cfg.gold)
    results["diagnoses"] = diagnose_runs(
        [cfg.sft, *([cfg.reward] if cfg.reward else []), *[p.run_for(s) for p in cfg.policies for s in cfg.seeds]]
    )

    from pipeline.report import print_tables, write_report
    from pipeline.report_html import browsed_samples, write_html

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _write_samples(out_dir / "samples.jsonl", samples, prompts, cfg.samples_per_prompt)
    write_report(out_dir, results, cfg)
    browser = browsed_samples(samples, prompts, cfg.frontier_temperature, cfg.samples_per_prompt)
    write_html(out_dir, results, browser, cfg.temperatures)
    print_tables(results)
    return out_dir


# ------------------------------------------------------------------------------------- evaluations


class Evaluator:
    """The held-out prompts, gold reward, SFT model and reward model every evaluation uses, and the
    evaluations themselves: each unit (the SFT baselines, or one policy's run for one seed) is kept in
    output_dir/evaluations/<unit>/evaluation.json under a key that hashes every model it read and
    every sampling setting, so `rlhfdpo evaluate` can run it early and the compare reuses it."""

    def __init__(self, cfg: CompareConfig, dist):
        self.cfg, self.dist = cfg, dist
        self.prompts, self.dataset_completions = held_out_prompts(cfg)
        self.gold = gold_reward(cfg.gold)
        sft_path = Path(cfg.sft) / "model"
        self.tokenizer = load_tokenizer(ModelConfig(name_or_path=str(sft_path)))
        self.sft = self.load(sft_path)
        self.proxy = load_reward_model(Path(cfg.reward) / "model", "float32", dist) if cfg.reward is not None else None
        settings = {name: getattr(cfg, name) for name in SAMPLING_SETTINGS}
        self._common = {
            "version": EVALUATION_VERSION,
            "settings": json.loads(json.dumps(settings, default=lambda o: to_dict(o))),
            "sft": folder_digest(str(sft_path)),
            "reward": folder_digest(str(Path(cfg.reward) / "model")) if cfg.reward is not None else None,
            "gold": getattr(self.gold, "name", cfg.gold),
        }

    def load(self, path: Path):
        return shard(from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32), self.dist).eval()

    def baselines(self) -> list[MethodSamples]:
        """SFT at every temperature, and Best-of-N from it where the config asks."""
        cfg = self.cfg

        def evaluate() -> list[MethodSamples]:
            out = []
            for temperature in cfg.temperatures:
                out.append(self._sample(self.sft, "sft", "sft", temperature, self.proxy))
                best_of_n_here = temperature in (cfg.best_of_n_temperatures or [t for t in cfg.temperatures if t > 0])
                for n in cfg.best_of_n if best_of_n_here else []:  # N greedy samples are one sample N times
                    out.append(
                        best_of_n(self.sft, n, temperature, self.prompts, self.tokenizer, self.gold, self.proxy, cfg)
                    )
            return out

        return self._cached(evaluation_folder(cfg.output_dir, "sft", None), {"unit": "sft"}, evaluate)

    def policy_run(self, policy: PolicySpec, seed: int) -> list[MethodSamples]:
        """One policy's run for one training seed: its final model at every temperature, then each saved
        checkpoint at the frontier temperature (step set to the checkpoint's)."""
        cfg = self.cfg
        run_dir = Path(policy.run_for(seed))
        steps = _checkpoints(run_dir) if cfg.checkpoints else []
        models = {"final": folder_digest(str(run_dir / "model"))} | {str(s): folder_digest(str(p)) for s, p in steps}

        def evaluate() -> list[MethodSamples]:
            model = self.load(run_dir / "model")
            out = [self._sample(model, policy.name, policy.method, t, self.proxy, seed) for t in cfg.temperatures]
            del model
            for step, path in steps:
                point = self._sample(self.load(path), policy.name, policy.method, cfg.frontier_temperature, None, seed)
                point.step = step
                out.append(point)
            return out

        unit = {"unit": policy.name, "method": policy.method, "seed": seed, "models": models}
        return self._cached(evaluation_folder(cfg.output_dir, policy.name, seed), unit, evaluate)

    def _sample(self, model, name, method, temperature, proxy, seed: int = 0) -> MethodSamples:
        return sample_method(
            model, name, method, temperature, self.prompts, self.tokenizer, self.gold, proxy, self.sft, self.cfg, seed
        )

    def _cached(self, folder: Path, unit: dict, evaluate) -> list[MethodSamples]:
        """The unit's evaluation from its folder when its key matches, else evaluated now and kept there."""
        key = hashlib.sha256(json.dumps(self._common | unit, sort_keys=True).encode()).hexdigest()[:24]
        path = folder / EVALUATION_FILE
        if path.is_file():
            try:
                held = json.loads(path.read_text())
                if held.get("key") == key:
                    console.print(f"reused the evaluation in {plain(path)}")
                    return [MethodSamples(**s) for s in held["samples"]]
            except (ValueError, TypeError, KeyError):  # a torn or foreign file: evaluated again
                pass
        evaluated = evaluate()
        if self.dist.is_main:
            text = json.dumps({"key": key, **unit, "samples": [dataclasses.asdict(s) for s in evaluated]})
            atomic_write(path, lambda staging: Path(staging).write_text(text))
        return evaluated


# --------------------------------------------------------------------------------------- sampling


def held_out_prompts(cfg: CompareConfig) -> tuple[list[str], list[str]]:
    """(prompts, the dataset's own completions): built-in held-out prompts, or a data section's eval split."""
    if cfg.prompt_data is None:
        pairs = heldout_prompts_with_references(cfg.num_prompts, cfg.prompt_seed)
    else:
        _, evaluation = load_prompts(cfg.prompt_data, DropLedger(cfg.prompt_data.strict))
        distinct = {record.prompt: record.reference or "" for record in evaluation}
        pairs = list(distinct.items())[: cfg.num_prompts]
    return [p for p, _ in pairs], [r for _, r in pairs]


@torch.no_grad()
def sample_method(
    model,
    name: str,
    method: str,
    temperature: float,
    prompts: list[str],
    tokenizer,
    gold,
    proxy,
    sft,
    cfg: CompareConfig,
    seed: int = 0,
) -> MethodSamples:
    sample = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature)
    repeated = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    # One sampling seed for every method and training seed: the samples of two methods pair by prompt.
    scored = sample_and_score(
        model, tokenizer, repeated, gold, sample, COMPARE_PROMPT_DATA, seed=cfg.seed, batch_size=cfg.batch_size
    )
    if temperature == 0:  # one greedy sequence is not a sample of anything: no KL
        kl = None
    elif model is sft:
        kl = [0.0] * len(repeated)
    else:
        kl = kl_along_samples(model, sft, scored.sequences, tokenizer.pad_token_id, temperature)
    return MethodSamples(
        name=name,
        method=method,
        temperature=temperature,
        seed=seed,
        completions=scored.completions,
        gold=scored.gold,
        proxy=proxy_scores(proxy, scored, cfg) if proxy is not None else None,
        kl=kl,
        lengths=[len(s.input_ids) - s.prompt_length for s in scored.sequences],
        finished=scored.finished,
    )


def best_of_n(
    sft, n: int, temperature: float, prompts: list[str], tokenizer, gold, proxy, cfg: CompareConfig
) -> MethodSamples:
    """N samples per prompt from the SFT model; the one the reward model ranks highest is kept.

    Its KL to the SFT model is the analytic log N - (N - 1) / N (Stiennon et al. 2020, App. G.3): an
    upper bound, exact only when no two samples tie (over few distinct outcomes it is well above the KL).
    """
    repeated = [p for p in prompts for _ in range(n * cfg.samples_per_prompt)]
    sample = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature)
    scored = sample_and_score(
        sft, tokenizer, repeated, gold, sample, COMPARE_PROMPT_DATA, seed=cfg.seed + n, batch_size=cfg.batch_size
    )
    ranks = proxy_scores(proxy, scored, cfg)
    groups = len(repeated) // n
    picks = [max(range(i * n, (i + 1) * n), key=lambda j: ranks[j]) for i in range(groups)]
    kl = math.log(n) - (n - 1) / n
    return MethodSamples(
        name=f"best-of-{n}",
        method="best_of_n",
        temperature=temperature,
        seed=0,
        completions=[scored.completions[j] for j in picks],
        gold=[scored.gold[j] for j in picks],
        proxy=[ranks[j] for j in picks],
        kl=[kl] * groups,
        lengths=[len(scored.sequences[j].input_ids) - scored.sequences[j].prompt_length for j in picks],
        finished=[scored.finished[j] for j in picks],
        extra={"n": n},
    )


def proxy_scores(proxy: RewardModel, scored: Scored, cfg: CompareConfig) -> list[float]:
    """The reward model's score of each prompt + completion, exactly as PPO scores a rollout."""
    examples = proxy.examples(
        scored.prompts, scored.completions, scored.finished, None, COMPARE_PROMPT_DATA.max_prompt_length
    )
    return proxy.score(examples, cfg.batch_size, next(proxy.head.parameters()).device).tolist()


# ----------------------------------------------------------------------------------------- stats


def summarize(
    samples: list[MethodSamples], checkpoints: list[MethodSamples], dataset_gold: list[float], cfg: CompareConfig
) -> dict:
    """Every table of the report: each cell a mean over seeds and prompts with its interval."""
    k = cfg.samples_per_prompt
    resampling = Resampling(len(dataset_gold), cfg.bootstrap_resamples, cfg.seed)
    groups: dict[tuple[str, float], list[MethodSamples]] = {}
    for s in samples:
        groups.setdefault((s.name, s.temperature), []).append(s)

    def table(per_run: list[list[float]]) -> list[list[float]]:
        """(S, P) from each seed's values of its P * K samples: per prompt, the mean over its K samples."""
        return [per_prompt(values, k) for values in per_run]

    rows = []
    for (name, temperature), runs in groups.items():
        first = runs[0]
        sft = groups[("sft", temperature)][0]
        key = f"{name}@{temperature:g}"
        dataset = [g for g in dataset_gold for _ in range(k)]
        row = {
            "name": name,
            "method": first.method,
            "temperature": temperature,
            "seeds": [r.seed for r in runs],
            "gold": resampling.interval(table([r.gold for r in runs]), key),
            "kl": resampling.interval(table([r.kl for r in runs]), key) if first.kl is not None else None,
            "length": _mean([x for r in runs for x in r.lengths]),
            "finished": _mean([float(x) for r in runs for x in r.finished]),
            "distinct_1": _mean([distinct_n(r.completions, 1) for r in runs]),
            "distinct_2": _mean([distinct_n(r.completions, 2) for r in runs]),
            "win_vs_dataset": resampling.interval(table([win_indicators(r.gold, dataset) for r in runs]), key),
        }
        if name != "sft":
            row["win_vs_sft"] = resampling.interval(table([win_indicators(r.gold, sft.gold) for r in runs]), key)
            if first.proxy is not None and sft.proxy is not None:
                row["proxy_win_vs_sft"] = resampling.interval(
                    table([win_indicators(r.proxy, sft.proxy) for r in runs]), key
                )
        if first.proxy is not None:
            row["proxy"] = resampling.interval(table([r.proxy for r in runs]), key)
        rows.append(row | first.extra)

    frontier_runs = _frontier_runs(groups, checkpoints, cfg, table, resampling)
    frontier = [point for run in frontier_runs.values() for point in run["points"]]
    verdicts = []
    methods = list(dict.fromkeys(p.method for p in cfg.policies))
    for a, b in combinations(methods, 2):
        runs_a = [r["run"] for r in frontier_runs.values() if r["run"].method == a]
        runs_b = [r["run"] for r in frontier_runs.values() if r["run"].method == b]
        difference = frontier_difference(runs_a, runs_b, resampling)
        verdicts.append({"a": a, "b": b, **(difference or {"grid": [], "ranges": []})})
    return {
        "methods": rows,
        "head_to_head": head_to_head(groups, rows, cfg, resampling, table),
        "frontier": frontier,
        "frontier_verdicts": verdicts,
        "bootstrap": {
            "resamples": cfg.bootstrap_resamples,
            "method": "two-way percentile bootstrap: seeds and prompts drawn with replacement, "
            "the same prompt draw for every method",
        },
    }


def _frontier_runs(
    groups, checkpoints: list[MethodSamples], cfg: CompareConfig, table, resampling: Resampling
) -> dict[str, dict]:
    """Per policy: its frontier points (checkpoints, then the final model) at the frontier temperature,
    each with intervals on both axes and its per-seed means, and the FrontierRun the verdicts resample."""
    out = {}
    for policy in cfg.policies:
        mine = [c for c in checkpoints if c.name == policy.name]
        steps = sorted({c.step for c in mine}) + ["final"]
        run = FrontierRun(key=policy.name, method=policy.method, kl=[], gold=[])
        points = []
        for step in steps:
            runs = (
                [c for c in mine if c.step == step]
                if step != "final"
                else groups[(policy.name, cfg.frontier_temperature)]
            )
            kl = torch.tensor(table([r.kl for r in runs]), dtype=torch.float64)
            gold = torch.tensor(table([r.gold for r in runs]), dtype=torch.float64)
            run.kl.append(kl)
            run.gold.append(gold)
            points.append(
                {
                    "name": policy.name,
                    "method": policy.method,
                    "step": step,
                    "kl": resampling.interval(kl, policy.name),
                    "gold": resampling.interval(gold, policy.name),
                }
            )
        out[policy.name] = {"run": run, "points": points}
    return out


def head_to_head(groups, rows: list[dict], cfg: CompareConfig, resampling: Resampling, table) -> list[dict]:
    """Each DPO run against the PPO run whose KL (at the frontier temperature) is nearest to its own.

    Seeds pair by position (DPO's first seed against PPO's first, ...); prompts pair as always.
    """
    kl_of = {r["name"]: r["kl"] for r in rows if r["temperature"] == cfg.frontier_temperature}
    dpo = [p.name for p in cfg.policies if p.method == "dpo"]
    ppo = [p.name for p in cfg.policies if p.method == "ppo"]
    out = []
    for a in dpo:
        if not ppo:
            break
        b = min(ppo, key=lambda name: abs(kl_of[name]["mean"] - kl_of[a]["mean"]))
        overlap = kl_of[a]["low"] <= kl_of[b]["high"] and kl_of[b]["low"] <= kl_of[a]["high"]
        for temperature in cfg.temperatures:
            runs_a, runs_b = groups[(a, temperature)], groups[(b, temperature)]
            wins = [win_indicators(x.gold, y.gold) for x, y in zip(runs_a, runs_b)]
            out.append(
                {
                    "dpo": a,
                    "ppo": b,
                    "temperature": temperature,
                    "dpo_kl": kl_of[a],
                    "ppo_kl": kl_of[b],
                    "kl_intervals_overlap": overlap,
                    "dpo_win_rate": resampling.interval(table(wins), f"{a}-{b}"),
                }
            )
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    return [
        (step, path / "model") for step, path in checkpoint_folders(run / "checkpoints") if (path / "model").is_dir()
    ]


# ------------------------------------------------------------------------------------------ cost


def collect_costs(cfg: CompareConfig) -> list[dict]:
    """Each run's cost.json; RLHF methods also pay for the pairs and the reward model."""

    def read(run: str | None) -> dict | None:
        path = Path(run) / "cost.json" if run else None
        return json.loads(path.read_text()) if path and path.is_file() else None

    pairs_run = str(Path(cfg.sft).parent / "pairs")
    shared = {"sft": read(cfg.sft), "pairs": read(pairs_run), "reward": read(cfg.reward)}
    rows = [{"name": name, "method": name, **_cost_row(cost)} for name, cost in shared.items() if cost]
    for policy in cfg.policies:
        per_seed = [_cost_row(cost) for cost in (read(policy.run_for(seed)) for seed in cfg.seeds) if cost]
        if not per_seed:
            continue
        cost = {key: _mean_or_none([c[key] for c in per_seed]) for key in per_seed[0]}  # one seed's run, on average
        needs = SHARED_INPUTS[policy.method]
        own = [read(run.replace("{seed}", str(seed))) for run in policy.inputs for seed in cfg.seeds]
        own_wall = sum(c["wall_s"] for c in own if c) / len(cfg.seeds)
        total = cost["wall_s"] + own_wall + sum(_cost_row(shared[n])["wall_s"] for n in needs if shared[n])
        rows.append(
            {
                "name": policy.name,
                "method": policy.method,
                **cost,
                "seeds": len(per_seed),
                "wall_s_with_inputs": total,
                "inputs": needs + policy.inputs,
            }
        )
    return rows


# The shared runs each method needs: every method but PPO-GT reads the reward model or the pairs.
SHARED_INPUTS = {
    "dpo": ["pairs"],
    "ppo": ["pairs", "reward"],
    "ppo_shared": ["pairs", "reward"],
    "rloo": ["pairs", "reward"],
    "grpo": ["pairs", "reward"],
    "rs": ["pairs", "reward"],
    "online_dpo": ["pairs", "reward"],
    "ppo_gt": [],
}


def _mean_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def _cost_row(cost: dict) -> dict:
    return {
        "wall_s": cost["wall_s"],
        "cpu_s": cost.get("cpu_s"),  # runs written before CPU time was measured have none
        "flops": sum(cost["flops"].values()) if "flops" in cost else None,
        "peak_rss_mb": cost["peak_rss_mb"],
        "peak_gpu_mb": cost.get("peak_gpu_mb"),  # runs on a GPU only
        "tokens": sum(cost["tokens"].values()),
        "forward_passes": sum(cost["forward_passes"].values()),
    }


def _write_samples(path: Path, samples: list[MethodSamples], prompts: list[str], samples_per_prompt: int) -> None:
    with path.open("w") as handle:
        for s in samples:
            for i, completion in enumerate(s.completions):
                handle.write(
                    json.dumps(
                        {
                            "method": s.name,
                            "seed": s.seed,
                            "temperature": s.temperature,
                            "prompt": prompts[i // samples_per_prompt],
                            "completion": completion,
                            "gold": s.gold[i],
                            "proxy": s.proxy[i] if s.proxy is not None else None,
                            "kl": s.kl[i] if s.kl is not None else None,
                            "length": s.lengths[i],
                            "finished": s.finished[i],
                        }
                    )
                    + "\n"
                )
