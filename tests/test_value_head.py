"""PPO's value head on the policy's trunk (`value_model: shared`): one forward for log-probs and values.

In process: the fused pass gives the numbers two separate passes give (log-probs, values, losses,
gradients). On the small pipeline: a shared-head run trains, saves and resumes its head, alone
and sharded over two processes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import ppo_rollout, read_metrics, run_cli, sets, value_classifier
from pipeline.config import (
    ArchitectureConfig,
    DataConfig,
    OptimConfig,
    PPOAlgoConfig,
    PPOConfig,
    RewardSourceConfig,
    SampleConfig,
)
from pipeline.data.builtin_sentiment import load_rows
from pipeline.data.tokenize import encode_prompt
from pipeline.errors import InputError
from pipeline.launch import init_distributed
from pipeline.logprobs import response_token_logps
from pipeline.losses import ppo_policy_loss, ppo_value_loss
from pipeline.models import ScalarHead, create_scratch_model, train_tokenizer
from pipeline.ppo import RolloutPrompt, ppo_update
from pipeline.training import build_optimizer
from pipeline.value_head import ValueHead, new_value_head


@pytest.fixture(scope="module")
def tiny():
    texts = [row["review"] for row in load_rows("train", 300)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    cfg = PPOConfig(
        value_model="shared",
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
    return tokenizer, cfg, prompts


def models(tokenizer, family: str = "gpt2"):
    arch = ArchitectureConfig(type=family, n_layer=2, n_head=2, n_embd=32, n_positions=64)
    policy = create_scratch_model(arch, tokenizer, seed=0)
    torch.manual_seed(1)
    return policy, new_value_head(policy)


def rollout(policy, head, tokenizer, cfg, prompts):
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return ppo_rollout(policy, reference, head, tokenizer, cfg, prompts)[:2]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_forward_gives_the_log_probs_and_last_hidden_states_of_two(tiny, family):
    tokenizer, _, _ = tiny
    policy, _ = models(tokenizer, family)
    ids = torch.randint(2, 400, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # a shorter row, right-padded
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    logps, kept = response_token_logps(policy, ids, mask, labels, 0.7)
    fused_logps, fused_kept, hidden = response_token_logps(policy, ids, mask, labels, 0.7, with_hidden=True)
    assert torch.equal(kept, fused_kept)
    torch.testing.assert_close(fused_logps, logps, rtol=0, atol=1e-6)
    trunk = policy.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden, trunk, rtol=0, atol=1e-6)


def test_the_rollout_values_are_the_head_on_the_policys_last_hidden_states(tiny):
    tokenizer, cfg, prompts = tiny
    policy, head = models(tokenizer)
    batch, stats = rollout(policy, head, tokenizer, cfg, prompts)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    with torch.no_grad():
        trunk = policy.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        expected = head(trunk)[:, :-1] * batch.mask
    torch.testing.assert_close(batch.old_values, expected, rtol=0, atol=1e-6)
    assert batch.old_values[batch.mask].abs().max() > 0  # a head that gives values, not zeros


def test_the_shared_update_steps_as_two_separate_passes_would(tiny):
    """The fused update (one forward, one backward) against the same losses built from a separate
    policy pass and a separate trunk pass for the head: equal gradients, so equal steps."""
    tokenizer, cfg, prompts = tiny
    policy, head = models(tokenizer)
    batch, _ = rollout(policy, head, tokenizer, cfg, prompts)
    cfg = copy.deepcopy(cfg)
    cfg.optim.max_grad_norm = 1e9  # the gradients as computed, not clipped
    fused_policy, fused_head = copy.deepcopy(policy), copy.deepcopy(head)
    grads = {}

    def keep_grads(optimizer_of, name):
        optimizer = build_optimizer(optimizer_of, cfg.optim)
        step = optimizer.step

        def record():
            grads[name] = [p.grad.clone() for p in optimizer_of.parameters()]
            step()

        optimizer.step = record
        return optimizer

    stats = ppo_update(
        fused_policy,
        fused_head,
        keep_grads(fused_policy, "policy"),
        keep_grads(fused_head, "head"),
        batch,
        cfg,
        init_distributed(),
        0,
    )
    assert stats["loss/value"] > 0
    # Two separate passes, as a separate value model would run them (ppo.micro_batch_size 4 of 8 rows).
    policy.train(), head.train()
    tokens = batch.mask.sum().float()
    for rows in (slice(0, 4), slice(4, 8)):
        mask = batch.mask[rows]
        labels = batch.input_ids[rows].masked_fill(~torch.cat([torch.zeros_like(mask[:, :1]), mask], 1), -100)
        logps, _ = response_token_logps(
            policy, batch.input_ids[rows], batch.attention_mask[rows], labels, cfg.rollout.temperature
        )
        trunk = policy.base_model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows])
        values = head(trunk.last_hidden_state)[:, :-1]
        policy_loss, _ = ppo_policy_loss(logps, batch.old_logps[rows], batch.advantages[rows], mask, 0.2)
        value_loss, _ = ppo_value_loss(values, batch.old_values[rows], batch.returns[rows], mask, 0.2)
        ((policy_loss + cfg.ppo.value_coef * value_loss) / tokens).backward()
    for name, module in (("policy", policy), ("head", head)):
        for fused, param in zip(grads[name], module.parameters()):
            torch.testing.assert_close(fused, param.grad, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads["head"])


def test_a_saved_head_loads_back_and_a_mismatched_one_is_refused(tmp_path, tiny):
    tokenizer, _, _ = tiny
    policy, head = models(tokenizer)
    folder = tmp_path / "value-head"
    folder.mkdir()
    head.save_folder(head.state_dict(), folder)
    loaded = new_value_head(policy, folder)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), head.state_dict().values()))
    wider = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=48, n_positions=64), tokenizer, 0)
    with pytest.raises(InputError, match="hidden size 32, but the policy's is 48"):
        new_value_head(wider, folder)
    assert isinstance(loaded, ValueHead)
    (folder / "value_head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot load the value head .SafetensorError"):
        new_value_head(policy, folder)
    with pytest.raises(InputError, match="cannot load the value head .FileNotFoundError"):
        new_value_head(policy, tmp_path / "missing")


def shared_args(small_pipeline, out, *extra):
    return [
        "ppo",
        str(small_pipeline["ppo"]),
        *sets(
            f"output_dir={out}",
            "reward.kind=gold",
            "value_model=shared",
            "train.max_steps=4",
            "train.save_every=2",
            "ppo.rollout_batch_size=16",
            "ppo.mini_batch_size=8",
            "ppo.micro_batch_size=8",
            "ppo.epochs=2",
            *extra,
        ),
    ]


@pytest.mark.slow
def test_a_shared_head_run_saves_its_head_and_resumes_to_identical_weights(small_pipeline, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ppo-shared"
    args = shared_args(small_pipeline, out)
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [m for m in read_metrics(out) if "objective/kl" in m]
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert all("loss/value" in m and "val/explained_variance" in m for m in metrics)
    assert not (out / "value").exists()  # no value model of its own
    assert (out / "checkpoints" / "step-2" / "value-head" / "value_head.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(out / "model")  # the policy saves as a plain causal LM
    assert not any("value" in k for k in load_file(out / "model" / "model.safetensors"))
    whole = {name: load_file(out / name / file) for name, file in WEIGHTS.items()}
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    for name, file in WEIGHTS.items():
        resumed = load_file(out / name / file)
        assert all(torch.equal(resumed[k], whole[name][k]) for k in whole[name]), name
    # A damaged head in the checkpoint: one line naming it, no traceback, the run's model left as it was.
    (out / "checkpoints" / "step-2" / "value-head" / "value_head.safetensors").write_bytes(b"damaged")
    result = run_cli(*args, "--resume")
    assert result.returncode != 0 and "cannot load the value head" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert load_file(out / "model" / "model.safetensors").keys() == whole["model"].keys()


WEIGHTS = {"model": "model.safetensors", "value-head": "value_head.safetensors"}


@pytest.mark.slow
def test_a_shared_head_run_shards_over_two_processes_and_resumes(small_pipeline, tmp_path):
    out = tmp_path / "ppo-shared-sharded"
    # the first iteration a critic warm-up: the head trains from the sharded trunk's hidden states alone
    args = shared_args(small_pipeline, out, "train.max_steps=3", "ppo.epochs=1", "ppo.critic_warmup_iterations=1")
    result = run_cli(*args, "--num-processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    params = next(m for m in metrics if "params/per_rank" in m)
    assert max(params["params/per_rank"]) < 0.55 * params["params/total"]
    values = [m["loss/value"] for m in metrics if "loss/value" in m]
    assert len(values) == 3 and all(v > 0 for v in values)
    assert [m["step"] for m in metrics if "loss/policy" in m] == [2, 3]
    assert (out / "checkpoints" / "step-2" / "value-head" / "value_head.safetensors").is_file()
    assert (out / "value-head" / "value_head.safetensors").is_file()
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out) if "objective/kl" in m] == [1, 2, 3]


def test_a_shared_head_learns_faster_than_the_policy_unless_told_otherwise():
    optim = OptimConfig(lr=3e-5)
    assert PPOConfig(value_model="shared", optim=optim).value_lr == pytest.approx(3e-3)
    assert PPOConfig(optim=optim).value_lr == 3e-5  # a value model of its own starts from the reward model
    told = PPOConfig(value_model="shared", optim=optim, ppo=PPOAlgoConfig(value_lr=1e-4))
    assert told.value_lr == 1e-4


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_a_critic_warmup_iteration_trains_the_value_function_alone(tiny, critic):
    """ppo.critic_warmup_iterations: before it, the policy (a shared head's trunk included) keeps every
    weight and the critic takes the value loss's step; from it on, the policy trains."""
    tokenizer, cfg, prompts = tiny
    cfg = copy.deepcopy(cfg)
    cfg.ppo.critic_warmup_iterations = 1
    policy, critic_model = models(tokenizer)
    if critic == "separate":
        cfg.value_model = None
        critic_model = ScalarHead(value_classifier(policy))
    batch, _ = rollout(policy, critic_model, tokenizer, cfg, prompts)
    before_policy, before_critic = copy.deepcopy(policy.state_dict()), copy.deepcopy(critic_model.state_dict())
    dist = init_distributed()
    optimizers = build_optimizer(policy, cfg.optim), build_optimizer(critic_model, cfg.optim)
    stats = ppo_update(policy, critic_model, *optimizers, batch, cfg, dist, 0)
    assert stats["loss/value"] > 0 and "loss/policy" not in stats
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before_policy.items())
    assert any(not torch.equal(v, critic_model.state_dict()[k]) for k, v in before_critic.items())
    # The warm-up step is the value loss's alone: the same loss built by hand gives the same gradient.
    reference = copy.deepcopy(before_critic)
    fresh = copy.deepcopy(critic_model)
    fresh.load_state_dict(reference)
    fresh.train()
    for rows in (slice(0, 4), slice(4, 8)):
        if critic == "shared":
            with torch.no_grad():
                trunk = policy.base_model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows])
            values = fresh(trunk.last_hidden_state)[:, :-1]
        else:
            values = fresh(batch.input_ids[rows], batch.attention_mask[rows])[:, :-1]
        loss, _ = ppo_value_loss(values, batch.old_values[rows], batch.returns[rows], batch.mask[rows], 0.2)
        (cfg.ppo.value_coef * loss / batch.mask.sum()).backward()
    by_hand = build_optimizer(fresh, cfg.optim)
    torch.nn.utils.clip_grad_norm_(fresh.parameters(), cfg.optim.max_grad_norm)
    by_hand.step()
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, critic_model.state_dict()[k], rtol=1e-5, atol=1e-6)
    # Past the warm-up, the policy moves.
    ppo_update(policy, critic_model, *optimizers, batch, cfg, dist, 1)
    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in before_policy.items())


