"""Log-probabilities as the stages compute them (response_token_logps), against numbers worked by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from helpers import assert_close
from pipeline.logprobs import (
    entropy_from_logits,
    keeps_logit_positions,
    response_token_logps,
    scatter_response_logps,
    selected_logps,
    token_logps,
)


def test_masked_nll_by_hand():
    """Vocabulary of 2, sequence [x, 1, 0] with the first token masked.

    logits[0] = [0, 0] predicts token 1: p = 1/2, nll = ln 2.
    logits[1] = [ln 3, 0] predicts token 0: p = 3/4, nll = ln(4/3).
    logits[2] predicts nothing (no token after the last). Sum = ln 2 + ln(4/3) = ln(8/3) = 0.980829.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    nll, count = masked_nll(logits, labels)
    assert count.item() == 2
    assert nll.item() == torch.tensor(math.log(8 / 3)).item()
    assert abs(nll.item() - 0.980829) < 1e-6


def test_masked_positions_contribute_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    base, count = masked_nll(logits, labels)
    changed = logits.clone()
    changed[0, 0] += 100.0  # position 0 predicts the masked token 1: no effect
    changed[0, 4] -= 50.0  # the last position predicts nothing
    assert torch.allclose(masked_nll(changed, labels)[0], base)
    assert count.item() == 4
    logps, mask = token_logps(logits, labels)
    assert mask.sum() == 4 and (logps[~mask] == 0).all()
    expected = torch.log_softmax(logits[0, 1], -1)[3] + torch.log_softmax(logits[0, 2], -1)[4]
    assert torch.allclose(logps[0].sum(), expected)


class FixedLogits(torch.nn.Module):
    """A "language model" whose logits are given, so a stage's log-probs can be worked by hand.

    It takes transformers' boolean `logits_to_keep`, as the stages' models do, so the numbers below
    come through `response_token_logps`, the function every stage calls.
    """

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, logits_to_keep=None):
        return SimpleNamespace(logits=self.logits if logits_to_keep is None else self.logits[logits_to_keep])


def stage_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logps, mask), each (B, T-1), as the stages compute them from a model."""
    return response_token_logps(FixedLogits(logits), labels.clamp(min=0), torch.ones_like(labels), labels)


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT's summed NLL of the response tokens and their count: -sum of logps over the mask."""
    logps, mask = stage_logps(logits, labels)
    return -logps.sum(), mask.sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's log pi(y|x) per row, summed over the response, and the response lengths: (B,), (B,)."""
    logps, mask = stage_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


# ---------------------------------------------------------------------------------- sequence_logps
def test_sequence_logps_by_hand():
    """B = 2, T = 4, V = 3. Position t's logits predict label t+1; labels -100 are skipped.

    log-softmax of the logit rows used:
      [0, 0, 0]        -> each token log(1/3)                      = -1.098612
      [ln 2, 0, 0]     -> token 0: log(2/4) = -0.693147
      [ln 3, ln 2, 0]  -> token 1: log(2/6) = -1.098612, token 2: log(1/6) = -1.791759

    Sequence 0, labels [-100, 2, 0, 2]:
      logits[0] = [0, 0, 0]       predicts 2 -> -1.098612
      logits[1] = [ln 2, 0, 0]    predicts 0 -> -0.693147
      logits[2] = [ln 3, ln 2, 0] predicts 2 -> -1.791759
      logits[3] predicts nothing.  Sum = -(ln 3 + ln 2 + ln 6) = -ln 36 = -3.583519, 3 tokens.
    Sequence 1, labels [-100, -100, 1, -100]:
      only logits[1] = [ln 3, ln 2, 0] predicting 1 counts -> -1.098612, 1 token.
    The other rows hold large junk values that must not matter.
    """
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [ln2, 0.0, 0.0], [ln3, ln2, 0.0], [9.0, -9.0, 5.0]],
            [[4.0, -6.0, 8.0], [ln3, ln2, 0.0], [7.0, -3.0, 2.0], [-5.0, 5.0, 0.5]],
        ]
    )
    labels = torch.tensor([[-100, 2, 0, 2], [-100, -100, 1, -100]])
    logps, counts = sequence_logps(logits, labels)
    assert logps.shape == (2,) and counts.shape == (2,)
    assert counts.tolist() == [3, 1]
    # float32 inside (logits are cast to float): a sum near 3.6 carries ~5e-7 of float32 rounding
    # on top of the 6-decimal rounding of the hand value, so this one allows 2e-6.
    assert_close(logps, [-3.583519, -1.098612], tol=2e-6)


