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
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.advantages import (
    ADVANTAGE_ESTIMATORS,
    CRITIC_FREE,
    explained_variance,
    kl_penalty,
    masked_whiten,
    token_rewards,
)
from pipeline.config import PPOConfig, RewardSourceConfig
from pipeline.console import cell, console, plain
from pipeline.cost import CostMeter
from pipeline.data.loading import load_prompts
from pipeline.data.records import DropLedger
from pipeline.data.tokenize import TokenizedExample, collate, encode_prompt
from pipeline.errors import InputError
from pipeline.judges import gold_reward
from pipeline.launch import all_reduce_sum, close_distributed, gather_objects, init_distributed, save_pretrained, shard
from pipeline.logprobs import (
    entropy_from_logits,
    response_logits,
    response_token_logps,
    scatter_response_logps,
    selected_logps,
    tempered,
)
from pipeline.lora import adapters_disabled, add_lora, lora_summary, save_merged, trainable_parameter_count
from pipeline.losses import ppo_policy_loss, ppo_value_loss
from pipeline.models import (
    ScalarHead,
    count_parameters,
    disable_dropout,
    from_pretrained,
    load_causal_lm,
    load_tokenizer,
    local_parameter_count,
)
from pipeline.prefix_sharing import masks_of_ours_in
from pipeline.prompt_groups import PromptGroups
from pipeline.runs import RunDir, Trainable
from pipeline.sampling import sample
from pipeline.scoring import RewardModel, load_reward_model, same_tokenizer
from pipeline.stage_common import chat_renderer, report_drops, require_examples, tokenize_records
from pipeline.training import (
    BatchPlan,
    StepProgress,
    Sums,
    backward_global_mean,
    build_optimizer,
    checkpoint_activations,
    chunks,
    clip_and_step,
    due,
    ensure_finite,
    lr_at,
    seed_everything,
    set_lr,
    sync_on_last,
)
from pipeline.value_head import new_value_head


class KLController:
    """Fixed, or adaptive toward a target KL (Ziegler et al. 2019, Sec. 2.2)."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, current_kl: float, n_rollouts: int) -> None:
        if self.target is None:
            return
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + proportional_error * n_rollouts / self.horizon


@dataclass(frozen=True)
class RolloutPrompt:
    """A training prompt: its text (for reward models with other tokenizers), its ids for the policy."""

    text: str
    ids: list[int]
    unsafe: bool = False
    messages: tuple[dict, ...] | None = None


@dataclass
class Rollout:
    """One process's share of a rollout batch; token tensors are (B, T-1), aligned with token_logps."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor  # (B,)
    mask: torch.Tensor  # response tokens
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


# ------------------------------------------------------------------------------------- scoring


def combine_scores(
    reward: RewardSourceConfig, per_model: list[tuple[torch.Tensor, torch.Tensor]], unsafe: torch.Tensor
) -> torch.Tensor:
    """One score per rollout (B,) from each model's (raw, normalised) scores, each (B,)."""
    if len(per_model) == 1:
        return per_model[0][1]
    if reward.combine == "weighted":
        weights = reward.weights or [1.0 / len(per_model)] * len(per_model)
        return sum(w * normalised for w, (_, normalised) in zip(weights, per_model))
    # Llama 2, Sec. 3.2.2: the safety score where the prompt is flagged unsafe or the response
    # looks unsafe (sigmoid of the raw safety score below the threshold), else helpfulness.
    (_, helpful), (safety_raw, safety) = per_model
    use_safety = unsafe | (torch.sigmoid(safety_raw) < reward.safety_threshold)
    return torch.where(use_safety, safety, helpful)


