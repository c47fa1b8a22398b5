"""Advantages against numbers worked by hand: masked statistics, GAE, whitening, KL estimators, token rewards.

Every expected value is written out in the test's docstring and typed in as a literal; GAE is also
checked against a plain Python loop, the textbook recursion written out over lists.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import TOL, assert_close, m, t
from pipeline.advantages import explained_variance, gae, kl_penalty, masked_mean, masked_whiten, token_rewards


# ---------------------------------------------------------------------------------- masked_mean
def test_masked_mean_by_hand():
    """Row 0 keeps 1, 2 (100 is masked); row 1 keeps 3, 4 (-100 is masked).

    (1 + 2 + 3 + 4) / 4 = 2.5. With an all-False mask the count is clamped to 1: 0 / 1 = 0.
    """
    values = t([1.0, 2.0, 100.0], [3.0, -100.0, 4.0])
    mask = m([1, 1, 0], [1, 0, 1])
    assert_close(masked_mean(values, mask), 2.5)
    assert_close(masked_mean(values, torch.zeros_like(mask)), 0.0)


# ------------------------------------------------------------------------------------------ GAE
def test_gae_single_response_by_hand():
    """One row, T = 5: a prompt position, a 3-token response, a pad. gamma = 1, lam = 0.95.

    Response: r = [0.1, -0.2, 1.0], V = [0.5, 0.3, 0.6]; the value after the last token is 0.
        delta_2 = 1.0  + 1 * 0   - 0.6 =  0.4
        delta_1 = -0.2 + 1 * 0.6 - 0.3 =  0.1
        delta_0 = 0.1  + 1 * 0.3 - 0.5 = -0.1
        A_2 = 0.4
        A_1 = 0.1  + 0.95 * 0.4  = 0.48
        A_0 = -0.1 + 0.95 * 0.48 = -0.1 + 0.456 = 0.356
    Returns R = A + V = [0.356 + 0.5, 0.48 + 0.3, 0.4 + 0.6] = [0.856, 0.78, 1.0].
    The prompt (r = 3, V = 7) and the pad (r = 2, V = -4) get 0 and pass nothing on.
    """
    rewards = t([3.0, 0.1, -0.2, 1.0, 2.0])
    values = t([7.0, 0.5, 0.3, 0.6, -4.0])
    mask = m([0, 1, 1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert_close(adv, [[0.0, 0.356, 0.48, 0.4, 0.0]])
    assert_close(ret, [[0.0, 0.856, 0.78, 1.0, 0.0]])


def _textbook_gae(rewards: list[float], values: list[float], gamma: float, lam: float):
    """Schulman et al. 2016 Eq. 16 over one response's tokens only, as plain Python lists."""
    n = len(rewards)
    advantages = [0.0] * n
    next_advantage = 0.0
    for i in reversed(range(n)):
        next_value = values[i + 1] if i + 1 < n else 0.0  # the episode ends after the last token
        delta = rewards[i] + gamma * next_value - values[i]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[i] = next_advantage
    returns = [a + v for a, v in zip(advantages, values)]
    return advantages, returns


def test_gae_matches_textbook_loop_over_ragged_rows():
    """Rows of different (prompt, response) lengths in T = 12, left prompt and right padding.

    For every row the response slice alone goes through the textbook loop above (gamma 0.99,
    lam 0.9); the (B, T) result must equal it on the response and be 0 elsewhere.
    """
    gamma, lam = 0.99, 0.9
    layout = [(2, 5), (4, 8), (1, 1), (0, 12), (3, 0), (6, 3)]  # (prompt length, response length)
    T = 12
    gen = torch.Generator().manual_seed(1234)
    rewards = torch.randn(len(layout), T, generator=gen, dtype=torch.float64)
    values = torch.randn(len(layout), T, generator=gen, dtype=torch.float64)
    mask = torch.zeros(len(layout), T, dtype=torch.bool)
    for b, (p, n) in enumerate(layout):
        mask[b, p : p + n] = True

    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, (p, n) in enumerate(layout):
        exp_adv, exp_ret = _textbook_gae(rewards[b, p : p + n].tolist(), values[b, p : p + n].tolist(), gamma, lam)
        row_adv = [0.0] * p + exp_adv + [0.0] * (T - p - n)
        row_ret = [0.0] * p + exp_ret + [0.0] * (T - p - n)
        assert_close(adv[b], row_adv, tol=1e-10)
        assert_close(ret[b], row_ret, tol=1e-10)


