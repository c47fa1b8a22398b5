"""`rlhfdpo compare`: every policy on the same held-out prompts, scored the same way.

For each method (SFT, Best-of-N from SFT ranked by the reward model, and each DPO/PPO/PPO-GT run)
and each temperature: one completion per held-out prompt, its gold reward, the reward model's
score (the proxy), its length, the KL to the SFT model estimated from the sample, and
distinct-n over all completions. Win rates are per prompt (ties count half) with paired bootstrap
intervals over prompts: against SFT, against the dataset's own completion, and DPO against PPO.
The frontier puts every run and saved checkpoint at (KL, gold reward). report.py writes it all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.config import COMPARE_PROMPT_DATA, CompareConfig, ModelConfig, SampleConfig
from pipeline.data.builtin_sentiment import heldout_prompts_with_references
from pipeline.data.loading import load_prompts
from pipeline.data.records import DropLedger
from pipeline.doctor import diagnose_runs
from pipeline.evaluation import Scored, bootstrap_mean, distinct_n, kl_to_anchor, sample_and_score, win_indicators
from pipeline.judges import gold_reward
from pipeline.launch import init_distributed, shard
from pipeline.models import from_pretrained, load_tokenizer
from pipeline.runs import checkpoint_folders, prepare_output_dir
from pipeline.scoring import RewardModel, load_reward_model
from pipeline.training import seed_everything


@dataclass
class MethodSamples:
    """One method at one temperature: a completion per prompt and its scores, in prompt order."""

    name: str
    method: str
    temperature: float
    completions: list[str]
    gold: list[float]
    proxy: list[float] | None
    kl: list[float] | None  # KL(pi_T || SFT_T) per prompt at this temperature T; None at T = 0
    lengths: list[int]
    finished: list[bool]
    extra: dict = field(default_factory=dict)


OUTPUTS = ("report.md", "results.json", "samples.jsonl", "frontier.png", "win_rate_vs_temperature.png")


def run(cfg: CompareConfig, overwrite: bool = False) -> Path:
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    dist = init_distributed()
    prepare_output_dir(out_dir, dist, resume=False, overwrite=overwrite, produces=OUTPUTS)
    prompts, dataset_completions = held_out_prompts(cfg)
    gold = gold_reward(cfg.gold)
    dataset_gold = gold(dataset_completions)

    sft_path = Path(cfg.sft) / "model"
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(sft_path)))
    sft = shard(from_pretrained(AutoModelForCausalLM, sft_path, dtype=torch.float32), dist).eval()
    proxy = load_reward_model(Path(cfg.reward) / "model", "float32", dist) if cfg.reward is not None else None

    samples: list[MethodSamples] = []
    for temperature in cfg.temperatures:
        samples.append(sample_method(sft, "sft", "sft", temperature, prompts, tokenizer, gold, proxy, sft, cfg))
        best_of_n_here = temperature in (cfg.best_of_n_temperatures or [t for t in cfg.temperatures if t > 0])
        for n in cfg.best_of_n if best_of_n_here else []:  # N greedy samples are one sample N times
            samples.append(best_of_n(sft, n, temperature, prompts, tokenizer, gold, proxy, cfg))
    frontier = []
    for policy in cfg.policies:
        model = shard(from_pretrained(AutoModelForCausalLM, Path(policy.run) / "model", dtype=torch.float32), dist)
        model.eval()
        for temperature in cfg.temperatures:
            samples.append(
                sample_method(model, policy.name, policy.method, temperature, prompts, tokenizer, gold, proxy, sft, cfg)
            )
        for step, path in _checkpoints(Path(policy.run)) if cfg.checkpoints else []:
            checkpoint = shard(from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32), dist).eval()
            point = sample_method(
                checkpoint,
                policy.name,
                policy.method,
                cfg.frontier_temperature,
                prompts,
                tokenizer,
                gold,
                None,
                sft,
                cfg,
            )
            frontier.append(_frontier_point(point, step))
        final = next(s for s in samples if s.name == policy.name and s.temperature == cfg.frontier_temperature)
        frontier.append(_frontier_point(final, "final"))

    results = summarize(samples, dataset_gold, frontier, cfg)
    results["cost"] = collect_costs(cfg)
    results["prompts"] = {
        "count": len(prompts),
        "seed": cfg.prompt_seed,
        "dataset_gold_mean": sum(dataset_gold) / len(dataset_gold),
    }
    results["gold"] = getattr(gold, "name", cfg.gold)  # what actually scored (a classifier may fall back to vader)
    results["diagnoses"] = diagnose_runs(
        [cfg.sft, *([cfg.reward] if cfg.reward else []), *[p.run for p in cfg.policies]]
    )

    from pipeline.report import print_tables, write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _write_samples(out_dir / "samples.jsonl", samples, prompts)
    write_report(out_dir, results, cfg)
    print_tables(results)
    return out_dir


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
) -> MethodSamples:
    sample = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature)
    scored = sample_and_score(
        model, tokenizer, prompts, gold, sample, COMPARE_PROMPT_DATA, seed=cfg.seed, batch_size=cfg.batch_size
    )
    if temperature == 0:  # one greedy sequence is not a sample of anything: no KL
        kl = None
    elif model is sft:
        kl = [0.0] * len(prompts)
    else:
        kl = kl_to_anchor(model, sft, scored.sequences, tokenizer.pad_token_id, temperature)
    return MethodSamples(
        name=name,
        method=method,
        temperature=temperature,
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
    repeated = [p for p in prompts for _ in range(n)]
    sample = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=temperature)
    scored = sample_and_score(
        sft, tokenizer, repeated, gold, sample, COMPARE_PROMPT_DATA, seed=cfg.seed + n, batch_size=cfg.batch_size
    )
    ranks = proxy_scores(proxy, scored, cfg)
    picks = [max(range(i * n, (i + 1) * n), key=lambda j: ranks[j]) for i in range(len(prompts))]
    kl = math.log(n) - (n - 1) / n
    return MethodSamples(
        name=f"best-of-{n}",
        method="best_of_n",
        temperature=temperature,
        completions=[scored.completions[j] for j in picks],
        gold=[scored.gold[j] for j in picks],
        proxy=[ranks[j] for j in picks],
        kl=[kl] * len(prompts),
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
    samples: list[MethodSamples], dataset_gold: list[float], frontier: list[dict], cfg: CompareConfig
) -> dict:
    boot = {"n_resamples": cfg.bootstrap_resamples, "seed": cfg.seed}
    by_key = {(s.name, s.temperature): s for s in samples}
    rows = []
    for s in samples:
        baseline = by_key[("sft", s.temperature)]
        row = {
            "name": s.name,
            "method": s.method,
            "temperature": s.temperature,
            "gold": _interval(bootstrap_mean(s.gold, **boot)),
            "kl": sum(s.kl) / len(s.kl) if s.kl is not None else None,
            "length": sum(s.lengths) / len(s.lengths),
            "finished": sum(s.finished) / len(s.finished),
            "distinct_1": distinct_n(s.completions, 1),
            "distinct_2": distinct_n(s.completions, 2),
            "win_vs_dataset": _interval(bootstrap_mean(win_indicators(s.gold, dataset_gold), **boot)),
        }
        if s.name != "sft":
            row["win_vs_sft"] = _interval(bootstrap_mean(win_indicators(s.gold, baseline.gold), **boot))
            if s.proxy is not None and baseline.proxy is not None:
                row["proxy_win_vs_sft"] = _interval(bootstrap_mean(win_indicators(s.proxy, baseline.proxy), **boot))
        if s.proxy is not None:
            row["proxy"] = sum(s.proxy) / len(s.proxy)
        rows.append(row | s.extra)
    head_to_head = []
    dpo_names = [p.name for p in cfg.policies if p.method == "dpo"]
    ppo_names = [p.name for p in cfg.policies if p.method in ("ppo", "ppo_gt")]
    for temperature in cfg.temperatures:
        for a in dpo_names:
            for b in ppo_names:
                wins = win_indicators(by_key[(a, temperature)].gold, by_key[(b, temperature)].gold)
                head_to_head.append(
                    {
                        "dpo": a,
                        "ppo": b,
                        "temperature": temperature,
                        "dpo_win_rate": _interval(bootstrap_mean(wins, **boot)),
                    }
                )
    return {"methods": rows, "head_to_head": head_to_head, "frontier": frontier}


def _interval(stats: tuple[float, float, float]) -> dict:
    mean, low, high = stats
    return {"mean": mean, "low": low, "high": high}


def _frontier_point(s: MethodSamples, step) -> dict:
    return {
        "name": s.name,
        "method": s.method,
        "step": step,
        "kl": sum(s.kl) / len(s.kl),
        "gold": sum(s.gold) / len(s.gold),
    }


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
        cost = read(policy.run)
        if cost:
            needs = ["pairs"] + (["reward"] if policy.method == "ppo" else [])
            total = _cost_row(cost)["wall_s"] + sum(_cost_row(shared[n])["wall_s"] for n in needs if shared[n])
            rows.append(
                {
                    "name": policy.name,
                    "method": policy.method,
                    **_cost_row(cost),
                    "wall_s_with_inputs": total,
                    "inputs": needs,
                }
            )
    return rows


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


def _write_samples(path: Path, samples: list[MethodSamples], prompts: list[str]) -> None:
    with path.open("w") as handle:
        for s in samples:
            for i, prompt in enumerate(prompts):
                handle.write(
                    json.dumps(
                        {
                            "method": s.name,
                            "temperature": s.temperature,
                            "prompt": prompt,
                            "completion": s.completions[i],
                            "gold": s.gold[i],
                            "proxy": s.proxy[i] if s.proxy is not None else None,
                            "kl": s.kl[i] if s.kl is not None else None,
                            "length": s.lengths[i],
                            "finished": s.finished[i],
                        }
                    )
                    + "\n"
                )