class Scorer:
    """The score of each (prompt, response, finished): reward model(s), or the gold reward function.

    Each reward model reads the rollout as its own stage trained it to (pipeline/scoring.py): with
    its own tokenizer, EOS only after a finished response, scored at the last attended token.
    """

    def __init__(self, cfg: PPOConfig, policy_tokenizer, dist):
        self.cfg, self.dist = cfg.reward, dist
        self.max_prompt_length = cfg.data.max_prompt_length
        self.batch_size = cfg.ppo.micro_batch_size
        self.share_prompt = cfg.ppo.share_prompt and cfg.ppo.samples_per_prompt > 1
        self.gold = gold_reward(cfg.reward.gold)
        self.models: list[RewardModel] = []
        if cfg.reward.kind == "model":
            for path in cfg.reward.models:
                self.models.append(load_reward_model(path, cfg.model.dtype, dist, require_stats=cfg.reward.normalize))
        self.retokenized = [not same_tokenizer(policy_tokenizer, m.tokenizer) for m in self.models]

    @torch.no_grad()
    def __call__(
        self, prompts: list[RolloutPrompt], responses: list[str], finished: list[bool]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores used for training, gold scores for logging), each (B,)."""
        gold = torch.tensor(self.gold(responses), dtype=torch.float32)
        if self.cfg.kind == "gold":
            scores = gold.clone()
        else:
            per_model = []
            for model in self.models:
                examples = model.examples(
                    [p.text for p in prompts],
                    responses,
                    finished,
                    [p.messages for p in prompts],
                    self.max_prompt_length,
                )
                raw = model.score(examples, self.batch_size, self.dist.device, self.share_prompt)
                per_model.append((raw, (raw - model.mean) / model.std if self.cfg.normalize else raw))
            scores = combine_scores(self.cfg, per_model, torch.tensor([p.unsafe for p in prompts]))
        if self.cfg.clip is not None:
            scores = scores.clamp(-self.cfg.clip, self.cfg.clip)
        if self.cfg.missing_eos_penalty is not None:
            scores = scores + self.cfg.missing_eos_penalty * (~torch.tensor(finished)).float()
        return scores, gold


# ---------------------------------------------------------------------------------------- stage


def run(cfg: PPOConfig, resume: bool = False, overwrite: bool = False) -> Path:
    dist = init_distributed()
    seed_everything(cfg.train.seed)
    run_dir = RunDir(cfg.output_dir, dist, resume, overwrite, produces=("value", "value-adapter", "value-head"))
    meter = CostMeter(dist)
    checkpoint = run_dir.resume_point(cfg) if resume else None

    # ---- load: prompts as token ids
    ledger = DropLedger(cfg.data.strict)
    tokenizer = load_tokenizer(cfg.model, str(checkpoint / "model") if checkpoint else None)
    train_prompts, _ = load_prompts(cfg.data, ledger, chat_renderer(tokenizer))
    distinct: dict[str, RolloutPrompt] = {}  # prompt text -> prompt, flagged unsafe if any duplicate is
    for record in train_prompts:
        seen = distinct.get(record.prompt)
        distinct[record.prompt] = RolloutPrompt(
            record.prompt, [], (seen is not None and seen.unsafe) or record.unsafe, record.messages
        )
    prompts = tokenize_records(
        list(distinct.values()),
        lambda p: RolloutPrompt(p.text, encode_prompt(tokenizer, p.text, cfg.data), p.unsafe, p.messages),
        ledger,
        "ppo prompts",
    )
    report_drops(ledger, dist)
    require_examples(prompts, ledger, "ppo")

    # ---- build: policy, reference, value model, scorer; optimizers; KL controller
    # Under LoRA a checkpoint holds only the adapters (and the value head): the bases load as at the start.
    compute, lora = cfg.model.dtype, cfg.model.lora
    resumed = checkpoint / "model" if checkpoint else None
    policy = load_causal_lm(cfg.model, str(resumed) if resumed and not lora else None)
    policy = add_lora(policy, cfg.model, resumed)
    policy = shard(checkpoint_activations(policy, cfg.train.gradient_checkpointing), dist, compute)
    if lora and cfg.reference_path == cfg.model.name_or_path:
        reference = policy  # with its adapters off (logprob_passes) it is the SFT model: no second copy
    else:
        reference = shard(load_causal_lm(cfg.model, cfg.reference_path), dist, compute).eval().requires_grad_(False)
    critic = cfg.ppo.advantage not in CRITIC_FREE  # RLOO and GRPO take their baseline from the other samples
    value = value_hf = value_optimizer = None
    if critic and cfg.shared_value_head:  # a head on the policy's trunk (pipeline/value_head.py)
        head = new_value_head(policy, checkpoint / "value-head" if checkpoint else None)
        value = shard(head, dist, compute, whole=True)
    elif critic:
        value_source = str(checkpoint / "value") if checkpoint and not lora else cfg.value_model_path
        check_value_tokenizer(value_source, tokenizer)
        value_hf = from_pretrained(
            AutoModelForSequenceClassification,
            value_source,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
            dtype=torch.float32,
        )
        value_hf = add_lora(
            value_hf, cfg.model, checkpoint / "value" if checkpoint else None, head=True, base=value_source
        )
        checkpoint_activations(value_hf, cfg.train.gradient_checkpointing)
        value = shard(ScalarHead(value_hf), dist, compute)
    if cfg.ppo.disable_dropout:
        disable_dropout(policy)
        if value is not None:
            disable_dropout(value)
    scorer = Scorer(cfg, tokenizer, dist)
    masks_of_ours_in(policy, scorer.share_prompt, "ppo.share_prompt", "a row per sample", dist)  # warns if not
    meter.watch(policy, "policy")
    if reference is not policy:  # LoRA's reference passes run through the policy and count as its own
        meter.watch(reference, "reference")
    if value_hf is not None:  # a shared head's few FLOPs ride on the policy's passes
        meter.watch(value, "value")
    for i, model in enumerate(scorer.models):
        meter.watch(model.head, f"reward_{i}")
    policy_optimizer = build_optimizer(policy, cfg.optim)
    if value is not None:
        value_optimizer = build_optimizer(value, cfg.optim)
    value_lr_scale = cfg.value_lr / cfg.optim.lr
    kl_ctl = KLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
    plan = BatchPlan.build(len(prompts), cfg.train, dist.world_size, batch_size=cfg.ppo.rollout_batch_size)
    iterations = plan.total_steps
    trainables = [Trainable("model", policy, policy_optimizer, tokenizer)]
    if cfg.shared_value_head and value is not None:
        trainables.append(Trainable("value-head", value, value_optimizer))
    elif value is not None:
        trainables.append(Trainable("value", value, value_optimizer, tokenizer, hf_model=value_hf, prefix="model."))
    # Rollouts are sampled from this generator, one per process; a checkpoint keeps its state.
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + dist.rank)
    start = 0
    if checkpoint:
        state = run_dir.load_trainer_state(checkpoint, trainables)
        start, kl_ctl.value = state["step"], state["kl_coef"]
        if "generator" in state:
            generator.set_state(state["generator"])
    run_dir.write_config(cfg)
    run_dir.start_metrics(start)
    per_rank = gather_objects(dist, local_parameter_count(policy))
    run_dir.log(
        {
            "step": start,
            "params/total": count_parameters(policy),
            "params/trainable": trainable_parameter_count(policy),
            "params/per_rank": per_rank,
        }
    )
    if dist.is_main:
        retokenized = [path for path, again in zip(cfg.reward.models, scorer.retokenized) if again]
        console.print(
            f"ppo: {len(prompts)} prompts, {iterations} iterations of {cfg.ppo.rollout_batch_size} prompts x "
            f"{cfg.ppo.samples_per_prompt} rollouts, advantages by {cfg.ppo.advantage}, "
            f"{cfg.ppo.epochs} epochs of minibatches of {cfg.ppo.mini_batch_size}; score from "
            + plain(cfg.reward.kind if cfg.reward.kind == "gold" else ", ".join(cfg.reward.models))
            + (
                f" (rollouts re-tokenized for {plain(', '.join(retokenized))}, whose tokenizer is not the policy's)"
                if retokenized
                else ""
            )
            + lora_summary(cfg.model, policy)
        )

    # ---- loop: rollout, score, advantages, update
    metrics: dict = {}
    with StepProgress(dist, iterations, start, "ppo") as progress:
        for iteration in range(start, iterations):
            ids = [i for part in plan.micro_batches(iteration, dist) for i in part]
            lr = lr_at(iteration, iterations, cfg.optim)
            set_lr(policy_optimizer, lr)
            if value_optimizer is not None:
                set_lr(value_optimizer, lr * value_lr_scale)
            done = iteration + 1
            rollout, stats, table = collect_rollout(
                policy,
                reference,
                value,
                scorer,
                tokenizer,
                [prompts[i] for i in ids],
                cfg,
                kl_ctl.value,
                dist,
                generator,
            )
            ensure_finite(done, **{"mean score": stats["objective/scores"]})
            clock = time.perf_counter()
            stats |= ppo_update(policy, value, policy_optimizer, value_optimizer, rollout, cfg, dist, iteration)
            stats["time/update"] = time.perf_counter() - clock
            ensure_finite(
                done, **{"policy loss": stats.get("loss/policy", 0.0), "value loss": stats.get("loss/value", 0.0)}
            )
            kl_ctl.update(stats["objective/kl"], cfg.ppo.rollout_batch_size * cfg.ppo.samples_per_prompt)
            metrics = {"step": done, **stats, "objective/kl_coef": kl_ctl.value, "lr": lr}
            if done % cfg.train.log_every == 0 or done == iterations:
                run_dir.log(metrics)
            progress.update(
                done, {"score": stats["objective/scores"], "kl": stats["objective/kl"], "gold": stats["gold/mean"]}
            )
            if dist.is_main and cfg.sample_table_every and (done % cfg.sample_table_every == 0 or done == 1):
                console.print(_sample_table(done, table))
            if due(done, cfg.train.save_every, iterations):
                extra = {"kl_coef": kl_ctl.value, "generator": generator.get_state()}
                run_dir.save_checkpoint(done, trainables, extra, cfg.train.keep_checkpoints, cfg)

    # ---- save: the policy (and the value model beside it), card
    merged = save_merged(cfg.model)
    run_dir.save_model(policy, tokenizer, merged=merged)
    if cfg.shared_value_head and value is not None:
        save_pretrained(value, None, run_dir.root / "value-head", dist)
    elif value is not None:
        save_pretrained(
            value, tokenizer, run_dir.root / "value", dist, hf_model=value_hf, prefix="model.", merged=merged
        )
    cost = meter.write(run_dir.root)
    run_dir.write_card(
        "ppo",
        cfg,
        {
            **{k: v for k, v in metrics.items() if k != "step"},
            "wall_s": cost["wall_s"],
            "peak_rss_mb": cost["peak_rss_mb"],
        },
    )
    close_distributed()
    return run_dir.model


def check_value_tokenizer(path: str, tokenizer) -> None:
    """The value model reads the policy's token ids, so it must have the policy's vocabulary."""
    try:
        own = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return  # no tokenizer saved beside it: it is taken to be the policy's
    if own.get_vocab() != tokenizer.get_vocab():
        raise InputError(
            f"value model {path}: its tokenizer is not the policy's, and a value model reads the policy's "
            "tokens; set value_model to a model with the policy's tokenizer (the SFT model, for one)"
        )


# ------------------------------------------------------------------------------------- rollouts


@dataclass
class Sampled:
    """A process's sampled rollouts: the examples, the decoded responses, whether each ended with EOS,
    and (ppo.old_logps sampler) each response token's log-prob and entropy, (N,) over the N response
    tokens in row-major order, as a collated batch's labels hold them."""

    examples: list[TokenizedExample]
    responses: list[str]
    finished: list[bool]
    logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None


