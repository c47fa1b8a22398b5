"""`rlhfdpo ppo`: PPO against a learned reward (or the gold reward) with a KL penalty to the SFT model.

Four models: the policy (from the SFT model), the frozen reference (the SFT model), the reward
model(s), and a value model (from the reward model by default). One iteration:

1. rollout: sample a response for each prompt of the batch with the KV-cache sampler;
2. score: reward model(s) on prompt + response, normalised with the statistics the reward stage
   saved; per-token reward = -kl_coef * KL_t, plus the score on the last response token;
3. advantages: GAE over response tokens, whitened over the batch; returns as the value target;
4. update: several epochs of minibatches with the clipped policy and value losses.

The implementation details follow "The N+ Implementation Details of RLHF with PPO" (Huang et al.
2024) and OpenRLHF; the losses are pure functions in losses.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from transformers import AutoModelForSequenceClassification

from pipeline.config import PPOConfig, TrainConfig
from pipeline.cost import CostMeter
from pipeline.data.loading import load_prompts
from pipeline.data.records import DropLedger
from pipeline.data.tokenize import TokenizedExample, collate, encode_prompt
from pipeline.judges import gold_reward
from pipeline.launch import all_reduce_sum, close_distributed, gather_objects, init_distributed, save_pretrained, shard
from pipeline.losses import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_logps,
    token_rewards,
)
from pipeline.models import (
    DTYPES,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    local_parameter_count,
    response_token_logps,
)
from pipeline.runs import RunDir, Trainable
from pipeline.sampling import generate
from pipeline.stage_common import chat_renderer, report_drops, tokenize_records
from pipeline.training import BatchPlan, StepProgress, build_optimizer, clip_and_step, console, lr_at, seed_everything, set_lr


class TokenValueModel(torch.nn.Module):
    """A value for every position: the reward model's scalar head applied to all hidden states.

    Wrapping (rather than calling the backbone directly) keeps the head and the embeddings inside
    one module's forward, which FSDP2 needs to gather them.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._no_split_modules = model._no_split_modules

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float()  # (B, T)


class KLController:
    """Fixed, or adaptive toward a target KL (Ziegler et al. 2019, Sec. 2.2)."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, current_kl: float, n_rollouts: int) -> None:
        if self.target is None:
            return
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + proportional_error * n_rollouts / self.horizon


@dataclass
class Rollout:
    """One process's share of a rollout batch; token tensors are (B, T-1), aligned with token_logps."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor  # response tokens
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


# ------------------------------------------------------------------------------------- scoring


