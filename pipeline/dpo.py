"""`rlhfdpo dpo`: direct preference optimisation from the SFT model (Rafailov et al. 2023).

The policy and the frozen reference both start as the SFT model. Reference log-probs come from a
cache computed once (pipeline/reference.py), so the reference model is not in memory while the
policy trains. Chosen and rejected go through the policy in one concatenated forward, or, with
`train.share_prompt`, as one row per pair whose prompt is computed once (pipeline/prefix_sharing.py);
sequence log-probs are summed over response tokens only. Loss variants are pure functions in losses.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import DPOConfig, DPOLossConfig
from pipeline.console import console
from pipeline.cost import CostMeter
from pipeline.data.loading import load_pairs
from pipeline.data.records import DropLedger
from pipeline.data.tokenize import TokenizedPair, pair_length, tokenize_pair
from pipeline.evaluation import wilson_interval
from pipeline.launch import close_distributed, init_distributed, shard
from pipeline.lora import add_lora, lora_summary, save_merged, trainable_parameter_count
from pipeline.losses import chosen_nll, dpo_sigmoid_loss, hinge_loss, implicit_rewards, ipo_loss
from pipeline.models import count_parameters, load_causal_lm, load_tokenizer
from pipeline.prefix_sharing import collate_for, pair_logps, share_prompt_in
from pipeline.reference import reference_logps
from pipeline.runs import RunDir, Trainable
from pipeline.stage_common import (
    chat_renderer,
    finish_card,
    report_drops,
    require_examples,
    sample_texts,
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

# loss.type -> per-pair loss (B,) from the four summed log-probs (policy chosen, policy rejected,
# reference chosen, reference rejected), each (B,), and the loss config. `DPOLossConfig.type`
# allows exactly these names (a test keeps the two the same).
PREFERENCE_LOSSES = {
    "sigmoid": lambda pc, pr, rc, rr, loss: dpo_sigmoid_loss(pc, pr, rc, rr, loss.beta, loss.label_smoothing or 0.0),
    "ipo": lambda pc, pr, rc, rr, loss: ipo_loss(pc, pr, rc, rr, loss.beta),
    "hinge": lambda pc, pr, rc, rr, loss: hinge_loss(pc, pr, rc, rr, loss.beta),
}


def preference_loss(loss: DPOLossConfig, pc, pr, rc, rr, chosen_lengths) -> torch.Tensor:
    """Per-pair loss (B,) of the configured variant, plus RPO's NLL term when asked for."""
    if loss.type not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown DPO loss '{loss.type}'; valid: {', '.join(PREFERENCE_LOSSES)}")
    losses = PREFERENCE_LOSSES[loss.type](pc, pr, rc, rr, loss)
    if loss.rpo_alpha:
        losses = losses + loss.rpo_alpha * chosen_nll(pc, chosen_lengths)
    return losses