@torch.no_grad()
def sample_rollouts(policy, tokenizer, prompts: list[RolloutPrompt], cfg: PPOConfig, dist, generator) -> Sampled:
    """A response per prompt, sampled at the rollout temperature."""
    recorded = cfg.sampler_logps
    out = sample(
        policy,
        tokenizer,
        [p.ids for p in prompts],
        cfg.rollout,
        generator,
        dist.sharded,
        with_logps=recorded,
        share_prefill=cfg.ppo.share_prompt,
    )
    examples = [TokenizedExample(p.ids + r, len(p.ids)) for p, r in zip(prompts, out.sequences)]
    sampled = Sampled(examples, tokenizer.batch_decode(out.sequences, skip_special_tokens=True), out.finished)
    if recorded:
        steps = torch.cat([torch.arange(len(s)) for s in out.sequences])
        rows = torch.cat([torch.full((len(s),), i) for i, s in enumerate(out.sequences)])
        sampled.logps, sampled.entropies = out.logps.cpu()[rows, steps], out.entropies.cpu()[rows, steps]
    return sampled


@torch.no_grad()
def logprob_passes(policy, reference, value, batch: dict[str, torch.Tensor], cfg: PPOConfig, sampled=None):
    """Per-token (old log-probs, reference log-probs, values, entropies, response mask), each (B, T-1).

    Log-probs are of the distribution the rollouts were sampled from, softmax(logits / T), for
    the policy and the reference alike, so the ratio and the KL compare like with like. The old
    log-probs and entropies are the sampler's where it recorded them (`sampled`, ppo.old_logps);
    else a policy pass computes them. Every pass runs the LM head on the same response positions
    (`response_logits`), so in bf16 too the KL of a policy to its own copy starts at 0. A shared
    value head reads the policy's last hidden states from the policy's pass. With ppo.share_prompt,
    each pass computes a micro-batch's shared prompts once (pipeline/prompt_groups.py).
    """
    temperature = cfg.rollout.temperature
    shared = value is not None and cfg.shared_value_head
    policy_pass = sampled is None or sampled.logps is None or shared
    old_logps, ref_logps, old_values, entropies, masks = [], [], [], [], []
    for rows in chunks(range(batch["input_ids"].shape[0]), cfg.ppo.micro_batch_size):
        part = {k: v[rows.start : rows.stop] for k, v in batch.items()}
        labels = part["labels"]
        groups = prompt_groups(part["input_ids"], part["attention_mask"], part["prompt_lengths"], cfg)
        hidden = None
        if policy_pass:
            logps, entropy, hidden = policy_logps(policy, part, labels, temperature, shared, True, groups)
            old_logps.append(logps)
            entropies.append(entropy)
        with adapters_disabled(reference):  # a LoRA policy is its own reference, adapters off
            logps, mask = response_token_logps(
                reference,
                part["input_ids"],
                part["attention_mask"],
                labels,
                temperature,
                groups=groups and groups.for_model(reference),
            )
        ref_logps.append(logps)
        masks.append(mask)
        if value is None:  # RLOO and GRPO: no value model, the baseline is the other samples
            old_values.append(torch.zeros(mask.shape, dtype=torch.float32, device=mask.device))
        elif shared:
            old_values.append(value(hidden)[:, :-1])
        else:
            old_values.append(value_scores(value, part["input_ids"], part["attention_mask"], groups)[:, :-1])
    mask = torch.cat(masks)
    if policy_pass:
        old, entropy = torch.cat(old_logps), torch.cat(entropies)
    else:
        old = scatter_response_logps(sampled.logps.to(mask.device), batch["labels"])[0]
        entropy = scatter_response_logps(sampled.entropies.to(mask.device), batch["labels"])[0]
    return old, torch.cat(ref_logps), torch.cat(old_values) * mask, entropy, mask


