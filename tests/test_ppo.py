"""The PPO stage: the update's invariants in-process, and seeded runs on the small pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2ForSequenceClassification

from helpers import ppo_rollout, read_metrics, run_cli, sets
from pipeline.config import (
    ArchitectureConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PPOAlgoConfig,
    PPOConfig,
    RewardSourceConfig,
    SampleConfig,
)
from pipeline.data.builtin_sentiment import heldout_prompts, load_rows
from pipeline.data.tokenize import encode_prompt
from pipeline.evaluation import paired_bootstrap, sample_and_score
from pipeline.judges import gold_reward
from pipeline.launch import init_distributed
from pipeline.logprobs import token_logps
from pipeline.models import ScalarHead, create_scratch_model, disable_dropout, load_tokenizer, train_tokenizer
from pipeline.ppo import KLController, RolloutPrompt, combine_scores, ppo_update
from pipeline.training import build_optimizer


@pytest.fixture(scope="module")
def tiny_setup():
    texts = [row["review"] for row in load_rows("train", 300)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    arch = ArchitectureConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64)
    policy = create_scratch_model(arch, tokenizer, seed=0)
    value_config = copy.deepcopy(policy.config)
    value_config.num_labels = 1
    value = ScalarHead(GPT2ForSequenceClassification(value_config))
    cfg = PPOConfig(
        reward=RewardSourceConfig(kind="gold"),
        data=DataConfig(max_length=64, max_prompt_length=16),
        rollout=SampleConfig(max_new_tokens=12),
        ppo=PPOAlgoConfig(rollout_batch_size=8, mini_batch_size=8, micro_batch_size=4, epochs=1),
        optim=OptimConfig(lr=1e-3, schedule="constant", warmup_ratio=0.0),
    )
    prompts = [
        RolloutPrompt(" ".join(t.split()[:3]), encode_prompt(tokenizer, " ".join(t.split()[:3]), cfg.data))
        for t in texts[:8]
    ]
    return tokenizer, policy, value, cfg, prompts


def rollout_and_update(tiny_setup, epochs: int):
    tokenizer, policy, value, cfg, prompts = tiny_setup
    cfg = copy.deepcopy(cfg)
    cfg.ppo.epochs = epochs
    return first_iteration(copy.deepcopy(policy), copy.deepcopy(value), tokenizer, cfg, prompts)


def test_first_epoch_with_the_rollout_policy_has_ratio_one(tiny_setup):
    rollout, stats, update = rollout_and_update(tiny_setup, epochs=1)
    assert rollout.mask.any(dim=1).all()  # every prompt got a response
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert update["policy/clipfrac"] == 0.0
    assert update["policy/approxkl"] == pytest.approx(0.0, abs=1e-10)
    # The advantages were whitened over the response tokens.
    adv = rollout.advantages[rollout.mask]
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert adv.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)


def with_dropout(tiny_setup, p: float):
    """The tiny setup's policy with every dropout at p, left in train mode (as after an update)."""
    tokenizer, policy, value, cfg, prompts = tiny_setup
    arch = ArchitectureConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, dropout=p)
    policy = create_scratch_model(arch, tokenizer, seed=0).train()
    return tokenizer, policy, copy.deepcopy(value).train(), copy.deepcopy(cfg), prompts


def first_iteration(policy, value, tokenizer, cfg, prompts):
    dist = init_distributed()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rollout, stats, _ = ppo_rollout(policy, reference, value, tokenizer, cfg, prompts)
    update = ppo_update(
        policy, value, build_optimizer(policy, cfg.optim), build_optimizer(value, cfg.optim), rollout, cfg, dist, 0
    )
    return rollout, stats, update


def test_dropout_never_reaches_the_rollout_passes_and_is_off_in_the_update(tiny_setup):
    tokenizer, policy, value, cfg, prompts = with_dropout(tiny_setup, 0.1)
    # Rollout, reference, value and old log-prob passes run in eval mode: at iteration 1 the policy
    # is the reference, so the KL is 0 although the policy was left in train mode with dropout 0.1.
    disable_dropout(policy), disable_dropout(value)  # what run() does under ppo.disable_dropout (the default)
    _, stats, update = first_iteration(policy, value, tokenizer, cfg, prompts)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert update["policy/approxkl"] == pytest.approx(0.0, abs=1e-10)  # the ratio is 1 before any update
    assert update["policy/clipfrac"] == 0.0
    # Left on, dropout still stays out of the rollout (KL 0), but makes the update's ratio noise.
    tokenizer, policy, value, cfg, prompts = with_dropout(tiny_setup, 0.1)
    _, stats, update = first_iteration(policy, value, tokenizer, cfg, prompts)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert update["policy/approxkl"] > 1e-4


