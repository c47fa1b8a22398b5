"""`rlhfdpo reward`: a Bradley-Terry reward model with Llama 2's margin ranking loss.

The backbone is the SFT model with its next-token head swapped for a scalar regression head (Llama
2, Sec. 3.2.2), saved so that `AutoModelForSequenceClassification.from_pretrained(path)` loads it
(`num_labels=1`, scored at the last non-pad token). Held-out accuracy is reported overall, per
rating level (Llama 2's Table 8 layout) and by bins of |r_c - r_r|; the mean and std of held-out
rewards are stored in the model's config (`reward_mean`, `reward_std`) so PPO can normalise scores.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from rich.table import Table
from transformers import AutoModelForSequenceClassification

from pipeline.config import RATING_LEVELS, RewardConfig
from pipeline.console import cell, console
from pipeline.cost import CostMeter
from pipeline.data.loading import load_pairs
from pipeline.data.records import DropLedger, PreferencePair
from pipeline.data.tokenize import TokenizedPair, pair_length, tokenize_pair
from pipeline.evaluation import wilson_interval
from pipeline.launch import close_distributed, init_distributed, shard
from pipeline.lora import add_lora, lora_summary, save_merged
from pipeline.losses import bradley_terry_loss, reward_centering_penalty
from pipeline.models import ScalarHead, fit_vocabulary, from_pretrained, hub_options, load_tokenizer
from pipeline.prefix_sharing import collate_for, share_prompt_in, shared_pair_scores
from pipeline.runs import RunDir, Trainable
from pipeline.scoring import sequence_scores
from pipeline.stage_common import (
    chat_renderer,
    gather_by_index,
    report_drops,
    require_examples,
    shard_batches,
    tokenize_records,
)
from pipeline.training import (
    BatchPlan,
    StepProgress,
    Sums,
    backward_global_mean,
    build_optimizer,
    checkpoint_activations,
    clip_and_step,
    count_over_ranks,
    due,
    ensure_finite,
    lr_at,
    seed_everything,
    set_lr,
    sync_on_last,
)


def pair_margin(pair: PreferencePair, cfg: RewardConfig) -> float:
    """m(r) for one pair: from its rating level, its numeric margin column, or zero."""
    if cfg.loss.margin == "rating":
        return cfg.loss.rating_margins.get(pair.rating, 0.0) if pair.rating else 0.0
    if cfg.loss.margin == "column":
        return (pair.margin or 0.0) * cfg.loss.margin_scale
    return 0.0


def score_pairs(head, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected sides of a batch of either layout of `collate_for`, each (B,)."""
    if "segments" in batch:
        return shared_pair_scores(head, batch)
    rewards = sequence_scores(head, batch["input_ids"], batch["attention_mask"])  # (2B,)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def run(cfg: RewardConfig, resume: bool = False, overwrite: bool = False) -> Path:
    dist = init_distributed()
    seed_everything(cfg.train.seed)
    run_dir = RunDir(cfg.output_dir, dist, resume, overwrite, produces=("eval.json",))
    meter = CostMeter(dist)
    checkpoint = run_dir.resume_point(cfg) if resume else None
    source = str(checkpoint / "model") if checkpoint else cfg.model.name_or_path

    # ---- load: pairs, tokenized with the SFT tokenizer
    ledger = DropLedger(cfg.data.strict)
    tokenizer = load_tokenizer(cfg.model, source)
    train_pairs, eval_pairs = load_pairs(cfg.data, ledger, chat_renderer(tokenizer))
    tokenize = lambda p: tokenize_pair(tokenizer, p, cfg.data, margin=pair_margin(p, cfg))  # noqa: E731
    train_set = tokenize_records(train_pairs, tokenize, ledger, "reward tokenize")
    eval_set = tokenize_records(eval_pairs, tokenize, ledger, "reward tokenize")
    report_drops(ledger, dist)
    require_examples(train_set, ledger, "reward")

    # ---- build: scalar head on the SFT backbone, adapters, shards, optimizer, batch plan
    # Under LoRA a checkpoint holds only the adapters and the head: the backbone loads as at the start.
    weights = cfg.model.name_or_path if cfg.model.lora else source
    hf_model = from_pretrained(
        AutoModelForSequenceClassification,
        weights,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,  # trained weights stay float32; model.dtype is the compute precision
        revision=cfg.model.revision if weights == cfg.model.name_or_path else None,
        trust_remote_code=cfg.model.trust_remote_code,
        **hub_options(cfg.model),
    )
    fit_vocabulary(hf_model, tokenizer)
    hf_model = add_lora(hf_model, cfg.model, checkpoint / "model" if checkpoint else None, head=True)
    checkpoint_activations(hf_model, cfg.train.gradient_checkpointing)
    model = meter.watch(shard(ScalarHead(hf_model), dist, cfg.model.dtype), "reward")
    optimizer = build_optimizer(model, cfg.optim)
    plan = BatchPlan.build(len(train_set), cfg.train, dist.world_size, [pair_length(p) for p in train_set])
    trainables = [Trainable("model", model, optimizer, tokenizer, hf_model=hf_model, prefix="model.")]
    start_step = run_dir.load_trainer_state(checkpoint, trainables)["step"] if checkpoint else 0
    run_dir.write_config(cfg)
    run_dir.start_metrics(start_step)
    if dist.is_main:
        console.print(
            f"reward: {len(train_set)} train / {len(eval_set)} eval pairs, {plan.total_steps} steps of "
            f"{plan.batch_size} pairs, margin from {cfg.loss.margin}{lora_summary(cfg.model, model)}"
        )

    # ---- loop
    pad_id = tokenizer.pad_token_id
    share = share_prompt_in(model, cfg.train.share_prompt, dist)
    model.train()
    with StepProgress(dist, plan.total_steps, start_step, "reward") as progress:
        for step in range(start_step, plan.total_steps):
            batches = [
                collate_for([train_set[i] for i in ids], pad_id, share) for ids in plan.micro_batches(step, dist)
            ]
            step_pairs = count_over_ranks(dist, sum(len(b["margin"]) for b in batches))
            lr = lr_at(step, plan.total_steps, cfg.optim)
            set_lr(optimizer, lr)
            sums = Sums()
            rewards_seen = []
            for i, batch in enumerate(batches):
                sync_on_last(model, dist, i, len(batches))
                batch = {k: v.to(dist.device) for k, v in batch.items()}
                chosen, rejected = score_pairs(model, batch)
                losses = bradley_terry_loss(chosen, rejected, batch["margin"])  # Llama 2, Eq. 2
                if cfg.loss.center_coef:
                    losses = losses + cfg.loss.center_coef * reward_centering_penalty(chosen, rejected)
                backward_global_mean(losses.sum(), step_pairs, dist)
                diff = (chosen - rejected).detach()
                sums.add(loss=losses.detach().sum(), correct=(diff > 0).sum(), margin=diff.sum(), pairs=len(diff))
                rewards_seen.append(torch.cat([chosen, rejected]).detach().cpu())
            grad_norm = clip_and_step(model, optimizer, cfg.optim.max_grad_norm, step + 1)
            done = step + 1

            totals = sums.over_ranks(dist)
            loss, correct, margin, n = (totals[k] for k in ("loss", "correct", "margin", "pairs"))
            ensure_finite(done, loss=loss / n)
            rewards = torch.cat(rewards_seen)  # this rank's share: a cheap running view, not a global statistic
            metrics = {
                "step": done,
                "loss": loss / n,
                "accuracy": correct / n,
                "margin": margin / n,
                "reward/mean": float(rewards.mean()),
                "reward/std": float(rewards.std()),
                "lr": lr,
                "grad_norm": grad_norm,
            }
            if done % cfg.train.log_every == 0 or done == plan.total_steps:
                run_dir.log(metrics)
            progress.update(done, {"loss": metrics["loss"], "accuracy": metrics["accuracy"]})
            if due(done, cfg.train.eval_every, plan.total_steps):
                run_dir.log({"step": done, **evaluate(model, eval_set, cfg, dist, pad_id, share)["metrics"]})
            if due(done, cfg.train.save_every, plan.total_steps):
                run_dir.save_checkpoint(done, trainables, {}, cfg.train.keep_checkpoints, cfg)

    # ---- save: held-out tables, normalisation statistics in the config, model folder, card
    report = evaluate(model, eval_set, cfg, dist, pad_id, share)
    final = {"step": plan.total_steps, **report["metrics"]}
    run_dir.log(final)
    if "eval/reward_mean" in final:
        hf_model.config.reward_mean = final["eval/reward_mean"]
        hf_model.config.reward_std = final["eval/reward_std"]
    run_dir.save_model(model, tokenizer, hf_model=hf_model, prefix="model.", merged=save_merged(cfg.model))
    if dist.is_main:
        (run_dir.root / "eval.json").write_text(json.dumps(report, indent=2))
        console.print(_tables(report))
    cost = meter.write(run_dir.root)
    final |= {"wall_s": cost["wall_s"], "peak_rss_mb": cost["peak_rss_mb"]}
    run_dir.write_card(
        "reward",
        cfg,
        {k: v for k, v in final.items() if not isinstance(v, dict)},
        notes=["## Held-out accuracy", "", *_markdown_tables(report)],
    )
    close_distributed()
    return run_dir.model