def prompt_groups(input_ids, attention_mask, prompt_lengths, cfg: PPOConfig) -> PromptGroups | None:
    """A micro-batch's rows grouped by their prompt (ppo.share_prompt), or None: one row each."""
    if not cfg.ppo.share_prompt or cfg.ppo.samples_per_prompt < 2:
        return None
    return PromptGroups.of(input_ids, attention_mask, prompt_lengths.tolist())


def policy_logps(policy, part: dict, labels, temperature: float, with_hidden: bool, with_entropy: bool, groups):
    """(log-probs, entropies or None, last hidden states or None) of the policy on a micro-batch's
    rows, from one forward with the LM head on the response positions; log-probs and entropies are
    (B, T-1), of softmax(logits / T)."""
    groups = groups and groups.for_model(policy)
    logits, kept, hidden = response_logits(
        policy, part["input_ids"], part["attention_mask"], labels, with_hidden=with_hidden, groups=groups
    )
    logits = tempered(logits, temperature)
    logps = scatter_response_logps(selected_logps(logits, labels[:, 1:][kept]), labels)[0]
    entropy = scatter_response_logps(entropy_from_logits(logits), labels)[0] if with_entropy else None
    return logps, entropy, hidden


def value_scores(value, input_ids, attention_mask, groups) -> torch.Tensor:
    """A value model's (ScalarHead's) score at every position, (B, T)."""
    groups = groups and groups.for_model(value)
    return groups.scores(value) if groups is not None else value(input_ids, attention_mask)