def test_the_rollout_log_probs_are_tempered(tiny_setup):
    tokenizer, policy, value, cfg, prompts = tiny_setup
    policy, cfg = copy.deepcopy(policy), copy.deepcopy(cfg)
    cfg.rollout.temperature = 0.7
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rollout, stats, _ = ppo_rollout(policy, reference, copy.deepcopy(value), tokenizer, cfg, prompts)
    with torch.no_grad():
        logits = reference(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits
    labels = rollout.input_ids.masked_fill(~torch.cat([torch.zeros_like(rollout.mask[:, :1]), rollout.mask], 1), -100)
    tempered, mask = token_logps(logits / 0.7, labels)
    untempered, _ = token_logps(logits, labels)
    torch.testing.assert_close(rollout.old_logps[mask], tempered[mask], atol=1e-5, rtol=1e-5)
    assert (rollout.old_logps[mask] - untempered[mask]).abs().max() > 1e-2
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)


def test_ppo_rejects_top_p_and_greedy_rollouts(tmp_path):
    from pipeline.config import ConfigError, load_config

    config = tmp_path / "ppo.yaml"
    config.write_text("reward: {kind: gold}\nmodel: {name_or_path: gpt2}\n")
    with pytest.raises(ConfigError, match="rollout.top_p: 0.9 is not supported by PPO"):
        load_config(PPOConfig, config, ["rollout.top_p=0.9"])
    with pytest.raises(ConfigError, match="rollout.temperature"):
        load_config(PPOConfig, config, ["rollout.temperature=0"])


def test_later_epochs_see_the_policy_move(tiny_setup):
    _, _, update = rollout_and_update(tiny_setup, epochs=3)
    assert update["policy/approxkl"] > 1e-8


def rollout_with_old_logps(policy, reference, tokenizer, cfg, prompts, source: str, temperature: float):
    cfg = copy.deepcopy(cfg)
    cfg.ppo.old_logps, cfg.ppo.advantage, cfg.ppo.samples_per_prompt = source, "grpo", 2
    cfg.rollout.temperature = temperature
    return ppo_rollout(policy, reference, None, tokenizer, cfg, prompts, seed=3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_samplers_log_probs_equal_a_policy_pass(tiny_setup, arch):
    """ppo.old_logps sampler: the log-prob and entropy of each response token, recorded by the sampler
    step by step (left-padded prompts, a KV cache), equal those of a whole-sequence pass."""
    tokenizer, _, _, cfg, prompts = tiny_setup
    shape = ArchitectureConfig(type=arch, n_layer=2, n_head=2, n_embd=32, n_positions=64)
    policy = create_scratch_model(shape, tokenizer, seed=1)
    with torch.no_grad():  # a policy that differs from its reference, so the KL is not 0 by construction
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    reference = create_scratch_model(shape, tokenizer, seed=1).eval().requires_grad_(False)
    for temperature in (1.0, 0.7):
        runs = {}
        for source in ("sampler", "recompute"):
            runs[source] = rollout_with_old_logps(
                copy.deepcopy(policy), reference, tokenizer, cfg, prompts, source, temperature
            )
        (sampled, sampled_stats, _), (recomputed, recomputed_stats, _) = runs["sampler"], runs["recompute"]
        assert torch.equal(sampled.input_ids, recomputed.input_ids)  # the same rollouts
        assert sampled.mask.sum() > 3 * len(prompts)
        torch.testing.assert_close(sampled.old_logps, recomputed.old_logps, atol=1e-5, rtol=0)
        assert (sampled.old_logps[~sampled.mask] == 0).all()
        for name in ("objective/entropy", "objective/kl", "objective/rlhf_reward"):
            assert sampled_stats[name] == pytest.approx(recomputed_stats[name], abs=1e-4)
        torch.testing.assert_close(sampled.advantages, recomputed.advantages, atol=1e-4, rtol=0)
    # The reference differs from this policy: a KL that is not 0 is measured alike both ways.
    assert sampled_stats["objective/kl"] > 1e-3


def test_where_the_old_log_probs_come_from(tmp_path):
    from pipeline.config import ConfigError, load_config

    config = tmp_path / "ppo.yaml"
    config.write_text("reward: {kind: gold}\nmodel: {name_or_path: gpt2}\n")
    assert load_config(PPOConfig, config, []).sampler_logps  # float32: the sampler's
    assert not load_config(PPOConfig, config, ["model.dtype=bfloat16"]).sampler_logps
    assert load_config(PPOConfig, config, ["model.dtype=bfloat16", "ppo.old_logps=sampler"]).sampler_logps
    assert not load_config(PPOConfig, config, ["ppo.old_logps=recompute"]).sampler_logps
    assert not load_config(PPOConfig, config, ["value_model=shared"]).sampler_logps
    with pytest.raises(ConfigError, match="ppo.old_logps: value_model shared reads its values"):
        load_config(PPOConfig, config, ["value_model=shared", "ppo.old_logps=sampler"])


def test_adaptive_kl_controller_moves_toward_the_target():
    ctl = KLController(coef=0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=12.0, n_rollouts=100)  # error clipped to +0.2: coef * (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(current_kl=3.0, n_rollouts=100)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = KLController(coef=0.1, target=None, horizon=1000)
    fixed.update(current_kl=50.0, n_rollouts=100)
    assert fixed.value == 0.1


def test_two_reward_models_combine_by_the_llama2_rule():
    reward = RewardSourceConfig(models=["helpful", "safety"], safety_threshold=0.15)
    helpful = torch.tensor([1.0, 2.0, 3.0])
    safety_raw = torch.tensor([-3.0, 0.0, 3.0])  # sigmoid: 0.047 (unsafe), 0.5, 0.95
    no_flags = torch.tensor([False, False, False])
    combined = combine_scores(reward, [(helpful, helpful), (safety_raw, safety_raw * 10)], no_flags)
    assert combined.tolist() == [-30.0, 2.0, 3.0]
    flagged = combine_scores(
        reward, [(helpful, helpful), (safety_raw, safety_raw * 10)], torch.tensor([False, False, True])
    )
    assert flagged.tolist() == [-30.0, 2.0, 30.0]  # an unsafe prompt is scored by the safety model
    weighted = RewardSourceConfig(models=["h", "s"], combine="weighted", weights=[0.75, 0.25])
    assert combine_scores(weighted, [(helpful, helpful), (safety_raw, safety_raw)], no_flags).tolist() == pytest.approx(
        [0.0, 1.5, 3.0]
    )


# ------------------------------------------------------------------------- seeded runs end to end


def iterations(run_dir) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "objective/kl" in m]