@torch.no_grad()
def evaluate(model, eval_set: list[TokenizedPair], cfg: RewardConfig, dist, pad_id: int, share: bool = False) -> dict:
    """Held-out accuracy overall, per rating level and per |r_c - r_r| bin; reward mean and std;
    `share`: one row per pair."""
    if not eval_set:
        return {"metrics": {}, "by_rating": {}, "by_gap": {}}
    model.eval()
    mine = {}  # index -> (r_chosen, r_rejected) of this rank's real slots
    for part in shard_batches(len(eval_set), cfg.train.eval_batch_size, dist):
        batch = collate_for([eval_set[i if i is not None else 0] for i in part], pad_id, share)
        chosen, rejected = score_pairs(model, {k: v.to(dist.device) for k, v in batch.items()})
        mine |= {i: (c, r) for i, c, r in zip(part, chosen.tolist(), rejected.tolist()) if i is not None}
    model.train()
    scored = [(i, c, r) for i, (c, r) in enumerate(gather_by_index(dist, mine, len(eval_set)))]

    by_rating: dict[str, list[int]] = defaultdict(list)
    by_gap: dict[str, list[int]] = defaultdict(list)
    edges = [0.0, *cfg.gap_bins, float("inf")]
    for index, chosen, rejected in scored:
        right = int(chosen > rejected)
        by_rating[eval_set[index].rating or "unrated"].append(right)
        gap = abs(chosen - rejected)
        lo, hi = next((lo, hi) for lo, hi in zip(edges, edges[1:]) if lo <= gap < hi)
        by_gap[f"[{lo:g}, {hi:g})"].append(right)
    all_rewards = torch.tensor([x for _, c, r in scored for x in (c, r)])
    losses = bradley_terry_loss(
        torch.tensor([c for _, c, _ in scored]),
        torch.tensor([r for _, _, r in scored]),
        torch.tensor([eval_set[i].margin for i, _, _ in scored]),
    )
    accuracy = sum(c > r for _, c, r in scored) / len(scored)
    low, high = wilson_interval(accuracy * len(scored), len(scored))  # 95%, over the held-out pairs
    rating_stats, gap_stats = _accuracy_by_group(by_rating), _accuracy_by_group(by_gap)
    return {
        "metrics": {
            "eval/loss": float(losses.mean()),
            "eval/accuracy": accuracy,
            "eval/accuracy_low": low,
            "eval/accuracy_high": high,
            "eval/pairs": len(scored),
            "eval/margin": float(sum(c - r for _, c, r in scored) / len(scored)),
            "eval/reward_mean": float(all_rewards.mean()),
            "eval/reward_std": float(all_rewards.std()),
        },
        "by_rating": {k: rating_stats[k] for k in sorted(rating_stats, key=_level_order)},
        "by_gap": {k: gap_stats[k] for k in sorted(gap_stats, key=lambda b: float(b[1:].split(",")[0]))},
    }


def _accuracy_by_group(groups: dict[str, list[int]]) -> dict[str, dict]:
    return {name: {"accuracy": sum(right) / len(right), "pairs": len(right)} for name, right in groups.items()}


def _level_order(level: str) -> int:
    return RATING_LEVELS.index(level) if level in RATING_LEVELS else len(RATING_LEVELS)


def _tables(report: dict) -> Table:
    table = Table(title=f"held-out accuracy {report['metrics'].get('eval/accuracy', 0):.3f}")
    table.add_column("group")
    table.add_column("accuracy", justify="right")
    table.add_column("pairs", justify="right")
    for title, groups in (("rating", report["by_rating"]), ("|r_c - r_r|", report["by_gap"])):
        for name, stats in groups.items():
            table.add_row(cell(f"{title}: {name}"), f"{stats['accuracy']:.3f}", str(stats["pairs"]))
    return table


def _markdown_tables(report: dict) -> list[str]:
    lines = ["| rating level | accuracy | pairs |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['accuracy']:.3f} | {v['pairs']} |" for k, v in report["by_rating"].items()]
    lines += ["", "| abs(r_c - r_r) | accuracy | pairs |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['accuracy']:.3f} | {v['pairs']} |" for k, v in report["by_gap"].items()]
    return lines