def advantages_and_returns(scores, old_logps, ref_logps, old_values, mask, cfg: PPOConfig, kl_coef: float, dist):
    """(per-token KL, advantages, returns), each (B, T-1): KL-penalised rewards through GAE, whitened."""
    kl = kl_penalty(old_logps, ref_logps, cfg.kl.estimator) * mask  # (B, T-1)
    rewards = token_rewards(scores.to(kl.device), kl, mask, kl_coef)
    advantages, returns = ADVANTAGE_ESTIMATORS[cfg.ppo.advantage](rewards, old_values, mask, cfg.ppo)
    if cfg.ppo.whiten_advantages:  # over the whole rollout batch, all processes
        n = all_reduce_sum(dist, mask.sum().float())
        mean = all_reduce_sum(dist, (advantages * mask).sum()) / n
        var = all_reduce_sum(dist, (((advantages - mean) * mask) ** 2).sum()) / n
        advantages = masked_whiten(advantages, mask, mean, var)
    return kl, advantages, returns


@torch.no_grad()
def collect_rollout(
    policy,
    reference,
    value,
    scorer,
    tokenizer,
    prompts: list[RolloutPrompt],
    cfg: PPOConfig,
    kl_coef: float,
    dist,
    generator,
) -> tuple[Rollout, dict, list]:
    """Sample, score and compute advantages for this process's prompts.

    Every pass runs in eval mode, as in TRL and OpenRLHF: with dropout, the "old" log-probs would be
    of another network than the one that sampled. The returned statistics are over all processes.
    """
    clock = time.perf_counter()
    policy.eval()
    if value is not None:
        value.eval()
    # Each prompt's samples are consecutive: the critic-free estimators compare them as a group.
    prompts = [p for p in prompts for _ in range(cfg.ppo.samples_per_prompt)]
    sampled = sample_rollouts(policy, tokenizer, prompts, cfg, dist, generator)
    examples, responses, finished = sampled.examples, sampled.responses, sampled.finished
    batch = collate(examples, tokenizer.pad_token_id) | {
        "prompt_lengths": torch.tensor([e.prompt_length for e in examples])
    }
    batch = {k: v.to(dist.device) for k, v in batch.items()}
    generate_s, clock = time.perf_counter() - clock, time.perf_counter()

    old_logps, ref_logps, old_values, entropy, mask = logprob_passes(policy, reference, value, batch, cfg, sampled)
    scores, gold = scorer(prompts, responses, finished)
    score_s, clock = time.perf_counter() - clock, time.perf_counter()
    kl, advantages, returns = advantages_and_returns(scores, old_logps, ref_logps, old_values, mask, cfg, kl_coef, dist)
    advantages_s = time.perf_counter() - clock

    scores = scores.to(kl.device)
    sums = Sums()
    sums.add(
        **{
            "objective/kl": ((old_logps - ref_logps) * mask).sum(),  # per-sequence KL, the k1 estimate, for logging
            "objective/entropy": entropy.sum(),
            "objective/scores": scores.sum(),
            "objective/rlhf_reward": (scores - kl_coef * kl.sum(-1)).sum(),
            "gold/mean": gold.sum(),
            "rollout/response_length": mask.sum(),
            "rollout/finished": sum(finished),
            "rollouts": len(examples),
        }
    )
    totals = sums.over_ranks(dist)
    n_rollouts = totals.pop("rollouts")
    stats = {name: total / n_rollouts for name, total in totals.items()} | {
        **({"val/explained_variance": explained_variance(old_values, returns, mask)} if value is not None else {}),
        # this process's seconds per phase (rank 0's are logged): where an iteration's time goes
        "time/generate": generate_s,
        "time/score": score_s,
        "time/advantages": advantages_s,
    }
    table = [(p.text, r, float(s), float(g)) for p, r, s, g in list(zip(prompts, responses, scores, gold))[:4]]
    rollout = Rollout(
        batch["input_ids"],
        batch["attention_mask"],
        batch["prompt_lengths"],
        mask,
        old_logps,
        old_values,
        advantages,
        returns,
    )
    return rollout, stats, table


