"""Evaluation helpers: paired bootstrap intervals and the sample-based KL to a reference."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import ArchitectureConfig, DataConfig, SampleConfig
from pipeline.data.builtin_sentiment import load_rows
from pipeline.evaluation import kl_along_samples, kl_to_anchor, paired_bootstrap, sample_and_score, wilson_interval
from pipeline.models import create_scratch_model, train_tokenizer


def test_paired_bootstrap_on_a_constant_difference_is_that_difference():
    mean, low, high = paired_bootstrap([1.5, 2.5, 0.5], [1.0, 2.0, 0.0])
    assert (mean, low, high) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))


def test_paired_bootstrap_interval_contains_the_mean_and_is_seeded():
    a = [0.1 * i for i in range(50)]
    b = [0.05 * i + (0.3 if i % 2 else -0.3) for i in range(50)]
    first = paired_bootstrap(a, b, seed=3)
    assert first == paired_bootstrap(a, b, seed=3)
    mean, low, high = first
    assert low < mean < high
    assert mean == pytest.approx(sum(x - y for x, y in zip(a, b)) / 50)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def tiny_policy():
    texts = [row["review"] for row in load_rows("train", 200)]
    tokenizer = train_tokenizer(texts, vocab_size=350)
    model = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64), tokenizer, seed=0)
    return model, tokenizer


def unscored_samples(model, tokenizer, prompts, max_new_tokens):
    no_reward = lambda texts: [0.0] * len(texts)  # noqa: E731 - these tests need the samples, not their scores
    config = SampleConfig(max_new_tokens=max_new_tokens)
    return sample_and_score(
        model, tokenizer, prompts, no_reward, config, DataConfig(max_length=64, max_prompt_length=16), seed=0
    )


def test_kl_to_itself_is_zero_and_to_another_model_is_positive(tiny_policy):
    model, tokenizer = tiny_policy
    prompts = ["i saw this", "the movie was", "we rented it", "my wife and i"] * 4
    scored = unscored_samples(model, tokenizer, prompts, max_new_tokens=10)
    assert len(scored.sequences) == len(prompts)
    assert all(abs(k) < 1e-5 for k in kl_to_anchor(model, model, scored.sequences, tokenizer.pad_token_id))
    other = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = kl_to_anchor(model, other, scored.sequences, tokenizer.pad_token_id)
    assert sum(kl) / len(kl) > 0  # a Monte Carlo estimate of a positive KL over 16 samples

    # At temperature T both models score the sample under softmax(logits / T): by hand for one sample.
    sequence = scored.sequences[0]
    ids = torch.tensor([sequence.input_ids])
    by_hand = 0.0
    with torch.no_grad():
        policy_logits, anchor_logits = model(ids).logits[0], other(ids).logits[0]
    for t in range(sequence.prompt_length, len(sequence.input_ids)):
        token = sequence.input_ids[t]
        by_hand += float(
            (policy_logits[t - 1] / 0.7).log_softmax(-1)[token] - (anchor_logits[t - 1] / 0.7).log_softmax(-1)[token]
        )
    tempered = kl_to_anchor(model, other, [sequence], tokenizer.pad_token_id, temperature=0.7)
    assert abs(tempered[0] - by_hand) < 1e-4 and abs(tempered[0] - kl[0]) > 1e-3  # not the untempered value
    with pytest.raises(ValueError, match="greedy"):
        kl_to_anchor(model, other, [sequence], tokenizer.pad_token_id, temperature=0.0)


def test_gold_reward_names():
    from pipeline.judges import gold_reward, is_known_gold

    assert is_known_gold("vader") and is_known_gold("hf:org/classifier")
    assert not is_known_gold("hf:") and not is_known_gold("sentiment")
    with pytest.raises(ValueError, match="hf:<classifier id>"):
        gold_reward("sentiment")


def test_wilson_interval_worked_by_hand():
    # 50 of 100: p = 0.5, z^2 = 3.8416; centre (0.5 + 0.019208) / 1.038416 = 0.5;
    # half-width 1.96 * sqrt(0.0025 + 0.00009604) / 1.038416 = 0.0961700.
    low, high = wilson_interval(50, 100)
    assert abs(low - 0.4038300) < 1e-6 and abs(high - 0.5961700) < 1e-6
    # 0 of 10: centre 0.192080 / 1.384160 = 0.138770, half-width 1.96 * 0.098 / 1.38416 = 0.138770.
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and abs(high - 0.2775401) < 1e-6
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_kl_along_samples_is_the_full_next_token_kl_summed_over_the_response(tiny_policy):
    model, tokenizer = tiny_policy
    prompts = ["i saw this", "the movie was", "we rented it"]
    scored = unscored_samples(model, tokenizer, prompts, max_new_tokens=8)
    assert all(abs(k) < 1e-5 for k in kl_along_samples(model, model, scored.sequences, tokenizer.pad_token_id))
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for temperature in (1.0, 0.7):
        got = kl_along_samples(model, other, scored.sequences, tokenizer.pad_token_id, temperature, batch_size=2)
        for sequence, value in zip(scored.sequences, got):
            ids = torch.tensor([sequence.input_ids])
            with torch.no_grad():
                p_logits, q_logits = model(ids).logits[0], other(ids).logits[0]
            by_hand = 0.0
            for t in range(sequence.prompt_length, len(sequence.input_ids)):  # logits at t-1 predict token t
                p = torch.softmax(p_logits[t - 1] / temperature, -1)
                q = torch.softmax(q_logits[t - 1] / temperature, -1)
                by_hand += float((p * (p.log() - q.log())).sum())
            assert value == pytest.approx(by_hand, abs=1e-4) and value > 0
    with pytest.raises(ValueError, match="greedy"):
        kl_along_samples(model, other, scored.sequences, tokenizer.pad_token_id, temperature=0.0)