def test_gae_ignores_prompt_and_padding_values():
    """Rewards and values at masked positions set to +-1e9 change no response advantage/return.

    Outside the mask both outputs are exactly 0, with the huge numbers or without.
    """
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    values = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    mask = m([0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0])
    adv, ret = gae(rewards, values, mask, 0.99, 0.9)

    big_r, big_v = rewards.clone(), values.clone()
    big_r[~mask] = 1e9
    big_v[~mask] = -1e9
    big_v[0, 5] = 1e9  # the pad right after row 0's response: the "next value" that must be 0
    adv2, ret2 = gae(big_r, big_v, mask, 0.99, 0.9)

    assert torch.equal(adv[mask], adv2[mask])
    assert torch.equal(ret[mask], ret2[mask])
    for a in (adv, ret, adv2, ret2):
        assert (a[~mask] == 0).all()


# ------------------------------------------------------------------------------------ whitening
def test_masked_whiten_by_hand():
    """Masked values 1, 2, 3, 4 (with junk 50, -80 at masked positions).

    mean = 2.5; var = (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25; std = 1.118034
    whitened = [-1.5, -0.5, 0.5, 1.5] / 1.118034 = [-1.341641, -0.447214, 0.447214, 1.341641]
    Masked positions are 0. Over the masked positions: mean 0, mean of squares 1.
    """
    values = t([50.0, 1.0, 2.0, -80.0], [3.0, 4.0, 50.0, 50.0])
    mask = m([0, 1, 1, 0], [1, 1, 0, 0])
    out = masked_whiten(values, mask)
    assert_close(out, [[0.0, -1.341641, -0.447214, 0.0], [0.447214, 1.341641, 0.0, 0.0]])
    assert abs(out[mask].mean().item()) < TOL
    assert abs((out[mask] ** 2).mean().item() - 1.0) < TOL
    assert (out[~mask] == 0).all()


def test_masked_whiten_keep_mean_by_hand():
    """shift_mean=False adds the mean 2.5 back: [-1.341641, -0.447214, 0.447214, 1.341641] + 2.5
    = [1.158359, 2.052786, 2.947214, 3.841641]; their mean stays 2.5; masked positions still 0.
    """
    values = t([50.0, 1.0, 2.0, -80.0], [3.0, 4.0, 50.0, 50.0])
    mask = m([0, 1, 1, 0], [1, 1, 0, 0])
    out = masked_whiten(values, mask, shift_mean=False)
    assert_close(out, [[0.0, 1.158359, 2.052786, 0.0], [2.947214, 3.841641, 0.0, 0.0]])
    assert abs(out[mask].mean().item() - 2.5) < TOL