def ppo_update(
    policy, value, policy_optimizer, value_optimizer, rollout: Rollout, cfg: PPOConfig, dist, iteration: int
) -> dict:
    """`ppo.epochs` passes of minibatches over the rollout batch; returns mean losses and statistics."""
    temperature = cfg.rollout.temperature
    shared = value is not None and cfg.shared_value_head
    if value is not None and iteration < cfg.ppo.critic_warmup_iterations:
        return critic_warmup_update(policy, value, value_optimizer, rollout, cfg, dist, iteration)
    policy.train()
    if value is not None:
        value.train()
    sums = Sums()
    for tokens, micro_rows in minibatches(rollout, cfg, dist, iteration):
        for i, rows in enumerate(micro_rows):
            sync_on_last(policy, dist, i, len(micro_rows))
            if value is not None:
                sync_on_last(value, dist, i, len(micro_rows))
            mask = rollout.mask[rows]
            labels = rollout.input_ids[rows].masked_fill(~_label_mask(mask), -100)
            part = {"input_ids": rollout.input_ids[rows], "attention_mask": rollout.attention_mask[rows]}
            groups = prompt_groups(part["input_ids"], part["attention_mask"], rollout.prompt_lengths[rows], cfg)
            # the entropy bonus from the same logits; a shared head reads the same forward's hidden states
            logps, entropy, hidden = policy_logps(
                policy, part, labels, temperature, shared, bool(cfg.ppo.entropy_coef), groups
            )
            policy_loss, policy_stats = ppo_policy_loss(
                logps, rollout.old_logps[rows], rollout.advantages[rows], mask, cfg.ppo.clip_range
            )
            loss = policy_loss
            if value is not None:
                # one backward through the shared trunk for both losses, or a value model of its own
                values = value(hidden) if shared else value_scores(value, **part, groups=groups)
                values = values[:, :-1]
                value_loss, value_clipped = ppo_value_loss(
                    values, rollout.old_values[rows], rollout.returns[rows], mask, cfg.ppo.value_clip_range
                )
                loss = loss + cfg.ppo.value_coef * value_loss
                sums.add(**{"loss/value": value_loss, "val/clipfrac": value_clipped})
            if cfg.ppo.entropy_coef:
                loss = loss - cfg.ppo.entropy_coef * (entropy * mask).sum()
            backward_global_mean(loss, tokens, dist)  # a token mean over the global minibatch
            sums.add(
                **{
                    "loss/policy": policy_loss,
                    "policy/clipfrac": policy_stats["clipfrac"],
                    "policy/approxkl": policy_stats["approxkl"],
                    "tokens": mask.sum(),
                }
            )
        clip_and_step(policy, policy_optimizer, cfg.optim.max_grad_norm, iteration + 1)
        if value is not None:
            clip_and_step(value, value_optimizer, cfg.optim.max_grad_norm, iteration + 1)
    totals = sums.over_ranks(dist)
    tokens = totals.pop("tokens")
    return {name: total / tokens for name, total in totals.items()}


