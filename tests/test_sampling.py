"""The sampler: temperature, top-p and seeding follow the distribution they claim."""

from __future__ import annotations

import torch

from pipeline.sampling import next_tokens


def test_sampling_follows_the_distribution_and_never_picks_a_zero_probability_token():
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