def test_masked_whiten_external_statistics_by_hand():
    """mean = 2 and var = 4 given from outside (e.g. gathered over processes): (v - 2) / 2.

    [1, 2, 3, 4] -> [-0.5, 0, 0.5, 1.0]. With shift_mean=False the given mean 2 is added back:
    [1.5, 2, 2.5, 3.0].
    """
    values = t([50.0, 1.0, 2.0, -80.0], [3.0, 4.0, 50.0, 50.0])
    mask = m([0, 1, 1, 0], [1, 1, 0, 0])
    mean, var = torch.tensor(2.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    assert_close(masked_whiten(values, mask, mean=mean, var=var), [[0.0, -0.5, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0]])
    assert_close(
        masked_whiten(values, mask, mean=mean, var=var, shift_mean=False), [[0.0, 1.5, 2.0, 0.0], [2.5, 3.0, 0.0, 0.0]]
    )


# -------------------------------------------------------------------------------- KL estimators
P = [0.5, 0.3, 0.2]


Q = [0.2, 0.5, 0.3]


def test_kl_estimators_match_exact_kl_on_categorical():
    """Exact KL(p || q) = sum_x p(x) ln(p(x) / q(x)):
        0.5 ln(0.5/0.2) = 0.5 ln 2.5     = 0.5 * 0.916291  =  0.458145
        0.3 ln(0.3/0.5) = 0.3 ln 0.6     = 0.3 * -0.510826 = -0.153248
        0.2 ln(0.2/0.3) = 0.2 ln(2/3)    = 0.2 * -0.405465 = -0.081093
        KL = 0.223805 (to 6 places: 0.223805)
    Both k1 and k3 are unbiased for x ~ p: their means over 200k draws are within 0.01 of it
    (k1's standard deviation is about 0.7, so the standard error is about 0.0016).
    """
    exact = 0.223805
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(torch.tensor(P), 200_000, replacement=True, generator=gen)
    logp = torch.tensor(P, dtype=torch.float64).log()[x].view(1, -1)
    logq = torch.tensor(Q, dtype=torch.float64).log()[x].view(1, -1)
    k1 = kl_penalty(logp, logq, "k1")
    k3 = kl_penalty(logp, logq, "k3")
    assert abs(k1.mean().item() - exact) < 0.01
    assert abs(k3.mean().item() - exact) < 0.01
    assert (k3 >= 0).all()
    assert torch.equal(k1, logp - logq)


def test_kl_estimators_per_sample_by_hand():
    """Per sample, with log_ratio = log p - log q and r = q / p:

    x = 0: log_ratio = ln 2.5 = 0.916291, r = 0.4:  k1 = 0.916291; k3 = (0.4 - 1) - ln 0.4
           = -0.6 + 0.916291 = 0.316291
    x = 1: log_ratio = ln 0.6 = -0.510826, r = 5/3: k1 = -0.510826 (negative);
           k3 = (5/3 - 1) - ln(5/3) = 0.666667 - 0.510826 = 0.155841
    x = 2: log_ratio = ln(2/3) = -0.405465, r = 1.5: k1 = -0.405465;
           k3 = 0.5 - ln 1.5 = 0.5 - 0.405465 = 0.094535
    Equal log-probs: both 0. The default estimator is k1.
    """
    logp = t([math.log(0.5), math.log(0.3), math.log(0.2), -1.7])
    logq = t([math.log(0.2), math.log(0.5), math.log(0.3), -1.7])
    assert_close(kl_penalty(logp, logq, "k1"), [[0.916291, -0.510826, -0.405465, 0.0]])
    assert_close(kl_penalty(logp, logq, "k3"), [[0.316291, 0.155841, 0.094535, 0.0]])
    assert_close(kl_penalty(logp, logq), [[0.916291, -0.510826, -0.405465, 0.0]])


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError):
        kl_penalty(t([0.0]), t([0.0]), "k2")


# -------------------------------------------------------------------------------- token rewards
def test_token_rewards_by_hand():
    """kl_coef = 0.1; -0.1 * KL on every response token, the score added on the last one.

    Row 0: mask [0,1,1,1,0], KL [9, 0.5, -0.2, 1.0, 9], score 2
           -> [0, -0.05, 0.02, -0.1 + 2 = 1.9, 0]
    Row 1: mask [0,0,1,1,1] (response runs to the end), KL [9, 9, 0.3, 0, -1], score -1
           -> [0, 0, -0.03, 0, 0.1 - 1 = -0.9]
    Row 2: empty response, score 5 -> all 0 (the score goes nowhere, nothing crashes)
    Row 3: a single response token at position 0, KL 2, score 0.5 -> [-0.2 + 0.5 = 0.3, 0, 0, 0, 0]
    """
    kl = t([9.0, 0.5, -0.2, 1.0, 9.0], [9.0, 9.0, 0.3, 0.0, -1.0], [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 7.0, 7.0, 7.0, 7.0])
    mask = m([0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0])
    scores = t(2.0, -1.0, 5.0, 0.5)
    out = token_rewards(scores, kl, mask, kl_coef=0.1)
    assert_close(
        out, [[0.0, -0.05, 0.02, 1.9, 0.0], [0.0, 0.0, -0.03, 0.0, -0.9], [0.0] * 5, [0.3, 0.0, 0.0, 0.0, 0.0]]
    )