def minibatches(rollout: Rollout, cfg: PPOConfig, dist, iteration: int):
    """Each optimizer step of an update, `ppo.epochs` passes over the rollouts in a seeded order: (the
    minibatch's response tokens over all processes, the normaliser; its micro-batches of row indices)."""
    rows_per_mini = cfg.ppo.mini_batch_size // dist.world_size
    n_rows = rollout.input_ids.shape[0]
    for epoch in range(cfg.ppo.epochs):
        order = torch.randperm(
            n_rows, generator=torch.Generator().manual_seed(cfg.train.seed + 7919 * iteration + epoch)
        )
        for start in range(0, n_rows, rows_per_mini):
            mini = order[start : start + rows_per_mini]
            tokens = all_reduce_sum(dist, rollout.mask[mini].sum().float())
            yield tokens, [mini[c.start : c.stop] for c in chunks(range(len(mini)), cfg.ppo.micro_batch_size)]


def critic_warmup_update(
    policy, value, value_optimizer, rollout: Rollout, cfg: PPOConfig, dist, iteration: int
) -> dict:
    """`ppo_update` with the policy frozen (ppo.critic_warmup_iterations): the value loss alone, its
    minibatches and epochs the same. A shared head reads the policy's hidden states without a gradient,
    so the trunk, which is the policy, does not move; a value model of its own needs no policy pass."""
    shared = cfg.shared_value_head
    value.train()
    sums = Sums()
    for tokens, micro_rows in minibatches(rollout, cfg, dist, iteration):
        for i, rows in enumerate(micro_rows):
            sync_on_last(value, dist, i, len(micro_rows))
            ids, attention, mask = rollout.input_ids[rows], rollout.attention_mask[rows], rollout.mask[rows]
            if shared:
                with torch.no_grad():
                    hidden = policy(input_ids=ids, attention_mask=attention, output_hidden_states=True)
                values = value(hidden.hidden_states[-1])[:, :-1]
            else:
                values = value(ids, attention)[:, :-1]
            value_loss, value_clipped = ppo_value_loss(
                values, rollout.old_values[rows], rollout.returns[rows], mask, cfg.ppo.value_clip_range
            )
            backward_global_mean(cfg.ppo.value_coef * value_loss, tokens, dist)
            sums.add(**{"loss/value": value_loss, "val/clipfrac": value_clipped, "tokens": mask.sum()})
        clip_and_step(value, value_optimizer, cfg.optim.max_grad_norm, iteration + 1)
    totals = sums.over_ranks(dist)
    tokens = totals.pop("tokens")
    return {name: total / tokens for name, total in totals.items()}


def _label_mask(mask: torch.Tensor) -> torch.Tensor:
    """The (B, T) label positions of a (B, T-1) response mask: token t+1 is scored at position t."""
    return torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)


def _sample_table(step: int, rows: list) -> Table:
    table = Table(title=f"ppo samples at iteration {step}", show_lines=True)
    for column in ("prompt", "response", "score", "gold"):
        table.add_column(column, overflow="fold")
    for prompt, response, score, gold in rows:
        table.add_row(cell(prompt), cell(response), f"{score:+.3f}", f"{gold:+.3f}")
    return table