def test_sequence_logps_ignores_masked_and_last_positions():
    """Changing logits that predict a -100 label, or the last position's logits, changes nothing;
    changing a counted row does. Sequence 1 above: only logits[1] matters."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3)
    labels = torch.tensor([[-100, 2, 0, 2], [-100, -100, 1, -100]])
    base, _ = sequence_logps(logits, labels)
    changed = logits.clone()
    changed[1, 0] += 50.0  # predicts a -100 label
    changed[1, 2] -= 50.0  # predicts a -100 label
    changed[:, 3] += 30.0  # last position predicts nothing
    assert torch.equal(sequence_logps(changed, labels)[0], base)
    changed[1, 1, 1] += 1.0
    assert sequence_logps(changed, labels)[0][1] > base[1]


def test_sequence_logps_return_the_batch_shape():
    B = 5
    logps, counts = sequence_logps(torch.randn(B, 7, 11), torch.randint(0, 11, (B, 7)))
    assert logps.shape == (B,) and counts.shape == (B,)


def test_sequence_logps_all_masked_is_zero():
    """A row with no response token sums nothing: logp 0, count 0."""
    logps, counts = sequence_logps(torch.randn(1, 4, 3), torch.full((1, 4), -100))
    assert logps.tolist() == [0.0] and counts.tolist() == [0]


# -------------------------------------------------------------------------------------- entropy
def test_entropy_by_hand():
    """Position 0: uniform over V = 7 (all logits 0, or all 3.5): H = ln 7 = 1.945910.
    Position 1: logits [30, 0, ..., 0]: p(other) = e^-30 ~ 1e-13, H ~ 6 * 31 * e^-30 ~ 2e-11 ~ 0.
    Position 2: p = [0.5, 0.25, 0.25, 0, ...] via logits ln p (-1e4 for the rest):
        H = 0.5 ln 2 + 2 * 0.25 ln 4 = 0.346574 + 0.693147 = 1.039721.
    Output is float32 (the function upcasts), so the tolerance is 2e-6.
    """
    logits = torch.zeros(1, 4, 7)
    logits[0, 1, 0] = 30.0
    logits[0, 2] = torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)] + [-1e4] * 4)
    logits[0, 3] = 3.5
    h = entropy_from_logits(logits)
    assert h.shape == (1, 4) and h.dtype == torch.float32
    assert_close(h, [[1.945910, 0.0, 1.039721, 1.945910]], tol=2e-6)


def test_entropy_three_way_and_bf16_input():
    """p = [0.5, 0.25, 0.25] from logits [ln 2, 0, 0] (any shift): H = 1.039721. From bf16 logits
    [1 + ln 2, 1, 1] the first rounds to 1.6953125 (log-odds 0.6953 instead of 0.6931), which moves
    H by about 5e-4, so there only to 1e-2; the result is float32.
    """
    h = entropy_from_logits(torch.tensor([[[math.log(2.0), 0.0, 0.0], [5.0 + math.log(2.0), 5.0, 5.0]]]))
    assert_close(h, [[1.039721, 1.039721]], tol=2e-6)
    hb = entropy_from_logits(torch.tensor([[[1.0 + math.log(2.0), 1.0, 1.0]]], dtype=torch.bfloat16))
    assert hb.dtype == torch.float32
    assert_close(hb, [[1.039721]], tol=1e-2)


def test_selected_logps_by_hand():
    """Row 1: logits [ln 3, 0], target 0: p = 3/4. Row 2: logits [0, 0, 0], target 2: p = 1/3."""
    logits = torch.tensor([[math.log(3.0), 0.0, -math.inf], [0.0, 0.0, 0.0]])
    logps = selected_logps(logits, torch.tensor([0, 2]))
    assert torch.allclose(logps, torch.tensor([math.log(0.75), math.log(1 / 3)]))


def test_selected_logps_by_rows_reads_a_row_once_per_target_with_the_same_gradient():
    """Row 0 predicts two tokens (a shared prompt's last position): read twice without a copy, its
    gradient the sum of the two; both values and gradients equal log_softmax's by hand."""
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0], [0.0, math.log(2.0), 0.0]], requires_grad=True)
    rows, targets = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    logps = selected_logps(logits, targets, rows=rows)
    assert torch.allclose(logps, torch.tensor([math.log(3 / 5), math.log(1 / 5), math.log(2 / 4)]))
    logps.sum().backward()
    # d/dz of log p_y = onehot(y) - softmax(z), summed over the reads of each row
    p0, p1 = torch.tensor([3 / 5, 1 / 5, 1 / 5]), torch.tensor([1 / 4, 2 / 4, 1 / 4])
    expected = torch.stack([torch.tensor([1.0, 1.0, 0.0]) - 2 * p0, torch.tensor([0.0, 1.0, 0.0]) - p1])
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_scatter_puts_each_value_at_its_labelled_position():
    labels = torch.tensor([[5, -100, 7, 8], [5, 6, -100, -100]])  # next tokens: [-100, 7, 8], [6, -100, -100]
    logps, mask = scatter_response_logps(torch.tensor([-1.0, -2.0, -3.0]), labels)
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    assert logps.tolist() == [[0.0, -1.0, -2.0], [-3.0, 0.0, 0.0]]


def _tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
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