class Scorer:
    """The score of each (prompt, response): reward model(s), or the gold reward function."""

    def __init__(self, cfg: PPOConfig, tokenizer, dist):
        self.cfg, self.tokenizer, self.dist = cfg.reward, tokenizer, dist
        self.gold = gold_reward(cfg.reward.gold)
        self.models = []
        if cfg.reward.kind == "model":
            for path in cfg.reward.models:
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[cfg.model.dtype])
                stats = (getattr(model.config, "reward_mean", 0.0), getattr(model.config, "reward_std", 1.0))
                model = shard(model, dist).eval().requires_grad_(False)
                self.models.append((model, stats))

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], responses: list[str], finished: torch.Tensor,
                 unsafe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores used for training, gold scores for logging), each (B,)."""
        gold = torch.tensor(self.gold(responses), dtype=torch.float32)
        if self.cfg.kind == "gold":
            scores = gold.clone()
        else:
            per_model = []
            for model, (mean, std) in self.models:
                raw = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float().cpu()
                per_model.append((raw, (raw - mean) / std if self.cfg.normalize else raw))
            scores = self._combine(per_model, unsafe)
        if self.cfg.clip is not None:
            scores = scores.clamp(-self.cfg.clip, self.cfg.clip)
        if self.cfg.missing_eos_penalty is not None:
            scores = scores + self.cfg.missing_eos_penalty * (~finished).float()
        return scores, gold

    def _combine(self, per_model: list[tuple[torch.Tensor, torch.Tensor]], unsafe: torch.Tensor) -> torch.Tensor:
        if len(per_model) == 1:
            return per_model[0][1]
        if self.cfg.combine == "weighted":
            weights = self.cfg.weights or [1.0 / len(per_model)] * len(per_model)
            return sum(w * normalised for w, (_, normalised) in zip(weights, per_model))
        # Llama 2, Sec. 3.2.2: the safety score where the prompt is flagged unsafe or the response
        # looks unsafe (sigmoid of the raw safety score below the threshold), else helpfulness.
        (_, helpful), (safety_raw, safety) = per_model
        use_safety = unsafe | (torch.sigmoid(safety_raw) < self.cfg.safety_threshold)
        return torch.where(use_safety, safety, helpful)


# ---------------------------------------------------------------------------------------- stage


def run(cfg: PPOConfig, resume: bool = False) -> Path:
    dist = init_distributed()
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.output_dir, dist)
    meter = CostMeter(dist)
    checkpoint = run_dir.latest_checkpoint() if resume else None

    # ---- load: prompts as token ids
    ledger = DropLedger(cfg.data.strict)
    tokenizer = load_tokenizer(cfg.model, str(checkpoint / "model") if checkpoint else None)
    train_prompts, _ = load_prompts(cfg.data, ledger, chat_renderer(tokenizer))
    unsafe: dict[str, bool] = {}  # prompt text -> flagged unsafe, over duplicates
    for record in train_prompts:
        unsafe[record.prompt] = unsafe.get(record.prompt, False) or record.unsafe
    prompts = tokenize_records(
        list(unsafe), lambda p: (encode_prompt(tokenizer, p, cfg.data), unsafe[p]), ledger, "ppo prompts"
    )
    report_drops(ledger, dist)

    # ---- build: policy, reference, value model, scorer; optimizers; KL controller
    policy = shard(load_causal_lm(cfg.model, str(checkpoint / "model") if checkpoint else None), dist)
    reference = shard(load_causal_lm(cfg.model, cfg.reference_path), dist).eval().requires_grad_(False)
    value_source = str(checkpoint / "value") if checkpoint else cfg.value_model_path
    value_hf = AutoModelForSequenceClassification.from_pretrained(value_source, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    value = shard(TokenValueModel(value_hf), dist)
    scorer = Scorer(cfg, tokenizer, dist)
    meter.watch(policy, "policy")
    meter.watch(reference, "reference")
    meter.watch(value, "value")
    for i, (model, _) in enumerate(scorer.models):
        meter.watch(model, f"reward_{i}")
    policy_optimizer = build_optimizer(policy, cfg.optim)
    value_optimizer = build_optimizer(value, cfg.optim)
    value_lr_scale = (cfg.ppo.value_lr or cfg.optim.lr) / cfg.optim.lr
    kl_ctl = KLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    plan = BatchPlan.build(len(prompts), TrainConfig(
        batch_size=cfg.ppo.rollout_batch_size, micro_batch_size=cfg.ppo.rollout_batch_size,
        max_steps=cfg.iterations, seed=cfg.seed), dist.world_size)
    trainables = [Trainable("model", policy, policy_optimizer, tokenizer),
                  Trainable("value", value, value_optimizer, tokenizer, hf_model=value_hf, prefix="model.")]
    start = 0
    if checkpoint:
        state = run_dir.load_trainer_state(checkpoint, trainables)
        start, kl_ctl.value = state["step"], state["kl_coef"]
    run_dir.write_config(cfg)
    run_dir.start_metrics(start)
    per_rank = gather_objects(dist, local_parameter_count(policy))
    run_dir.log({"step": start, "params/total": count_parameters(policy), "params/per_rank": per_rank})
    if dist.is_main:
        console.print(
            f"ppo: {len(prompts)} prompts, {cfg.iterations} iterations of {cfg.ppo.rollout_batch_size} rollouts, "
            f"{cfg.ppo.epochs} epochs of minibatches of {cfg.ppo.mini_batch_size}; score from "
            f"{cfg.reward.kind if cfg.reward.kind == 'gold' else ', '.join(cfg.reward.models)}"
        )

    # ---- loop: rollout, score, advantages, update
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank + start)
    metrics: dict = {}
    with StepProgress(dist, cfg.iterations, start, "ppo") as progress:
        for iteration in range(start, cfg.iterations):
            ids = [i for part in plan.micro_batches(iteration, dist) for i in part]
            lr = lr_at(iteration, cfg.iterations, cfg.optim)
            set_lr(policy_optimizer, lr)
            set_lr(value_optimizer, lr * value_lr_scale)
            rollout, stats, table = collect_rollout(
                policy, reference, value, scorer, tokenizer, [prompts[i] for i in ids], cfg, kl_ctl.value, dist, generator
            )
            clock = time.perf_counter()
            stats |= ppo_update(policy, value, policy_optimizer, value_optimizer, rollout, cfg, dist, iteration)
            stats["time/update"] = time.perf_counter() - clock
            kl_ctl.update(stats["objective/kl"], cfg.ppo.rollout_batch_size)
            done = iteration + 1
            metrics = {"step": done, **stats, "objective/kl_coef": kl_ctl.value, "lr": lr}
            if done % cfg.log_every == 0 or done == cfg.iterations:
                run_dir.log(metrics)
            progress.update(done, {"score": stats["objective/scores"], "kl": stats["objective/kl"], "gold": stats["gold/mean"]})
            if dist.is_main and cfg.sample_table_every and (done % cfg.sample_table_every == 0 or done == 1):
                console.print(_sample_table(done, table))
            if cfg.save_every and done % cfg.save_every == 0 and done != cfg.iterations:
                run_dir.save_checkpoint(done, trainables, {"kl_coef": kl_ctl.value}, cfg.keep_checkpoints)

    # ---- save: the policy (and the value model beside it), card
    run_dir.save_model(policy, tokenizer)
    save_pretrained(value, tokenizer, run_dir.root / "value", dist, hf_model=value_hf, prefix="model.")
    cost = meter.write(run_dir.root)
    run_dir.write_card("ppo", cfg, {**{k: v for k, v in metrics.items() if k != "step"},
                                    "wall_s": cost["wall_s"], "peak_rss_mb": cost["peak_rss_mb"]})
    close_distributed()
    return run_dir.model


@torch.no_grad()
def collect_rollout(policy, reference, value, scorer, tokenizer, prompts: list[tuple[list[int], bool]], cfg: PPOConfig,
                    kl_coef: float, dist, generator) -> tuple[Rollout, dict, list]:
    """Sample, score and compute advantages for this process's (prompt ids, unsafe flag) pairs.

    The returned statistics are over all processes.
    """
    prompt_ids = [ids for ids, _ in prompts]
    unsafe = torch.tensor([flag for _, flag in prompts])
    clock = time.perf_counter()
    policy.eval()
    out = generate(
        policy, prompt_ids, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        generator=generator, sync_ranks=dist.sharded,
    )
    policy.train()
    examples = [TokenizedExample(p + r, len(p)) for p, r in zip(prompt_ids, out.sequences)]
    batch = {k: v.to(dist.device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    responses = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
    finished = torch.tensor(out.finished)
    generate_s, clock = time.perf_counter() - clock, time.perf_counter()

    old_logps, ref_logps, old_values, entropies, masks = [], [], [], [], []
    for rows in _row_chunks(len(examples), cfg.ppo.micro_batch_size):
        part = {k: v[rows] for k, v in batch.items()}
        logits = policy(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        logps, mask = token_logps(logits, part["labels"])
        old_logps.append(logps)
        masks.append(mask)
        entropies.append(entropy_from_logits(logits[:, :-1]) * mask)
        ref_logps.append(response_token_logps(reference, part["input_ids"], part["attention_mask"], part["labels"])[0])
        old_values.append(value(part["input_ids"], part["attention_mask"])[:, :-1])
    old_logps, ref_logps, old_values = torch.cat(old_logps), torch.cat(ref_logps), torch.cat(old_values)
    mask, entropy = torch.cat(masks), torch.cat(entropies)
    old_values = old_values * mask

    scores, gold = scorer(batch, responses, finished, unsafe)
    score_s, clock = time.perf_counter() - clock, time.perf_counter()
    kl = kl_penalty(old_logps, ref_logps, cfg.kl.estimator) * mask  # (B, T-1)
    rewards = token_rewards(scores.to(dist.device), kl, mask, kl_coef)
    advantages, returns = gae(rewards, old_values, mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:  # over the whole rollout batch, all processes
        n = all_reduce_sum(dist, mask.sum().float())
        mean = all_reduce_sum(dist, (advantages * mask).sum()) / n
        var = all_reduce_sum(dist, (((advantages - mean) * mask) ** 2).sum()) / n
        advantages = masked_whiten(advantages, mask, mean, var)
    advantages_s = time.perf_counter() - clock

    k1_kl = ((old_logps - ref_logps) * mask).sum(-1)  # per-sequence KL, the k1 estimate, for logging
    sums = torch.stack([
        k1_kl.sum(), entropy.sum(), scores.sum().to(kl.device), (scores.to(kl.device) - kl_coef * kl.sum(-1)).sum(),
        gold.sum().to(kl.device), mask.sum().float(), finished.float().sum().to(kl.device), torch.tensor(float(len(examples)), device=kl.device),
    ])
    kl_sum, entropy_sum, score_sum, rlhf_sum, gold_sum, length_sum, finished_sum, n_rollouts = all_reduce_sum(dist, sums).tolist()
    stats = {
        "objective/kl": kl_sum / n_rollouts, "objective/entropy": entropy_sum / n_rollouts,
        "objective/scores": score_sum / n_rollouts, "objective/rlhf_reward": rlhf_sum / n_rollouts,
        "gold/mean": gold_sum / n_rollouts, "rollout/response_length": length_sum / n_rollouts,
        "rollout/finished": finished_sum / n_rollouts,
        "val/explained_variance": explained_variance(old_values, returns, mask),
        # this process's seconds per phase (rank 0's are logged): where an iteration's time goes
        "time/generate": generate_s, "time/score": score_s, "time/advantages": advantages_s,
    }
    table = [(tokenizer.decode(p, skip_special_tokens=True), r, float(s), float(g))
             for p, r, s, g in list(zip(prompt_ids, responses, scores, gold))[:4]]
    rollout = Rollout(batch["input_ids"], batch["attention_mask"], mask, old_logps, old_values, advantages, returns)
    return rollout, stats, table


def ppo_update(policy, value, policy_optimizer, value_optimizer, rollout: Rollout, cfg: PPOConfig, dist, iteration: int) -> dict:
    """`ppo.epochs` passes of minibatches over the rollout batch; returns mean losses and statistics."""
    rows_per_mini = cfg.ppo.mini_batch_size // dist.world_size
    n_rows = rollout.input_ids.shape[0]
    totals = torch.zeros(6)  # policy loss, value loss, clipfrac, approxkl, value clipfrac, tokens
    for epoch in range(cfg.ppo.epochs):
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed + 7919 * iteration + epoch))
        for start in range(0, n_rows, rows_per_mini):
            mini = order[start : start + rows_per_mini]
            tokens = all_reduce_sum(dist, rollout.mask[mini].sum().float())  # normaliser over all processes
            micro_chunks = list(_row_chunks(len(mini), cfg.ppo.micro_batch_size))
            for i, chunk in enumerate(micro_chunks):
                rows = mini[chunk]
                if dist.sharded:
                    last = i == len(micro_chunks) - 1
                    policy.set_requires_gradient_sync(last)
                    value.set_requires_gradient_sync(last)
                mask = rollout.mask[rows]
                labels = rollout.input_ids[rows].masked_fill(~_label_mask(mask), -100)
                if cfg.ppo.entropy_coef:  # the entropy bonus needs every logit of the response positions
                    logits = policy(input_ids=rollout.input_ids[rows], attention_mask=rollout.attention_mask[rows]).logits
                    logps, _ = token_logps(logits, labels)
                else:
                    logps, _ = response_token_logps(policy, rollout.input_ids[rows], rollout.attention_mask[rows], labels)
                policy_loss, policy_stats = ppo_policy_loss(logps, rollout.old_logps[rows], rollout.advantages[rows], mask, cfg.ppo.clip_range)
                values = value(rollout.input_ids[rows], rollout.attention_mask[rows])[:, :-1]
                value_loss, value_clipped = ppo_value_loss(values, rollout.old_values[rows], rollout.returns[rows], mask, cfg.ppo.value_clip_range)
                loss = policy_loss + cfg.ppo.value_coef * value_loss
                if cfg.ppo.entropy_coef:
                    loss = loss - cfg.ppo.entropy_coef * (entropy_from_logits(logits[:, :-1]) * mask).sum()
                (loss * dist.world_size / tokens).backward()  # token mean over the global minibatch
                totals += torch.stack([policy_loss.detach(), value_loss.detach(), policy_stats["clipfrac"],
                                       policy_stats["approxkl"], value_clipped, mask.sum().float()]).cpu()
            clip_and_step(policy, policy_optimizer, cfg.optim.max_grad_norm)
            clip_and_step(value, value_optimizer, cfg.optim.max_grad_norm)
    policy_loss, value_loss, clipfrac, approxkl, value_clipfrac, tokens = all_reduce_sum(dist, totals).tolist()
    return {
        "loss/policy": policy_loss / tokens, "loss/value": value_loss / tokens,
        "policy/clipfrac": clipfrac / tokens, "policy/approxkl": approxkl / tokens,
        "val/clipfrac": value_clipfrac / tokens,
    }


def _label_mask(mask: torch.Tensor) -> torch.Tensor:
    """The (B, T) label positions of a (B, T-1) response mask: token t+1 is scored at position t."""
    return torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)


def _row_chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _sample_table(step: int, rows: list) -> Table:
    table = Table(title=f"ppo samples at iteration {step}", show_lines=True)
    for column in ("prompt", "response", "score", "gold"):
        table.add_column(column, overflow="fold")
    for prompt, response, score, gold in rows:
        table.add_row(prompt, response, f"{score:+.3f}", f"{gold:+.3f}")
    return table
