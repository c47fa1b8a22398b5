"""`rlhfdpo data pairs`: preference pairs from a policy and a gold reward (the DPO paper's IMDb recipe).

Sample k completions per prompt from the SFT model, score each with the gold reward, and pair them:
all k(k-1)/2 pairs or best-vs-worst. With `reward_model`, a reward model labels them instead (the
gold reward is still recorded): best-vs-worst then gives Llama 2's rejection-sampling data (SFT
trains on the chosen side), and pairs sampled from the current policy give online DPO's. Ties are dropped and counted. Each pair carries its raw score
gap (`margin`) and a Llama 2 rating level derived from it, so the reward model's margin loss and
its per-level accuracy table have something to read. The output is ordinary prompt/chosen/rejected
JSONL that every stage reads like any other dataset.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path

import torch

from pipeline.config import RATING_LEVELS, PairingConfig, PairsConfig, write_resolved
from pipeline.console import console, plain
from pipeline.cost import CostMeter
from pipeline.data.loading import load_prompts
from pipeline.data.records import DropLedger, PromptRecord
from pipeline.data.tokenize import encode_prompt
from pipeline.files import write_jsonl
from pipeline.judges import gold_reward
from pipeline.launch import broadcast_object, close_distributed, init_distributed, shard
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.runs import prepare_output_dir
from pipeline.sampling import sample
from pipeline.scoring import RewardModel, load_reward_model
from pipeline.stage_common import chat_renderer, gather_by_index, report_drops, shard_batches
from pipeline.training import StepProgress, seed_everything


def rating_level(gap: float, thresholds: list[float]) -> str:
    """The Llama 2 level of a score gap: thresholds are the smallest gaps of the top three levels."""
    for level, threshold in zip(RATING_LEVELS, thresholds):
        if gap >= threshold:
            return level
    return RATING_LEVELS[-1]


def make_pairs(
    prompt: str, completions: list[str], scores: list[float], pairing: PairingConfig, finished: list[bool] | None = None
) -> tuple[list[dict], int]:
    """Pairs of one prompt's completions, higher score chosen; returns (pairs, ties dropped).

    `finished` says which completions ended with EOS; each pair records it for both sides, so that
    training appends EOS exactly where the sampler produced one.
    """
    finished = finished if finished is not None else [True] * len(completions)
    candidates = list(zip(completions, scores, finished))
    if pairing.strategy == "best_vs_worst":
        ranked = sorted(candidates, key=lambda c: c[1])
        candidate_pairs = [(ranked[-1], ranked[0])]
    else:
        candidate_pairs = [(a, b) if a[1] >= b[1] else (b, a) for a, b in combinations(candidates, 2)]
    pairs, ties = [], 0
    for (chosen, chosen_score, chosen_done), (rejected, rejected_score, rejected_done) in candidate_pairs:
        gap = chosen_score - rejected_score
        if gap < pairing.min_gap or (chosen, chosen_done) == (rejected, rejected_done):
            ties += 1
            continue
        pairs.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "margin": gap,
                "rating": rating_level(gap, pairing.rating_thresholds),
                "chosen_score": chosen_score,
                "rejected_score": rejected_score,
                "chosen_finished": chosen_done,
                "rejected_finished": rejected_done,
            }
        )
    return pairs, ties


OUTPUTS = ("train.jsonl", "test.jsonl", "summary.json", "README.md", "config.yaml", "cost.json")


def run(cfg: PairsConfig, overwrite: bool = False) -> Path:
    dist = init_distributed()
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    prepare_output_dir(out_dir, dist, resume=False, overwrite=overwrite, produces=OUTPUTS)
    meter = CostMeter(dist)

    # ---- load: prompts, tokenizer, gold reward, model
    ledger = DropLedger(cfg.data.strict)
    tokenizer = load_tokenizer(cfg.model)
    train_prompts, eval_prompts = load_prompts(cfg.data, ledger, chat_renderer(tokenizer))
    report_drops(ledger, dist)
    splits = {
        "train": _distinct(train_prompts)[: cfg.num_train_prompts],
        "test": _distinct(eval_prompts)[: cfg.num_eval_prompts],
    }
    gold = gold_reward(cfg.gold_reward)
    model = meter.watch(shard(load_causal_lm(cfg.model), dist, cfg.model.dtype), "policy")
    model.eval()
    reward_model = load_reward_model(cfg.reward_model, "float32", dist) if cfg.reward_model else None
    if reward_model is not None:
        meter.watch(reward_model.head, "reward")

    # ---- loop: sample, score, pair, for each split
    summary: dict[str, dict] = {}
    for split, prompts in splits.items():
        if not prompts:
            continue
        completions = sample_completions(model, tokenizer, prompts, cfg, dist)
        labels = label_scores(reward_model, prompts, completions, cfg, dist) if reward_model else None
        if not dist.is_main:
            continue
        rows, ties, all_scores, all_finished = [], 0, [], []
        for index, (record, (texts, finished)) in enumerate(zip(prompts, completions)):
            scores = gold(texts)
            all_scores += scores
            all_finished += finished
            pairs, n_ties = make_pairs(record.prompt, texts, labels[index] if labels else scores, cfg.pairing, finished)
            if labels:  # labelled by the reward model: keep the gold reward of both sides beside its scores
                by_text = dict(zip(texts, scores))
                pairs = [
                    p | {"chosen_gold": by_text[p["chosen"]], "rejected_gold": by_text[p["rejected"]]} for p in pairs
                ]
            ties += n_ties
            rows += [{"id": f"{split}-{index}-{j}", "prompt_id": record.source_id, **p} for j, p in enumerate(pairs)]
        write_jsonl(out_dir / f"{split}.jsonl", rows)
        summary[split] = {
            "prompts": len(prompts),
            "samples": len(all_scores),
            "pairs": len(rows),
            "ties_dropped": ties,
            "mean_gold_of_samples": sum(all_scores) / len(all_scores),
            "finished_fraction": sum(all_finished) / len(all_finished),
            "pairs_by_rating": dict(Counter(r["rating"] for r in rows)),
            "labelled_by": cfg.reward_model or cfg.gold_reward,
        }

    # ---- save: config and a card with the counts
    meter.write(out_dir)
    if dist.is_main:
        write_resolved(cfg, out_dir)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "README.md").write_text(_card(cfg, summary))
        for split, stats in summary.items():
            console.print(
                f"pairs\\[{split}]: {stats['pairs']} pairs from {stats['prompts']} prompts x "
                f"{cfg.pairing.samples_per_prompt} samples, {stats['ties_dropped']} ties dropped, "
                f"mean gold of samples {stats['mean_gold_of_samples']:+.3f}, "
                f"{100 * stats['finished_fraction']:.0f}% of samples finished (the rest were cut at "
                f"sample.max_new_tokens and carry no EOS); by rating {plain(stats['pairs_by_rating'])}"
            )
    close_distributed()
    return out_dir


@torch.no_grad()
def sample_completions(
    model, tokenizer, prompts: list[PromptRecord], cfg: PairsConfig, dist
) -> list[tuple[list[str], list[bool]]]:
    """k (completion, finished) for every prompt, as two lists (on rank 0; other ranks get an empty list).

    Each process samples its share of the prompts; dummy slots keep every rank's number of
    generate calls equal, which FSDP2 needs.
    """
    k = cfg.pairing.samples_per_prompt
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank)
    mine: dict[int, tuple[list[str], list[bool]]] = {}
    batches = shard_batches(len(prompts), max(1, cfg.batch_size // k), dist)
    with StepProgress(dist, len(batches), 0, "sampling") as progress:
        for done, batch in enumerate(batches, start=1):
            records = [prompts[i if i is not None else 0] for i in batch]
            ids = [encode_prompt(tokenizer, r.prompt, cfg.data) for r in records for _ in range(k)]
            out = sample(model, tokenizer, ids, cfg.sample, generator, dist.sharded)
            texts = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
            for j, index in enumerate(batch):
                if index is not None:
                    mine[index] = (texts[j * k : (j + 1) * k], out.finished[j * k : (j + 1) * k])
            progress.update(done, {})
    merged = gather_by_index(dist, mine, len(prompts))
    return merged if dist.is_main else []


@torch.no_grad()
def label_scores(
    reward_model: RewardModel, prompts: list[PromptRecord], completions, cfg: PairsConfig, dist
) -> list[list[float]]:
    """The reward model's score of every completion, per prompt, read as PPO reads a rollout.

    Every process scores all of them (a sharded model needs every rank in each forward pass)."""
    completions = broadcast_object(dist, completions if dist.is_main else None)
    k = cfg.pairing.samples_per_prompt
    examples = reward_model.examples(
        [r.prompt for r in prompts for _ in range(k)],
        [t for texts, _ in completions for t in texts],
        [f for _, finished in completions for f in finished],
        [r.messages for r in prompts for _ in range(k)],
        cfg.data.max_prompt_length,
    )
    flat = reward_model.score(examples, cfg.batch_size, dist.device).tolist()
    return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


def _distinct(prompts: list[PromptRecord]) -> list[PromptRecord]:
    seen, out = set(), []
    for record in prompts:
        if record.prompt not in seen:
            seen.add(record.prompt)
            out.append(record)
    return out


def _card(cfg: PairsConfig, summary: dict) -> str:
    lines = [
        "# preference pairs",
        "",
        f"Sampled from `{cfg.model.name_or_path}`, {cfg.pairing.samples_per_prompt} completions per prompt, "
        + (
            f"labelled by the reward model `{cfg.reward_model}` (the `{cfg.gold_reward}` gold reward recorded beside), "
            if cfg.reward_model
            else f"scored by the `{cfg.gold_reward}` gold reward, "
        )
        + f"paired `{cfg.pairing.strategy}`.",
        "",
        "| split | prompts | pairs | ties dropped | mean gold of samples | samples finished | "
        + " | ".join(RATING_LEVELS)
        + " |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in RATING_LEVELS) + " |",
    ]
    for split, s in summary.items():
        levels = " | ".join(str(s["pairs_by_rating"].get(level, 0)) for level in RATING_LEVELS)
        lines.append(
            f"| {split} | {s['prompts']} | {s['pairs']} | {s['ties_dropped']} | {s['mean_gold_of_samples']:+.3f} "
            f"| {100 * s['finished_fraction']:.0f}% | {levels} |"
        )
    lines += [
        "",
        "A sample that reached `sample.max_new_tokens` before EOS is marked unfinished "
        "(`chosen_finished` / `rejected_finished`): it is trained and scored without an EOS.",
    ]
    return "\n".join(lines) + "\n"
