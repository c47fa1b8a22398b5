"""Losses against numbers worked by hand."""

from __future__ import annotations

import math

import torch

from pipeline.losses import masked_nll, token_logps


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