def batch_stats(loss_cfg: DPOLossConfig, losses, pc, pr, rc, rr) -> dict[str, torch.Tensor]:
    """The sums of one micro-batch from which every logged metric is a mean (TRL's names)."""
    chosen_reward, rejected_reward = implicit_rewards(pc, pr, rc, rr, loss_cfg.beta)
    return {
        "loss": losses.detach().sum(),
        "rewards/chosen": chosen_reward.sum(),
        "rewards/rejected": rejected_reward.sum(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float().sum(),
        "rewards/margins": (chosen_reward - rejected_reward).sum(),
        "logps/chosen": pc.detach().sum(),
        "logps/rejected": pr.detach().sum(),
    }


def run(cfg: DPOConfig, resume: bool = False, overwrite: bool = False) -> Path:
    dist = init_distributed()
    seed_everything(cfg.train.seed)
    run_dir = RunDir(cfg.output_dir, dist, resume, overwrite)
    meter = CostMeter(dist)
    checkpoint = run_dir.resume_point(cfg) if resume else None

    # ---- load: pairs, tokenized once; reference log-probs from the cache or one pass
    ledger = DropLedger(cfg.data.strict)
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, eval_pairs = load_pairs(cfg.data, ledger, chat_renderer(tokenizer))
    tokenize = lambda p: tokenize_pair(tokenizer, p, cfg.data)  # noqa: E731
    train_set = tokenize_records(train_pairs, tokenize, ledger, "dpo tokenize")
    eval_set = tokenize_records(eval_pairs, tokenize, ledger, "dpo tokenize")
    report_drops(ledger, dist)
    require_examples(train_set, ledger, "dpo")
    # Under LoRA the reference is the policy with its adapters off, so the policy comes first; fully
    # fine-tuned, it loads after the reference pass and the two are never in memory together.
    policy = build_policy(cfg, checkpoint, dist, meter) if cfg.model.lora else None
    ref_chosen, ref_rejected, cache_hit = reference_logps(
        cfg.model,
        train_set + eval_set,
        cfg.reference.cache_dir,
        cfg.reference.batch_size,
        tokenizer.pad_token_id,
        dist,
        meter,
        policy,
        cfg.train.share_prompt,
    )
    reference = {
        "train": (ref_chosen[: len(train_set)], ref_rejected[: len(train_set)]),
        "eval": (ref_chosen[len(train_set) :], ref_rejected[len(train_set) :]),
    }

    # ---- build: the policy (unless LoRA built it above), optimizer
    if policy is None:
        policy = build_policy(cfg, checkpoint, dist, meter)
    share = share_prompt_in(policy, cfg.train.share_prompt, dist)
    optimizer = build_optimizer(policy, cfg.optim)
    plan = BatchPlan.build(len(train_set), cfg.train, dist.world_size, [pair_length(p) for p in train_set])
    trainables = [Trainable("model", policy, optimizer, tokenizer)]
    start_step = run_dir.load_trainer_state(checkpoint, trainables)["step"] if checkpoint else 0
    run_dir.write_config(cfg)
    run_dir.start_metrics(start_step)
    run_dir.log(
        {
            "step": start_step,
            "reference_cache_hit": cache_hit,
            "params/total": count_parameters(policy),
            "params/trainable": trainable_parameter_count(policy),
        }
    )
    if dist.is_main:
        console.print(
            f"dpo ({cfg.loss.type}, beta {cfg.loss.beta}): {len(train_set)} train / {len(eval_set)} eval pairs, "
            f"{plan.total_steps} steps of {plan.batch_size} pairs; reference log-probs "
            f"{'from the cache' if cache_hit else 'computed'}{lora_summary(cfg.model, policy)}"
        )

    # ---- loop
    pad_id = tokenizer.pad_token_id
    ref_c, ref_r = reference["train"]
    metrics: dict = {}
    policy.train()
    with StepProgress(dist, plan.total_steps, start_step, "dpo") as progress:
        for step in range(start_step, plan.total_steps):
            micro = plan.micro_batches(step, dist)
            step_pairs = count_over_ranks(dist, sum(len(ids) for ids in micro))
            lr = lr_at(step, plan.total_steps, cfg.optim)
            set_lr(optimizer, lr)
            sums = Sums()
            for i, ids in enumerate(micro):
                sync_on_last(policy, dist, i, len(micro))
                batch = collate_for([train_set[j] for j in ids], pad_id, share)
                pc, pr, chosen_lengths = pair_logps(policy, {k: v.to(dist.device) for k, v in batch.items()})
                rc, rr = ref_c[ids].to(dist.device), ref_r[ids].to(dist.device)
                losses = preference_loss(cfg.loss, pc, pr, rc, rr, chosen_lengths)
                backward_global_mean(losses.sum(), step_pairs, dist)
                sums.add(**batch_stats(cfg.loss, losses, pc, pr, rc, rr))
            grad_norm = clip_and_step(policy, optimizer, cfg.optim.max_grad_norm, step + 1)
            done = step + 1

            means = {name: total / float(step_pairs) for name, total in sums.over_ranks(dist).items()}
            metrics = {"step": done, **means, "lr": lr, "grad_norm": grad_norm}
            ensure_finite(done, loss=metrics["loss"])
            if done % cfg.train.log_every == 0 or done == plan.total_steps:
                run_dir.log(metrics)
            progress.update(
                done,
                {"loss": metrics["loss"], "acc": metrics["rewards/accuracies"], "margin": metrics["rewards/margins"]},
            )
            if due(done, cfg.train.eval_every, plan.total_steps):
                run_dir.log({"step": done, **evaluate(policy, eval_set, reference["eval"], cfg, dist, pad_id, share)})
            if due(done, cfg.train.save_every, plan.total_steps):
                run_dir.save_checkpoint(done, trainables, {}, cfg.train.keep_checkpoints, cfg)

    # ---- save: held-out metrics, model folder, samples, card
    final = {"step": plan.total_steps, **evaluate(policy, eval_set, reference["eval"], cfg, dist, pad_id, share)}
    run_dir.log(final)
    run_dir.save_model(policy, tokenizer, merged=save_merged(cfg.model))
    prompts = list(dict.fromkeys(p.prompt for p in eval_pairs))[: cfg.sample.num_prompts]
    samples = sample_texts(policy, tokenizer, prompts, cfg.sample, cfg.data, cfg.train.seed, dist)
    if dist.is_main:
        console.print("dpo: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "step"))
    cost = meter.write(run_dir.root)
    finish_card(
        run_dir,
        "dpo",
        cfg,
        metrics,
        {**final, "wall_s": cost["wall_s"], "peak_rss_mb": cost["peak_rss_mb"]},
        samples,
        dist,
    )
    close_distributed()
    return run_dir.model


def build_policy(cfg: DPOConfig, checkpoint: Path | None, dist, meter: CostMeter):
    """The SFT model, or the checkpoint being resumed, with LoRA's adapters when asked; sharded.

    Under LoRA a checkpoint holds only the adapters: the base loads as at the start, the adapters from it.
    """
    resumed = checkpoint / "model" if checkpoint else None
    policy = load_causal_lm(cfg.model, str(resumed) if resumed and not cfg.model.lora else None)
    policy = add_lora(policy, cfg.model, resumed)
    checkpoint_activations(policy, cfg.train.gradient_checkpointing)
    return meter.watch(shard(policy, dist, cfg.model.dtype), "policy")


@torch.no_grad()
def evaluate(
    policy,
    eval_set: list[TokenizedPair],
    reference: tuple[torch.Tensor, torch.Tensor],
    cfg: DPOConfig,
    dist,
    pad_id: int,
    share: bool = False,
) -> dict[str, float]:
    """The training metrics on held-out pairs, prefixed eval/; `share`: one row per pair."""
    if not eval_set:
        return {}
    policy.eval()
    sums = Sums()
    for part in shard_batches(len(eval_set), cfg.train.eval_batch_size, dist):
        real = torch.tensor([i is not None for i in part])
        ids = [i if i is not None else 0 for i in part]
        batch = collate_for([eval_set[i] for i in ids], pad_id, share)
        pc, pr, chosen_lengths = pair_logps(policy, {k: v.to(dist.device) for k, v in batch.items()})
        rc, rr = reference[0][ids].to(dist.device), reference[1][ids].to(dist.device)
        keep = real.to(dist.device)
        pc, pr, rc, rr, chosen_lengths = (t[keep] for t in (pc, pr, rc, rr, chosen_lengths))
        losses = preference_loss(cfg.loss, pc, pr, rc, rr, chosen_lengths)
        sums.add(**batch_stats(cfg.loss, losses, pc, pr, rc, rr), pairs=real.sum())
    policy.train()
    totals = sums.over_ranks(dist)
    pairs = max(totals.pop("pairs"), 1.0)
    means = {f"eval/{name}": total / pairs for name, total in totals.items()}
    # Wilson 95% interval of the implicit-reward accuracy over the held-out pairs
    low, high = wilson_interval(totals["rewards/accuracies"], pairs)
    return {**means, "eval/rewards/accuracies_low": low, "eval/rewards/accuracies_high": high, "eval/pairs": pairs}
