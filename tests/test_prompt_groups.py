"""ppo.share_prompt: a micro-batch's samples of one prompt as one row, the same numbers as a row each."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from helpers import ppo_rollout, value_classifier
from pipeline.config import (
    ArchitectureConfig,
    DataConfig,
    OptimConfig,
    PPOAlgoConfig,
    PPOConfig,
    RewardSourceConfig,
    SampleConfig,
)
from pipeline.cost import CostMeter
from pipeline.data.builtin_sentiment import load_rows
from pipeline.data.tokenize import IGNORE, encode_prompt
from pipeline.launch import init_distributed
from pipeline.logprobs import response_token_logps
from pipeline.models import ScalarHead, create_scratch_model, last_scores, train_tokenizer
from pipeline.ppo import RolloutPrompt, ppo_update
from pipeline.prompt_groups import PromptGroups
from pipeline.training import build_optimizer
from pipeline.value_head import new_value_head


def test_the_grouped_layout_worked_by_hand():
    input_ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [4, 7, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    groups = PromptGroups.of(input_ids, attention_mask, [2, 2, 1])
    # rows 0 and 1 share the prompt [5, 6]: one row, each response after it, positions restarting at 2
    assert groups.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 7, 0, 0, 0]]
    assert groups.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert groups.segments.tolist() == [[0, 0, 1, 1, 2], [0, 1, -1, -1, -1]]
    assert groups.location.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [5, 6, -1, -1]]
    ungrouped = groups.ungroup(torch.arange(10.0).view(2, 5))
    assert ungrouped.tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [5, 6, 0, 0]]


def test_no_groups_where_there_is_nothing_to_share_or_no_way_to():
    ids, mask = torch.tensor([[5, 6, 7], [4, 6, 7]]), torch.ones(2, 3, dtype=torch.long)
    assert PromptGroups.of(ids, mask, [1, 1]) is None  # two different prompts
    assert PromptGroups.of(ids, mask, [0, 0]) is None  # no prompt token to predict the first response token
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert PromptGroups.of(torch.tensor([[5, 5, 7], [5, 6, 8]]), left_padded, [1, 1]) is None
    assert PromptGroups.of(torch.tensor([[5, 6, 7], [5, 6, 8]]), mask, [2, 2]) is not None


def grouped_batch(vocab: int, seed: int = 0):
    """Seven right-padded rows of three prompts (lengths 5, 3, 6) with 3, 1 and 3 samples; one sample
    is the prompt alone (an empty response)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (5, 3, 6)]
    layout = [(0, 4), (0, 7), (0, 2), (1, 5), (2, 0), (2, 6), (2, 3)]  # (prompt, response length)
    rows = [prompts[p] + torch.randint(3, vocab, (n,), generator=generator).tolist() for p, n in layout]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE)
    for i, (row, (p, _)) in enumerate(zip(rows, layout)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, len(prompts[p]) : len(row)] = input_ids[i, len(prompts[p]) : len(row)]
    return input_ids, attention_mask, labels, [len(prompts[p]) for p, _ in layout]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grouped_rows_give_each_rows_log_probs_gradients_hidden_states_and_scores(tiny_tokenizer, arch):
    shape = ArchitectureConfig(type=arch, n_layer=2, n_head=2, n_embd=32, n_positions=64)
    policy = create_scratch_model(shape, tiny_tokenizer, seed=0)
    input_ids, attention_mask, labels, prompt_lengths = grouped_batch(policy.config.vocab_size)
    groups = PromptGroups.of(input_ids, attention_mask, prompt_lengths)
    assert groups.for_model(policy) is groups  # this model takes the segment mask
    assert groups.input_ids.shape[0] == 3 and int((groups.segments >= 0).sum()) < int(attention_mask.sum())
    grouped_policy = copy.deepcopy(policy)
    weights = torch.linspace(-1, 1, labels.shape[1] - 1)
    results = {}
    for name, model, layout in (("rows", policy, None), ("grouped", grouped_policy, groups)):
        logps, mask, hidden = response_token_logps(
            model, input_ids, attention_mask, labels, temperature=0.7, with_hidden=True, groups=layout
        )
        (logps * weights).sum().backward()
        results[name] = logps, mask, hidden
    (rows_logps, rows_mask, rows_hidden), (logps, mask, hidden) = results["rows"], results["grouped"]
    assert torch.equal(mask, rows_mask) and int(mask.sum()) == 27
    torch.testing.assert_close(logps, rows_logps, atol=1e-5, rtol=0)
    attended = attention_mask.bool()
    torch.testing.assert_close(hidden[attended], rows_hidden[attended], atol=1e-5, rtol=1e-5)
    for (name, grad), rows_grad in zip(
        ((n, p.grad) for n, p in grouped_policy.named_parameters()), (p.grad for p in policy.parameters())
    ):
        torch.testing.assert_close(grad, rows_grad, atol=1e-5, rtol=1e-4, msg=name)

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    head = ScalarHead(AutoModelForSequenceClassification.from_config(config)).eval()
    with torch.no_grad():
        rows_scores = head(input_ids, attention_mask)
        scores = groups.for_model(head).scores(head)
    torch.testing.assert_close(scores[attended], rows_scores[attended], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_scores(scores, attention_mask), last_scores(rows_scores, attention_mask))