def test_a_critic_warmup_needs_a_critic_and_iterations_left_for_the_policy(tmp_path):
    from pipeline.config import ConfigError, load_config

    config = tmp_path / "ppo.yaml"
    config.write_text("reward: {kind: gold}\nmodel: {name_or_path: gpt2}\ntrain: {max_steps: 8}\n")
    assert load_config(PPOConfig, config, ["ppo.critic_warmup_iterations=2"]).ppo.critic_warmup_iterations == 2
    with pytest.raises(ConfigError, match="critic_warmup_iterations: advantage rloo trains no critic"):
        load_config(
            PPOConfig, config, ["ppo.critic_warmup_iterations=2", "ppo.advantage=rloo", "ppo.samples_per_prompt=2"]
        )
    with pytest.raises(ConfigError, match="8 of the 8 iterations .train.max_steps. would leave the policy untrained"):
        load_config(PPOConfig, config, ["ppo.critic_warmup_iterations=8"])
    with pytest.raises(ConfigError, match="critic_warmup_iterations: must not be negative"):
        load_config(PPOConfig, config, ["ppo.critic_warmup_iterations=-1"])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["ppo.critic_warmup_iterations=32"],
            "32 of the 32 iterations (train.max_steps) would leave the policy untrained",
        ),
        (["value_model=shared", "ppo.old_logps=sampler"], "ppo.old_logps: value_model shared reads its values"),
    ],
)
def test_the_cli_refuses_a_warmup_or_log_prob_source_it_cannot_honour_in_one_line(overrides, needle):
    # a hub id and the gold reward: no earlier check about folders that a fresh clone lacks answers first
    result = run_cli("ppo", "configs/ppo.yaml", *sets("model.name_or_path=gpt2", "reward.kind=gold", *overrides))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr
