"""Log-probs of the labelled tokens only: by hand, and the same as the full-logits path."""

from __future__ import annotations

import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.losses import scatter_response_logps, selected_logps, token_logps
from pipeline.models import keeps_logit_positions, response_token_logps


def test_selected_logps_by_hand():
    """Row 1: logits [ln 3, 0], target 0: p = 3/4. Row 2: logits [0, 0, 0], target 2: p = 1/3."""
    logits = torch.tensor([[math.log(3.0), 0.0, -math.inf], [0.0, 0.0, 0.0]])
    logps = selected_logps(logits, torch.tensor([0, 2]))
    assert torch.allclose(logps, torch.tensor([math.log(0.75), math.log(1 / 3)]))


def test_scatter_puts_each_value_at_its_labelled_position():
    labels = torch.tensor([[5, -100, 7, 8], [5, 6, -100, -100]])  # next tokens: [-100, 7, 8], [6, -100, -100]
    logps, mask = scatter_response_logps(torch.tensor([-1.0, -2.0, -3.0]), labels)
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert logps.tolist() == [[0.0, -1.0, -2.0], [-3.0, 0.0, 0.0]]


def _tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 50, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompts
    labels[1, 9:] = -100
    labels[2, :7] = -100  # a longer prompt
    return input_ids, attention_mask, labels


def test_response_only_head_matches_full_logits_and_gradients():
    model = _tiny_model()
    assert keeps_logit_positions(type(model))
    input_ids, attention_mask, labels = _batch()
    fast, fast_mask = response_token_logps(model, input_ids, attention_mask, labels)
    fast.sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full, full_mask = token_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    full.sum().backward()
    assert torch.equal(fast_mask, full_mask)
    assert torch.allclose(fast, full, atol=1e-6)
    for fast_grad, param in zip(fast_grads, model.parameters()):
        assert torch.allclose(fast_grad, param.grad, atol=1e-6)


class _NoKeepModel(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (older or custom models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_models_without_logits_to_keep_take_the_full_logits_path():
    model = _tiny_model()
    wrapped = _NoKeepModel(model)
    assert not keeps_logit_positions(type(wrapped))
    input_ids, attention_mask, labels = _batch()
    slow, _ = response_token_logps(wrapped, input_ids, attention_mask, labels)
    fast, _ = response_token_logps(model, input_ids, attention_mask, labels)
    assert torch.allclose(slow, fast, atol=1e-6)


def test_sampling_follows_the_distribution_and_never_picks_a_zero_probability_token():
    from pipeline.sampling import next_tokens

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logits = probs.log().expand(20000, 4).clone()
    tokens = next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert counts[1] == 0
    assert torch.allclose(counts, probs, atol=0.015)  # 20,000 draws: standard error under 0.004
    again = next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)  # the same seed gives the same tokens
    # top-p 0.6 keeps {0, 2}: renormalised 0.625 / 0.375
    kept = torch.bincount(next_tokens(logits, 1.0, 0.6, torch.Generator().manual_seed(1)), minlength=4).float() / 20000
    assert kept[1] == kept[3] == 0 and abs(kept[0] - 0.625) < 0.015
