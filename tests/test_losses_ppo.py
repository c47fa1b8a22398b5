"""PPO pieces of pipeline/losses.py against numbers worked by hand.

Every expected value is written out in the test's docstring and typed in as a literal; the asserts
never re-derive it from the formula under test. The one exception is the GAE test against a plain
Python loop, which is the textbook recursion written out over lists, independent of the
vectorised (B, T) code it checks.

Layout used throughout: (B, T) rows with prompt positions on the left, the response in the middle
and padding on the right; `mask` is True on response positions only. Values typed into masked
positions (9., -4., 1e9, ...) are junk that must never show up in a result.

Logs used below:
    ln 1.5 = 0.405465   (ln 1.5)^2 = 0.164402
    ln 0.5 = -0.693147  (ln 0.5)^2 = 0.480453
    ln 1.1 = 0.095310   (ln 1.1)^2 = 0.009084
    ln 0.9 = -0.105361  (ln 0.9)^2 = 0.011101
    ln 2.5 = 0.916291   ln 0.6 = -0.510826   ln(2/3) = -0.405465   ln 2 = 0.693147   ln 7 = 1.945910

Tensors are float64 where the function keeps the input dtype, so the only error left is the
rounding of the hand values to 6 decimals.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_logps,
    token_rewards,
)

TOL = 1e-6


def t(*rows, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def m(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def assert_close(actual, expected, tol: float = TOL) -> None:
    got = actual.detach().tolist() if isinstance(actual, torch.Tensor) else actual
    exp = expected

    def flat(x):
        return [v for row in x for v in flat(row)] if isinstance(x, list) else [x]

    got_f, exp_f = flat(got), flat(exp)
    assert len(got_f) == len(exp_f), (got, exp)
    for g, e in zip(got_f, exp_f):
        assert abs(g - e) < tol, (got, exp)


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
        mask[b, p:p + n] = True

    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, (p, n) in enumerate(layout):
        exp_adv, exp_ret = _textbook_gae(rewards[b, p:p + n].tolist(), values[b, p:p + n].tolist(), gamma, lam)
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
    assert_close(masked_whiten(values, mask, mean=mean, var=var, shift_mean=False),
                 [[0.0, 1.5, 2.0, 0.0], [2.5, 3.0, 0.0, 0.0]])


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
    kl = t([9.0, 0.5, -0.2, 1.0, 9.0], [9.0, 9.0, 0.3, 0.0, -1.0], [1.0, 2.0, 3.0, 4.0, 5.0],
           [2.0, 7.0, 7.0, 7.0, 7.0])
    mask = m([0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0])
    scores = t(2.0, -1.0, 5.0, 0.5)
    out = token_rewards(scores, kl, mask, kl_coef=0.1)
    assert_close(out, [[0.0, -0.05, 0.02, 1.9, 0.0], [0.0, 0.0, -0.03, 0.0, -0.9], [0.0] * 5,
                       [0.3, 0.0, 0.0, 0.0, 0.0]])


def test_token_rewards_all_empty_batch():
    """No row has a response: all zeros, no indexing error."""
    out = token_rewards(t(1.0, 2.0), t([1.0, 2.0], [3.0, 4.0]), m([0, 0], [0, 0]), kl_coef=0.1)
    assert_close(out, [[0.0, 0.0], [0.0, 0.0]])


# ---------------------------------------------------------------------------------- policy loss

CASES = [
    # (ratio, A, loss, clipped?)  eps = 0.2, L = max(-A r, -A clip(r, 0.8, 1.2))
    (1.5, 1.0, -1.2, True),    # max(-1.5, -1.2) = -1.2: gain capped
    (0.5, -1.0, 0.8, True),    # max(0.5, 0.8)   = 0.8
    (1.5, -1.0, 1.5, False),   # max(1.5, 1.2)   = 1.5: the pessimistic side is not clipped
    (0.5, 1.0, -0.5, False),   # max(-0.5, -0.8) = -0.5
    (1.1, 2.0, -2.2, False),   # inside the range: -2 * 1.1 = -2.2
    (0.9, -0.5, 0.45, False),  # inside the range: 0.5 * 0.9 = 0.45
]


@pytest.mark.parametrize("ratio, advantage, loss, clipped", CASES)
def test_ppo_policy_loss_single_token_by_hand(ratio, advantage, loss, clipped):
    """One token, old logp 0, logp = ln ratio; expected loss and clipping are in CASES above."""
    logps = t([math.log(ratio)])
    out, stats = ppo_policy_loss(logps, t([0.0]), t([advantage]), m([1]), clip_range=0.2)
    assert_close(out, loss)
    assert stats["clipfrac"].item() == (1.0 if clipped else 0.0)


def test_ppo_policy_loss_batch_sums_by_hand():
    """The six CASES in two rows of 4, with junk at masked positions (log ratio 3, A = 5).

    loss = -1.2 + 0.8 + 1.5 - 0.5 - 2.2 + 0.45 = -1.15
    clipfrac = 2 (the first two cases)
    approxkl = 0.5 * sum (ln r)^2 = 0.5 * (2 * 0.164402 + 2 * 0.480453 + 0.009084 + 0.011101)
             = 0.5 * 1.309895 = 0.654947
    Gradient of the loss w.r.t. logp: d(-A r)/d logp = -A r where the unclipped term is the max,
    0 where the clipped (constant) term is: [0, 0, 1.5, -0.5, -2.2, 0.45], 0 at masked positions.
    """
    old = t([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    logps = t([math.log(1.5), math.log(0.5), 3.0, math.log(1.5)],
              [math.log(0.5), math.log(1.1), math.log(0.9), 3.0], grad=True)
    adv = t([1.0, -1.0, 5.0, -1.0], [1.0, 2.0, -0.5, 5.0])
    mask = m([1, 1, 0, 1], [1, 1, 1, 0])
    loss, stats = ppo_policy_loss(logps, old, adv, mask, clip_range=0.2)
    assert_close(loss, -1.15)
    assert_close(stats["clipfrac"], 2.0)
    assert_close(stats["approxkl"], 0.654947)
    loss.backward()
    assert_close(logps.grad, [[0.0, 0.0, 0.0, 1.5], [-0.5, -2.2, 0.45, 0.0]])


def test_ppo_policy_loss_on_policy_is_minus_advantage_sum():
    """logps == old_logps: ratio 1 everywhere, so L = -sum(A * mask), nothing clipped, approxkl 0.

    A on the response = [0.7, -0.3, 1.1] and [2.0]: loss = -(0.7 - 0.3 + 1.1 + 2.0) = -3.5.
    Gradient w.r.t. logp = -A on the response, 0 at masked positions.
    """
    logps = t([-1.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -9.0, -9.0], grad=True)
    adv = t([4.0, 0.7, -0.3, 1.1], [-6.0, 2.0, 8.0, 8.0])
    mask = m([0, 1, 1, 1], [0, 1, 0, 0])
    loss, stats = ppo_policy_loss(logps, logps.detach().clone(), adv, mask, clip_range=0.2)
    assert_close(loss, -3.5)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0
    loss.backward()
    assert_close(logps.grad, [[0.0, -0.7, 0.3, -1.1], [0.0, -2.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------------- value loss


def test_ppo_value_loss_by_hand():
    """eps = 0.2, L = 0.5 * max((V - R)^2, (clip(V, V_old - 0.2, V_old + 0.2) - R)^2).

    V=1.0, V_old=0.9, R=1.5: inside the range: 0.5 * 0.5^2 = 0.125           not clipped
    V=1.5, V_old=1.0, R=2.0: clip -> 1.2: max(0.25, 0.8^2 = 0.64) -> 0.32     clipped
    V=1.5, V_old=1.0, R=1.0: clip -> 1.2: max(0.25, 0.2^2 = 0.04) -> 0.125    not clipped
    V=0.0, V_old=1.0, R=-1:  clip -> 0.8: max(1.0, 1.8^2 = 3.24) -> 1.62      clipped
    Sum = 0.125 + 0.32 + 0.125 + 1.62 = 2.19, clipped count 2. Masked junk (V=9, R=-9) ignored.
    Gradient w.r.t. V: (V - R) where the unclipped term is the max, else 0 (the clipped value is
    constant outside the range): [-0.5, 0, 0.5, 0], 0 at the masked positions.
    """
    values = t([1.0, 1.5, 9.0], [1.5, 0.0, 9.0], grad=True)
    old = t([0.9, 1.0, 0.0], [1.0, 1.0, 0.0])
    returns = t([1.5, 2.0, -9.0], [1.0, -1.0, -9.0])
    mask = m([1, 1, 0], [1, 1, 0])
    loss, clipped = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    assert_close(loss, 2.19)
    assert clipped.item() == 2.0
    loss.backward()
    assert_close(values.grad, [[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])


@pytest.mark.parametrize("v, v_old, r, loss, clipped", [
    (1.0, 0.9, 1.5, 0.125, False),
    (1.5, 1.0, 2.0, 0.32, True),
    (1.5, 1.0, 1.0, 0.125, False),
    (0.0, 1.0, -1.0, 1.62, True),
    (2.0, 2.0, 2.0, 0.0, False),   # V = V_old = R: 0, not clipped
])
def test_ppo_value_loss_single_token_by_hand(v, v_old, r, loss, clipped):
    """The four cases of test_ppo_value_loss_by_hand one at a time, plus a perfect prediction."""
    out, n = ppo_value_loss(t([v]), t([v_old]), t([r]), m([1]), clip_range=0.2)
    assert_close(out, loss)
    assert n.item() == (1.0 if clipped else 0.0)


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


# ------------------------------------------------------------------------------ masks, end to end


def _ppo_step(policy_logits, ref_logits, old_logps, labels, values, old_values, scores):
    """Every PPO quantity from raw tensors, the way a trainer chains them."""
    logps, mask = token_logps(policy_logits, labels)
    ref_logps, _ = token_logps(ref_logits, labels)
    out = {}
    for est in ("k1", "k3"):
        kl = kl_penalty(old_logps, ref_logps, est)
        rewards = token_rewards(scores, kl, mask, kl_coef=0.05)
        adv, ret = gae(rewards, values, mask, 0.99, 0.95)
        white = masked_whiten(adv, mask)
        pl, pstats = ppo_policy_loss(logps, old_logps, white, mask, clip_range=0.2)
        vl, vclip = ppo_value_loss(values, old_values, ret, mask, clip_range=0.2)
        ent = masked_mean(entropy_from_logits(policy_logits[:, :-1]), mask)
        out[est] = {
            "kl": kl * mask, "rewards": rewards, "adv": adv, "ret": ret, "white": white, "policy": pl,
            "clipfrac": pstats["clipfrac"], "approxkl": pstats["approxkl"], "value": vl, "vclip": vclip,
            "entropy": ent, "ev": torch.tensor(explained_variance(values, ret, mask)),
        }
    return out, mask


def test_masked_positions_change_no_loss():
    """Prompt/padding logits (policy and reference), values, old values and old logps changed by
    large amounts at masked positions: every reward, advantage, loss and statistic is unchanged.

    Labels mark prompt and padding with -100; position t of the (B, T-1) quantities scores token
    t+1, so the masked positions of the logits are those t whose label t+1 is -100 (and the last).
    """
    gen = torch.Generator().manual_seed(3)
    B, T, V = 3, 9, 11
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100; labels[0, 7:] = -100   # prompt 3, response 4, pad 2
    labels[1, :2] = -100                         # prompt 2, response of 7 to the end
    labels[2, :5] = -100; labels[2, 6:] = -100   # a single response token
    policy = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ref = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T - 1, generator=gen, dtype=torch.float64)
    old_values = values + 0.3 * torch.randn(B, T - 1, generator=gen, dtype=torch.float64)
    old_logps, mask = token_logps(policy + 0.5 * torch.randn(B, T, V, generator=gen, dtype=torch.float64), labels)
    scores = torch.tensor([1.5, -0.7, 0.2], dtype=torch.float64)
    base, mask = _ppo_step(policy, ref, old_logps, labels, values, old_values, scores)
    assert mask.sum() == 4 + 7 + 1

    masked_logit_pos = torch.cat([~mask, torch.ones(B, 1, dtype=torch.bool)], dim=1)  # (B, T)
    policy2, ref2 = policy.clone(), ref.clone()
    policy2[masked_logit_pos] += 40.0 * torch.randn(int(masked_logit_pos.sum()), V, generator=gen, dtype=torch.float64)
    ref2[masked_logit_pos] -= 25.0
    ref2[masked_logit_pos, 0] += 60.0
    values2, old_values2, old_logps2 = values.clone(), old_values.clone(), old_logps.clone()
    values2[~mask] = 1e6
    old_values2[~mask] = -1e6
    old_logps2[~mask] = -7.0  # a rollout that left non-zero log-probs at padding
    changed, _ = _ppo_step(policy2, ref2, old_logps2, labels, values2, old_values2, scores)

    for est in ("k1", "k3"):
        for key, a in base[est].items():
            b = changed[est][key]
            if a.dim() == 2:
                a, b = a[mask], b[mask]
            assert torch.allclose(a, b, rtol=0, atol=1e-12), (est, key, a, b)
    # and the per-token outputs are 0 outside the response
    for key in ("rewards", "adv", "ret", "white"):
        assert (changed["k3"][key][~mask] == 0).all(), key


def test_policy_loss_ignores_masked_inputs_and_has_zero_grad_there():
    """logps, old logps and advantages at masked positions changed (log ratio 0 or 4, far outside
    the clip range, A = +-10): loss, clipfrac, approxkl identical; gradient w.r.t. logps and values 0 there."""
    gen = torch.Generator().manual_seed(11)
    mask = m([0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1])
    logps = -torch.rand(2, 6, generator=gen, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(2, 6, generator=gen, dtype=torch.float64)
    adv = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    base_loss, base_stats = ppo_policy_loss(logps, old, adv, mask, 0.2)

    logps2, old2, adv2 = logps.clone(), old.clone(), adv.clone()
    logps2[~mask] = 2.0 * torch.sign(torch.randn(int((~mask).sum()), generator=gen, dtype=torch.float64))
    old2[~mask] = -2.0
    adv2[~mask] = 10.0 * torch.sign(torch.randn(int((~mask).sum()), generator=gen, dtype=torch.float64))
    logps2.requires_grad_(True)
    loss2, stats2 = ppo_policy_loss(logps2, old2, adv2, mask, 0.2)
    assert torch.allclose(loss2, base_loss, rtol=0, atol=1e-12)
    for k in ("clipfrac", "approxkl"):
        assert torch.allclose(stats2[k], base_stats[k], rtol=0, atol=1e-12)
    loss2.backward()
    assert (logps2.grad[~mask] == 0).all()

    values = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    vals2 = values.clone()
    vals2[~mask] = 1e3
    vals2.requires_grad_(True)
    base_v, base_c = ppo_value_loss(values, values * 0.9, adv, mask, 0.2)
    v2, c2 = ppo_value_loss(vals2, values * 0.9, adv2, mask, 0.2)
    assert torch.allclose(v2, base_v, rtol=0, atol=1e-12) and c2 == base_c
    v2.backward()
    assert (vals2.grad[~mask] == 0).all()