def gold_gain(sft_path, policy_path, n_prompts: int = 200):
    prompts = heldout_prompts(n_prompts, seed=0)
    sample, data = SampleConfig(max_new_tokens=32, temperature=1.0), DataConfig(max_length=96, max_prompt_length=16)
    gold = gold_reward("vader")
    scored = {}
    for name, path in (("sft", sft_path), ("policy", policy_path)):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
        scored[name] = sample_and_score(model, tokenizer, prompts, gold, sample, data, seed=1)
    return paired_bootstrap(scored["policy"].gold, scored["sft"].gold, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "gold"])
def test_ppo_raises_the_gold_reward_over_sft(small_pipeline, small_reward_model, kind, tmp_path):
    out = tmp_path / f"ppo-{kind}"
    result = run_cli("ppo", str(small_pipeline["ppo"]), "--set", f"output_dir={out}", "--set", f"reward.kind={kind}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = iterations(out)
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(m["policy/clipfrac"] < 0.5 for m in metrics)
    diff, low, high = gold_gain(small_pipeline["root"] / "sft" / "model", out / "model")
    assert low > 0, (kind, diff, low, high)
    assert (out / "value" / "model.safetensors").is_file()


@pytest.mark.slow
def test_adaptive_kl_keeps_the_measured_kl_near_its_target(small_pipeline, small_reward_model, tmp_path):
    out = tmp_path / "ppo-adaptive"
    target = 1.0
    result = run_cli(
        "ppo",
        str(small_pipeline["ppo"]),
        *sets(
            f"output_dir={out}",
            "reward.kind=gold",
            "train.max_steps=16",
            f"kl.target={target}",
            "kl.coef=0.2",
            "kl.horizon=640",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = iterations(out)
    late = [m["objective/kl"] for m in metrics[-6:]]
    assert 0.5 * target < sum(late) / len(late) < 2.0 * target, [m["objective/kl"] for m in metrics]
    coefs = [m["objective/kl_coef"] for m in metrics]
    assert coefs != [coefs[0]] * len(coefs)  # the controller acted


@pytest.mark.slow
def test_grpo_sharded_over_two_processes_is_the_same_with_the_prompt_shared(small_pipeline, tmp_path):
    """ppo.share_prompt under FSDP2: the sampler's shared prefill and the grouped passes on each
    process give the run of a row per sample, to float rounding."""
    runs = {}
    for share in ("true", "false"):
        out = tmp_path / f"grpo-sharded-{share}"
        overrides = ("reward.kind=gold", "ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.rollout_batch_size=16")
        args = ["ppo", str(small_pipeline["ppo"]), *sets(f"output_dir={out}", "train.max_steps=2", "ppo.epochs=1")]
        args += sets(*overrides, f"ppo.share_prompt={share}")
        result = run_cli(*args, "--num-processes", "2")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[share] = iterations(out)
    assert len(runs["true"]) == len(runs["false"]) == 2
    for shared, rows in zip(runs["true"], runs["false"]):
        for name in ("objective/kl", "objective/entropy", "gold/mean", "loss/policy"):
            assert shared[name] == pytest.approx(rows[name], rel=1e-3, abs=1e-5), name
    assert runs["true"][1]["objective/kl"] > 1e-2  # the first update moved the policy


@pytest.mark.slow
def test_ppo_runs_sharded_over_two_processes_and_resumes(small_pipeline, small_reward_model, tmp_path):
    out = tmp_path / "ppo-sharded"
    args = [
        "ppo",
        str(small_pipeline["ppo"]),
        *sets(f"output_dir={out}", "train.max_steps=3", "train.save_every=2", "ppo.epochs=1"),
    ]
    result = run_cli(*args, "--num-processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    params = next(m for m in metrics if "params/per_rank" in m)
    assert len(params["params/per_rank"]) == 2
    assert max(params["params/per_rank"]) < 0.55 * params["params/total"]
    assert [m["step"] for m in metrics if "objective/kl" in m] == [1, 2, 3]
    assert (out / "checkpoints" / "step-2" / "value" / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    # Resume from step 2 in one process: only the last iteration runs again.
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [m["step"] for m in read_metrics(out) if "objective/kl" in m]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_a_resumed_run_ends_with_bit_identical_weights(small_pipeline, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ppo-resume"
    args = [
        "ppo",
        str(small_pipeline["ppo"]),
        *sets(
            f"output_dir={out}",
            "reward.kind=gold",
            "train.max_steps=4",
            "train.save_every=2",
            "ppo.rollout_batch_size=16",
            "ppo.mini_batch_size=8",
            "ppo.micro_batch_size=8",
            "ppo.epochs=2",
        ),
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = {name: load_file(out / name / "model.safetensors") for name in ("model", "value")}
    # Resume from the step-2 checkpoint: iterations 3 and 4 are sampled and trained again.
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    for name, weights in uninterrupted.items():
        resumed = load_file(out / name / "model.safetensors")
        assert all(torch.equal(resumed[k], weights[k]) for k in weights), name


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_advantages_raise_the_gold_reward_with_no_value_model(small_pipeline, advantage, tmp_path):
    """RLOO and GRPO: 16 prompts x 4 samples, the same 64 rollouts per iteration as PPO's, no value model."""
    out = tmp_path / f"ppo-{advantage}"
    args = [
        "ppo",
        str(small_pipeline["ppo"]),
        *sets(
            f"output_dir={out}",
            "reward.kind=gold",
            f"ppo.advantage={advantage}",
            "ppo.samples_per_prompt=4",
            "ppo.rollout_batch_size=16",
            "train.save_every=6",
        ),
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = iterations(out)
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert all("loss/value" not in m and "val/explained_variance" not in m for m in metrics)
    diff, low, high = gold_gain(small_pipeline["root"] / "sft" / "model", out / "model")
    assert low > 0, (advantage, diff, low, high)
    assert not (out / "value").exists() and not (out / "checkpoints" / "step-6" / "value").exists()
    # A run resumed from its step-6 checkpoint (no value model in it) ends where the whole run did.
    from safetensors.torch import load_file

    whole = load_file(out / "model" / "model.safetensors")
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


@pytest.mark.slow
def test_critic_free_advantages_need_groups_and_no_value_model(small_pipeline):
    for overrides, message in (
        (["ppo.advantage=rloo"], "samples_per_prompt: rloo compares several samples"),
        (
            ["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.mini_batch_size=48"],
            "does not divide the 128 rollouts",
        ),
        (["ppo.advantage=rloo", "ppo.samples_per_prompt=2", "value_model=gpt2"], "trains no value model"),
        (["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "value_model=shared"], "trains no value model"),
    ):
        result = run_cli("ppo", str(small_pipeline["ppo"]), *sets("reward.kind=gold", *overrides))
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