def test_a_model_without_masks_of_ours_reads_rows(tiny_tokenizer):
    policy = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=32), tiny_tokenizer, seed=0)
    policy.config._attn_implementation = "flash_attention_2"
    input_ids, attention_mask, _, prompt_lengths = grouped_batch(policy.config.vocab_size)
    assert PromptGroups.of(input_ids, attention_mask, prompt_lengths).for_model(policy) is None


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory):
    """A tiny GRPO setup scored by a reward model, three samples of each of four prompts."""
    texts = [row["review"] for row in load_rows("train", 300)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    policy = create_scratch_model(ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), tokenizer, 0)
    reward = value_classifier(policy, seed=1)
    reward.config.reward_mean, reward.config.reward_std = 0.0, 1.0
    folder = tmp_path_factory.mktemp("rm")
    reward.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = PPOConfig(
        reward=RewardSourceConfig(kind="model", models=[str(folder)]),
        data=DataConfig(max_length=64, max_prompt_length=16),
        rollout=SampleConfig(max_new_tokens=10),
        ppo=PPOAlgoConfig(
            rollout_batch_size=4,
            samples_per_prompt=3,
            advantage="grpo",
            mini_batch_size=6,
            micro_batch_size=6,
            epochs=2,
            old_logps="recompute",
            entropy_coef=0.01,
        ),
        optim=OptimConfig(lr=1e-3, schedule="constant", warmup_ratio=0.0),
    )
    prompts = [
        RolloutPrompt(" ".join(t.split()[: 2 + i]), encode_prompt(tokenizer, " ".join(t.split()[: 2 + i]), cfg.data))
        for i, t in enumerate(texts[:4])
    ]
    return tokenizer, policy, cfg, prompts


@pytest.mark.parametrize("critic", ["none", "separate", "shared"])
def test_an_iteration_is_the_same_with_the_prompt_shared(grpo_setup, critic, monkeypatch):
    """The rollout's log-probs, KL, reward-model scores, values and advantages, and the models after
    an update of two epochs (shuffled minibatches, so partial groups, with an entropy bonus), with
    each prompt computed once per micro-batch or once per sample: GRPO without a critic, GAE with a
    value model or a head on the policy's trunk. The shared run computes fewer tokens."""
    tokenizer, policy, cfg, prompts = grpo_setup
    dist = init_distributed()
    grouped_scores = []
    monkeypatch.setattr(PromptGroups, "scores", spy(PromptGroups.scores, grouped_scores))
    runs = {}
    for share in (False, True):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.ppo.share_prompt = share
        model = copy.deepcopy(policy)
        value = None
        if critic != "none":
            run_cfg.ppo.advantage = "gae"
            run_cfg.value_model = "shared" if critic == "shared" else None
            torch.manual_seed(2)  # the same fresh head both ways
            value = new_value_head(model, None) if critic == "shared" else ScalarHead(value_classifier(policy, seed=2))
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        with torch.no_grad():  # a reference unlike the policy, so the KL is not 0 by construction
            for parameter in reference.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
        meter = CostMeter(dist)
        meter.watch(reference, "reference")
        rollout, stats, _ = ppo_rollout(model, reference, value, tokenizer, run_cfg, prompts, seed=3)
        optimizers = build_optimizer(model, run_cfg.optim), value and build_optimizer(value, run_cfg.optim)
        update = ppo_update(model, value, *optimizers, rollout, run_cfg, dist, 0)
        runs[share] = rollout, stats, update, (model, value), meter.tokens["reference"]
    (rows, rows_stats, rows_update, rows_models, rows_tokens) = runs[False]
    (shared, stats, update, models, tokens) = runs[True]
    assert torch.equal(shared.input_ids, rows.input_ids)  # the same samples
    for name in ("old_logps", "old_values", "advantages", "returns"):
        torch.testing.assert_close(getattr(shared, name), getattr(rows, name), atol=1e-5, rtol=0, msg=name)
    for name in ("objective/kl", "objective/scores", "objective/entropy"):
        assert stats[name] == pytest.approx(rows_stats[name], abs=1e-4), name
    assert abs(rows_stats["objective/kl"]) > 1e-3 and rows_stats["objective/scores"] != 0
    for name in ("loss/policy", "loss/value"):
        assert update.get(name) == pytest.approx(rows_update.get(name), abs=1e-5), name
    for model, rows_model in zip(models, rows_models):
        if model is not None:
            for (name, p), q in zip(model.named_parameters(), rows_model.parameters()):
                torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    moved = max((p - q).abs().max() for p, q in zip(models[0].parameters(), policy.parameters()))
    assert moved > 1e-4  # the update changed the policy, alike both ways
    prompt_tokens = sum(len(p.ids) for p in prompts)
    assert tokens == rows_tokens - 2 * prompt_tokens  # each prompt once instead of three times
    read_by = [head for head in grouped_scores if head is not models[1]]
    assert len(read_by) == 2  # the reward model read both micro-batches grouped
    if critic == "separate":  # and the value model both in the rollout and in each of 4 minibatches
        assert len(grouped_scores) - len(read_by) == 2 + 4


def spy(method, calls: list):
    def wrapped(self, head):
        calls.append(head)
        return method(self, head)

    return wrapped