def test_token_rewards_all_empty_batch():
    """No row has a response: all zeros, no indexing error."""
    out = token_rewards(t(1.0, 2.0), t([1.0, 2.0], [3.0, 4.0]), m([0, 0], [0, 0]), kl_coef=0.1)
    assert_close(out, [[0.0, 0.0], [0.0, 0.0]])


# --------------------------------------------------------------------------- explained variance
def test_explained_variance_by_hand():
    """Returns on the response: [1, 2, 3, 4] (mean 2.5, variance 1.25); junk at masked positions.

    values == returns: residual 0 -> 1 - 0 / 1.25 = 1.0
    values = 2.5 everywhere (the mean return): residual = R - 2.5, variance 1.25 -> 1 - 1 = 0.0
    values = [1, 2, 3, 3]: residual [0, 0, 0, 1], mean 0.25, variance 0.25 - 0.0625 = 0.1875
        -> 1 - 0.1875 / 1.25 = 1 - 0.15 = 0.85
    Changing values/returns at masked positions changes none of these.
    """
    returns = t([100.0, 1.0, 2.0], [3.0, 4.0, -50.0])
    mask = m([0, 1, 1], [1, 1, 0])
    assert_close(explained_variance(returns.clone(), returns, mask), 1.0)
    assert_close(explained_variance(torch.full_like(returns, 2.5), returns, mask), 0.0)
    values = t([-7.0, 1.0, 2.0], [3.0, 3.0, 12.0])
    assert_close(explained_variance(values, returns, mask), 0.85)

    junk_r, junk_v = returns.clone(), values.clone()
    junk_r[~mask] = torch.tensor([1e6, -1e6], dtype=torch.float64)
    junk_v[~mask] = torch.tensor([-3e5, 4e5], dtype=torch.float64)
    assert_close(explained_variance(junk_v, junk_r, mask), 0.85)
    assert isinstance(explained_variance(values, returns, mask), float)


def test_rloo_and_grpo_by_hand():
    from pipeline.advantages import grpo, rloo

    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # Leave-one-out: 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2; equal rewards give 0.
    assert torch.allclose(rloo(rewards), torch.tensor([[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]]))
    # Group-relative: mean 2, sample std 1.
    assert torch.allclose(grpo(rewards, eps=0.0)[0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(grpo(rewards)[1], torch.zeros(3))


def test_critic_free_estimators_give_every_response_token_its_rollouts_advantage():
    from types import SimpleNamespace

    from pipeline.advantages import ADVANTAGE_ESTIMATORS

    mask = torch.tensor([[False, True, True], [False, True, False], [True, True, True], [False, False, True]])
    # Token rewards: -0.1 KL per token and the score on the last: rollout totals 0.8, 2.0 | 0.0, 3.0.
    rewards = torch.tensor([[0.0, -0.1, 0.9], [0.0, 2.0, 0.0], [-0.1, -0.1, 0.2], [0.0, 0.0, 3.0]])
    rewards_off_mask = rewards + (~mask) * 100.0  # positions outside a response count for nothing
    algo = SimpleNamespace(samples_per_prompt=2)
    advantages, returns = ADVANTAGE_ESTIMATORS["rloo"](rewards_off_mask, torch.zeros_like(rewards), mask, algo)
    per_rollout = torch.tensor([0.8 - 2.0, 2.0 - 0.8, 0.0 - 3.0, 3.0 - 0.0])
    assert torch.allclose(advantages, per_rollout[:, None] * mask, atol=1e-6)
    assert torch.equal(advantages, returns)
    grouped, _ = ADVANTAGE_ESTIMATORS["grpo"](rewards, torch.zeros_like(rewards), mask, algo)
    # Two samples a, b: mean (a + b) / 2, sample std |a - b| / sqrt(2), so A = +-(|a - b| / 2) / (std + eps).
    first = 0.6 / (1.2 / 2**0.5 + 1e-4)
    second = 1.5 / (3.0 / 2**0.5 + 1e-4)
    expected = torch.tensor([-first, first, -second, second])
    assert torch.allclose(grouped, expected[:, None] * mask, atol=1e-5)
    with pytest.raises(ValueError, match="groups of 2"):
        ADVANTAGE_ESTIMATORS["rloo"](rewards[:3], torch.zeros(3, 3), mask[:3], algo)
