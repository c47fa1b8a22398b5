"""`rlhfdpo sft`: supervised fine-tuning with the loss on response tokens only (Llama 2, Sec. 3.1).

Plain text (an empty prompt) trains on every token, which is how the built-in task's model learns
to write reviews from scratch. Reads top to bottom: load data, build model, loop, save.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch

from pipeline.config import SFTConfig
from pipeline.console import console
from pipeline.cost import CostMeter
from pipeline.data.loading import load_sft_examples
from pipeline.data.records import DropLedger
from pipeline.data.tokenize import TokenizedExample, collate, tokenize_sft
from pipeline.launch import all_reduce_sum, close_distributed, gather_objects, init_distributed, shard
from pipeline.logprobs import response_token_logps
from pipeline.lora import add_lora, lora_summary, save_merged, trainable_parameter_count
from pipeline.models import (
    create_scratch_model,
    is_scratch,
    load_causal_lm,
    load_tokenizer,
    local_parameter_count,
    render_chat,
)
from pipeline.packing import pack, packed_forward, packing_in
from pipeline.runs import RunDir, Trainable
from pipeline.stage_common import (
    chat_renderer,
    finish_card,
    report_drops,
    require_examples,
    sample_texts,
    scratch_tokenizer,
    shard_batches,
    tokenize_records,
)
from pipeline.training import (
    BatchPlan,
    StepProgress,
    Sums,
    Throughput,
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


def run(cfg: SFTConfig, resume: bool = False, overwrite: bool = False) -> Path:
    dist = init_distributed()
    seed_everything(cfg.train.seed)
    run_dir = RunDir(cfg.output_dir, dist, resume, overwrite, produces=("tokenizer",))
    meter = CostMeter(dist)
    checkpoint = run_dir.resume_point(cfg) if resume else None

    # ---- load: records, tokenizer, tokenized examples
    ledger = DropLedger(cfg.data.strict)
    if checkpoint:
        tokenizer = load_tokenizer(cfg.model, str(checkpoint / "model"))
    else:  # a scratch model's tokenizer is trained on the training texts, once they are loaded
        tokenizer = None if is_scratch(cfg.model) else load_tokenizer(cfg.model)
    # A scratch tokenizer does not exist yet, but its chat template is known: conversations render with it.
    render = render_chat if tokenizer is None else chat_renderer(tokenizer)
    train_records, eval_records = load_sft_examples(cfg.data, ledger, render)
    if tokenizer is None:
        tokenizer = scratch_tokenizer(cfg.model, [r.prompt + r.response for r in train_records], run_dir.root, dist)
    train_set = tokenize_records(train_records, lambda r: tokenize_sft(tokenizer, r, cfg.data), ledger, "sft tokenize")
    eval_set = tokenize_records(eval_records, lambda r: tokenize_sft(tokenizer, r, cfg.data), ledger, "sft tokenize")
    report_drops(ledger, dist)
    require_examples(train_set, ledger, "sft")

    # ---- build: model (new, hub, or the checkpoint being resumed), adapters, shards, optimizer, batch plan
    # Under LoRA a checkpoint holds only the adapters: the base loads as at the start, the adapters from it.
    resumed = checkpoint / "model" if checkpoint else None
    if resumed and not cfg.model.lora:
        model = load_causal_lm(cfg.model, str(resumed))
    elif is_scratch(cfg.model):
        model = create_scratch_model(cfg.model.architecture, tokenizer, cfg.train.seed)
    else:
        model = load_causal_lm(cfg.model)
    model = add_lora(model, cfg.model, resumed)
    n_params, n_trainable = sum(p.numel() for p in model.parameters()), trainable_parameter_count(model)
    checkpoint_activations(model, cfg.train.gradient_checkpointing)
    model = meter.watch(shard(model, dist, cfg.model.dtype), "policy")
    optimizer = build_optimizer(model, cfg.optim)
    plan = BatchPlan.build(len(train_set), cfg.train, dist.world_size, [len(e.input_ids) for e in train_set])
    trainables = [Trainable("model", model, optimizer, tokenizer)]
    start_step = run_dir.load_trainer_state(checkpoint, trainables)["step"] if checkpoint else 0
    run_dir.write_config(cfg)
    run_dir.start_metrics(start_step)
    per_rank = gather_objects(dist, local_parameter_count(model))
    run_dir.log(
        {"step": start_step, "params/total": n_params, "params/trainable": n_trainable, "params/per_rank": per_rank}
    )
    if dist.is_main:
        console.print(
            f"sft: {n_params / 1e6:.2f}M parameters ({per_rank[0] / 1e6:.2f}M on rank 0), "
            f"{len(train_set)} train / {len(eval_set)} eval examples, {plan.total_steps} steps of "
            f"{plan.batch_size} sequences ({dist.world_size} process(es) x {plan.accumulation} micro-batches "
            f"of {plan.micro_batch_size}){lora_summary(cfg.model, model)}"
        )

    # ---- loop
    pad_id = tokenizer.pad_token_id
    packed = packing_in(model, cfg.train.packing, dist)
    make_batch = pack if packed else collate
    throughput = Throughput()
    metrics: dict = {}
    model.train()
    with StepProgress(dist, plan.total_steps, start_step, "sft") as progress:
        for step in range(start_step, plan.total_steps):
            batches = [make_batch([train_set[i] for i in ids], pad_id) for ids in plan.micro_batches(step, dist)]
            step_tokens = count_over_ranks(dist, sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
            lr = lr_at(step, plan.total_steps, cfg.optim)
            set_lr(optimizer, lr)
            nll_total = torch.zeros(())
            for i, batch in enumerate(batches):
                sync_on_last(model, dist, i, len(batches))
                batch = {k: v.to(dist.device) for k, v in batch.items()}
                # Packed: the sequences end to end, each seeing only itself. The backward stays inside
                # packed_forward, where activation checkpointing recomputes the packed attention.
                with packed_forward(model, batch) if packed else nullcontext({}) as layout:
                    mask = None if packed else batch["attention_mask"]
                    logps, _ = response_token_logps(
                        model, batch["input_ids"], mask, batch["labels"], forward_kwargs=layout
                    )
                    nll = -logps.sum()  # Llama 2, Sec. 3.1: the loss on answer tokens only
                    backward_global_mean(nll, step_tokens, dist)
                nll_total += nll.detach().cpu()
                throughput.add(batch["input_ids"].numel() if packed else int(batch["attention_mask"].sum()))
            grad_norm = clip_and_step(model, optimizer, cfg.optim.max_grad_norm, step + 1)
            done = step + 1

            loss = float(all_reduce_sum(dist, nll_total) / step_tokens.cpu())
            ensure_finite(done, loss=loss)
            if done % cfg.train.log_every == 0 or done == plan.total_steps:
                metrics = {
                    "step": done,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": throughput.rate() * dist.world_size,
                }
                run_dir.log(metrics)
            progress.update(done, {"loss": loss, "lr": lr})
            if due(done, cfg.train.eval_every, plan.total_steps):
                run_dir.log({"step": done, **evaluate(model, eval_set, cfg, dist, pad_id)})
            if due(done, cfg.train.save_every, plan.total_steps):
                run_dir.save_checkpoint(done, trainables, {}, cfg.train.keep_checkpoints, cfg)

    # ---- save: final evaluation, model folder, samples, card
    final = {"step": plan.total_steps, **evaluate(model, eval_set, cfg, dist, pad_id)}
    run_dir.log(final)
    run_dir.save_model(model, tokenizer, merged=save_merged(cfg.model))
    prompts = [r.prompt or " ".join(r.response.split()[:4]) for r in eval_records[: cfg.sample.num_prompts]]
    samples = sample_texts(model, tokenizer, prompts, cfg.sample, cfg.data, cfg.train.seed, dist)
    if dist.is_main and "eval/loss" in final:
        console.print(f"sft: eval loss {final['eval/loss']:.4f}, perplexity {final['eval/perplexity']:.2f}")
    cost = meter.write(run_dir.root)
    finish_card(
        run_dir,
        "sft",
        cfg,
        metrics,
        {**final, "wall_s": cost["wall_s"], "peak_rss_mb": cost["peak_rss_mb"]},
        samples,
        dist,
    )
    close_distributed()
    return run_dir.model


@torch.no_grad()
def evaluate(model, eval_set: list[TokenizedExample], cfg: SFTConfig, dist, pad_id: int) -> dict[str, float]:
    """Held-out loss per response token and its perplexity, over all ranks."""
    if not eval_set:
        return {}
    model.eval()
    dummy = TokenizedExample(eval_set[0].input_ids, len(eval_set[0].input_ids))  # every label masked: adds nothing
    sums = Sums()
    for part in shard_batches(len(eval_set), cfg.train.eval_batch_size, dist):
        examples = [eval_set[i] if i is not None else dummy for i in part]
        batch = {k: v.to(dist.device) for k, v in collate(examples, pad_id).items()}
        logps, mask = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        sums.add(nll=-logps.sum(), tokens=mask.sum())
    model.train()
    totals = sums.over_ranks(dist)
    loss = totals["nll"] / max(totals["tokens"], 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
