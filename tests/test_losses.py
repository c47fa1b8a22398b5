"""The losses against numbers worked by hand: Bradley-Terry with margin, DPO and its variants, PPO.

Every expected value below is written out in the test's docstring and typed in as a literal; the
asserts compare with those literals, never with a re-computation by the same formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close, m, t
from pipeline.advantages import explained_variance, gae, kl_penalty, masked_mean, masked_whiten, token_rewards
from pipeline.logprobs import entropy_from_logits, token_logps
from pipeline.losses import (
    bradley_terry_loss,
    chosen_nll,
    dpo_sigmoid_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_centering_penalty,
)


# ------------------------------------------------------------------------------ Bradley-Terry
def test_bradley_terry_plain_by_hand():
    """L = -log sigma(r_c - r_r).

    (1, 1):   d = 0    -> ln 2              = 0.693147   (no preference learned: coin flip)
    (2, 1):   d = 1    -> log(1 + e^-1)     = 0.313262
    (0.5, 0): d = 0.5  -> log(1 + e^-0.5)   = 0.474077
    (0, 2):   d = -2   -> log(1 + e^2)      = 2.126928   (wrong order costs more)
    """
    loss = bradley_terry_loss(t(1.0, 2.0, 0.5, 0.0), t(1.0, 1.0, 0.0, 2.0))
    assert_close(loss, [0.693147, 0.313262, 0.474077, 2.126928])


def test_bradley_terry_equal_rewards_is_ln2():
    """r_c == r_r for any value gives -log sigma(0) = ln 2 = 0.693147."""
    loss = bradley_terry_loss(t(-3.0, 0.0, 7.25), t(-3.0, 0.0, 7.25))
    assert_close(loss, [0.693147] * 3)


def test_bradley_terry_margin_by_hand():
    """Llama 2 Eq. 2: L = -log sigma(r_c - r_r - m).

    r_c = 2, r_r = 0.5 (difference 1.5):
      m = 0.5 -> d = 1.0  -> 0.313262
      m = 1.0 -> d = 0.5  -> 0.474077
      m = 1.5 -> d = 0    -> 0.693147
      m = 3.5 -> d = -2   -> 2.126928
    """
    loss = bradley_terry_loss(t(2.0, 2.0, 2.0, 2.0), t(0.5, 0.5, 0.5, 0.5), margin=t(0.5, 1.0, 1.5, 3.5))
    assert_close(loss, [0.313262, 0.474077, 0.693147, 2.126928])


def test_bradley_terry_zero_margin_equals_no_margin():
    """m = 0 subtracts nothing: bit-for-bit the plain loss. (2, 1) -> 0.313262, (0, 2) -> 2.126928."""
    chosen, rejected = t(2.0, 0.0, 0.5), t(1.0, 2.0, 0.0)
    with_zero = bradley_terry_loss(chosen, rejected, margin=torch.zeros(3, dtype=torch.float64))
    without = bradley_terry_loss(chosen, rejected)
    assert torch.equal(with_zero, without)
    assert_close(with_zero, [0.313262, 2.126928, 0.474077])


def test_bradley_terry_larger_margin_larger_loss():
    """r_c = 2, r_r = 0.5: m = 0, 0.5, 1, 1.5, 3.5 -> 0.201413 < 0.313262 < 0.474077 < 0.693147 < 2.126928.

    m = 0: d = 1.5 -> log(1 + e^-1.5) = log(1.223130) = 0.201413.
    """
    margins = t(0.0, 0.5, 1.0, 1.5, 3.5)
    loss = bradley_terry_loss(
        torch.full((5,), 2.0, dtype=torch.float64), torch.full((5,), 0.5, dtype=torch.float64), margin=margins
    )
    assert_close(loss, [0.201413, 0.313262, 0.474077, 0.693147, 2.126928])
    assert (loss[1:] > loss[:-1]).all()


def test_bradley_terry_gradient_by_hand():
    """dL/dr_c = -sigma(-(r_c - r_r - m)) = -(1 - sigma(d)); dL/dr_r = dL/dm = +sigma(-d).

    pair 0: r_c = 2, r_r = 0.5, m = 0.5 -> d = 1  -> sigma(-1) = 0.268941
    pair 1: r_c = 1, r_r = 1,   m = 0   -> d = 0  -> sigma(0)  = 0.5
    pair 2: r_c = 0, r_r = 1,   m = 1   -> d = -2 -> sigma(2)  = 0.880797
    So dL/dr_c = [-0.268941, -0.5, -0.880797] and dL/dr_r = dL/dm = [0.268941, 0.5, 0.880797].
    """
    chosen = t(2.0, 1.0, 0.0, grad=True)
    rejected = t(0.5, 1.0, 1.0, grad=True)
    margin = t(0.5, 0.0, 1.0, grad=True)
    bradley_terry_loss(chosen, rejected, margin).sum().backward()
    assert_close(chosen.grad, [-0.268941, -0.5, -0.880797])
    assert_close(rejected.grad, [0.268941, 0.5, 0.880797])
    assert_close(margin.grad, [0.268941, 0.5, 0.880797])


def test_reward_centering_penalty_by_hand():
    """(r_c + r_r)^2: (1, 2) -> 9; (-1.5, 0.5) -> 1; (0.25, -0.25) -> 0; (3, -1) -> 4; (-2, -0.5) -> 6.25."""
    penalty = reward_centering_penalty(t(1.0, -1.5, 0.25, 3.0, -2.0), t(2.0, 0.5, -0.25, -1.0, -0.5))
    assert_close(penalty, [9.0, 1.0, 0.0, 4.0, 6.25])


def test_reward_centering_penalty_gradient_by_hand():
    """d/dr_c (r_c + r_r)^2 = 2 (r_c + r_r): (1, 2) -> 6; (-1.5, 0.5) -> -2. Same for r_r."""
    chosen, rejected = t(1.0, -1.5, grad=True), t(2.0, 0.5, grad=True)
    reward_centering_penalty(chosen, rejected).sum().backward()
    assert_close(chosen.grad, [6.0, -2.0])
    assert_close(rejected.grad, [6.0, -2.0])


# ----------------------------------------------------------------------------------------- DPO
#
# Three pairs of summed log-probs, chosen so that h = (pi_c - ref_c) - (pi_r - ref_r) is round:
#   A: pi_c = -10, ref_c = -15, pi_r = -20, ref_r = -15 -> h = 5 - (-5)  = 10
#   B: pi_c = -11, ref_c = -12, pi_r = -13, ref_r = -12 -> h = 1 - (-1)  = 2
#   C: pi_c = -30, ref_c = -29, pi_r = -25, ref_r = -26 -> h = -1 - 1    = -2
PAIRS = {
    "policy_chosen": (-10.0, -11.0, -30.0),
    "policy_rejected": (-20.0, -13.0, -25.0),
    "reference_chosen": (-15.0, -12.0, -29.0),
    "reference_rejected": (-15.0, -12.0, -26.0),
}


def pairs(grad: bool = False) -> dict[str, torch.Tensor]:
    return {name: t(*values, grad=grad) for name, values in PAIRS.items()}


def test_dpo_sigmoid_beta_0_1_by_hand():
    """beta = 0.1, L = -log sigma(beta h) (DPO Eq. 7).

    A: h = 10 -> beta h = 1    -> 0.313262
    B: h = 2  -> beta h = 0.2  -> log(1 + e^-0.2) = log(1.818731) = 0.598139
    C: h = -2 -> beta h = -0.2 -> 0.2 + 0.598139 = 0.798139
    """
    loss = dpo_sigmoid_loss(**pairs(), beta=0.1)
    assert_close(loss, [0.313262, 0.598139, 0.798139])


def test_dpo_sigmoid_beta_0_5_by_hand():
    """beta = 0.5.

    A: h = 10 -> beta h = 5  -> log(1 + e^-5) = log(1.006738) = 0.006715
    B: h = 2  -> beta h = 1  -> 0.313262
    C: h = -2 -> beta h = -1 -> 1.313262
    """
    loss = dpo_sigmoid_loss(**pairs(), beta=0.5)
    assert_close(loss, [0.006715, 0.313262, 1.313262])


def test_dpo_sigmoid_identical_policy_and_reference_is_ln2():
    """pi == pi_ref gives h = 0, so L = ln 2 = 0.693147 whatever beta (the start of DPO training)."""
    logps = t(-7.0, -40.0)
    for beta in (0.1, 0.5, 2.0):
        loss = dpo_sigmoid_loss(logps, logps - 3.0, logps, logps - 3.0, beta=beta)
        assert_close(loss, [0.693147, 0.693147])


def test_conservative_dpo_by_hand():
    """cDPO, eps = 0.1: L = -(1 - eps) log sigma(x) - eps log sigma(-x), x = beta h.

    Since -log sigma(-x) = x - log sigma(x), L = -log sigma(x) + eps x.
    beta = 0.5:
      A: x = 5  -> 0.006715 + 0.5 = 0.506715
      B: x = 1  -> 0.313262 + 0.1 = 0.413262
           (check: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.281936 + 0.131326 = 0.413262)
      C: x = -1 -> 1.313262 - 0.1 = 1.213262
    """
    loss = dpo_sigmoid_loss(**pairs(), beta=0.5, label_smoothing=0.1)
    assert_close(loss, [0.506715, 0.413262, 1.213262])


def test_conservative_dpo_zero_smoothing_is_plain_dpo():
    """eps = 0 is the plain loss: beta = 0.5 -> [0.006715, 0.313262, 1.313262]."""
    smoothed = dpo_sigmoid_loss(**pairs(), beta=0.5, label_smoothing=0.0)
    plain = dpo_sigmoid_loss(**pairs(), beta=0.5)
    assert torch.equal(smoothed, plain)
    assert_close(smoothed, [0.006715, 0.313262, 1.313262])


def test_conservative_dpo_half_smoothing_is_symmetric():
    """eps = 0.5: L = -log sigma(x) + x/2 = log(e^{x/2} + e^{-x/2}), even in x.

    B (x = 1) and C (x = -1) both give 0.313262 + 0.5 = 0.813262 (= log(2 cosh 0.5)).
    """
    loss = dpo_sigmoid_loss(**pairs(), beta=0.5, label_smoothing=0.5)
    assert_close(loss[1:], [0.813262, 0.813262])


def test_implicit_rewards_by_hand_and_detached():
    """r^ = beta (pi - ref).

    beta = 0.1: chosen  A: 0.1 * 5 = 0.5,   B: 0.1 * 1 = 0.1,   C: 0.1 * -1 = -0.1
                rejected A: 0.1 * -5 = -0.5, B: 0.1 * -1 = -0.1, C: 0.1 * 1 = 0.1
    Both come back without a graph even though the policy log-probs require grad.
    """
    inputs = pairs(grad=True)
    chosen, rejected = implicit_rewards(**inputs, beta=0.1)
    assert_close(chosen, [0.5, 0.1, -0.1])
    assert_close(rejected, [-0.5, -0.1, 0.1])
    assert not chosen.requires_grad and chosen.grad_fn is None
    assert not rejected.requires_grad and rejected.grad_fn is None


def test_implicit_rewards_margin_matches_dpo_logit():
    """beta = 0.5: r^_c - r^_r = beta h = [5, 1, -1], the argument of sigma in the DPO loss."""
    chosen, rejected = implicit_rewards(**pairs(), beta=0.5)
    assert_close(chosen - rejected, [5.0, 1.0, -1.0])


# ------------------------------------------------------------------ DPO gradient (paper, Sec. 4)
def test_dpo_gradient_weighting_by_hand():
    """grad L = -beta sigma(r^_r - r^_c) [grad log pi(y_c) - grad log pi(y_r)], r^ = beta log pi/pi_ref.

    beta = 0.1:
      A: r^_c = 0.5,  r^_r = -0.5 -> sigma(-1)   = 0.268941 -> dL/dpi_c = -0.0268941, dL/dpi_r = +0.0268941
      B: r^_c = 0.1,  r^_r = -0.1 -> sigma(-0.2) = 0.450166 -> -0.0450166, +0.0450166
      C: r^_c = -0.1, r^_r = 0.1  -> sigma(0.2)  = 0.549834 -> -0.0549834, +0.0549834
    The weight is larger when the implicit reward model orders the pair wrongly (C).
    The reference log-probs enter with the opposite signs: dL/dref_c = +, dL/dref_r = -.
    """
    inputs = pairs(grad=True)
    dpo_sigmoid_loss(**inputs, beta=0.1).sum().backward()
    assert_close(inputs["policy_chosen"].grad, [-0.0268941, -0.0450166, -0.0549834])
    assert_close(inputs["policy_rejected"].grad, [0.0268941, 0.0450166, 0.0549834])
    assert_close(inputs["reference_chosen"].grad, [0.0268941, 0.0450166, 0.0549834])
    assert_close(inputs["reference_rejected"].grad, [-0.0268941, -0.0450166, -0.0549834])


def test_dpo_gradient_weighting_beta_0_5_by_hand():
    """beta = 0.5:
      A: r^_c = 2.5,  r^_r = -2.5 -> sigma(-5) = 0.006693 -> dL/dpi_c = -0.5 * 0.006693 = -0.0033464
      B: r^_c = 0.5,  r^_r = -0.5 -> sigma(-1) = 0.268941 -> -0.1344707
      C: r^_c = -0.5, r^_r = 0.5  -> sigma(1)  = 0.731059 -> -0.3655293
    dL/dpi_r is the same with a + sign.
    """
    inputs = pairs(grad=True)
    dpo_sigmoid_loss(**inputs, beta=0.5).sum().backward()
    assert_close(inputs["policy_chosen"].grad, [-0.0033464, -0.1344707, -0.3655293])
    assert_close(inputs["policy_rejected"].grad, [0.0033464, 0.1344707, 0.3655293])


@pytest.mark.parametrize(
    "beta, pc, pr, rc, rr",
    [
        (0.1, -10.0, -20.0, -15.0, -15.0),
        (0.5, -11.0, -13.0, -12.0, -12.0),
        (0.5, -30.0, -25.0, -29.0, -26.0),
        (1.0, -3.5, -2.0, -4.0, -1.0),
        (0.05, -100.0, -80.0, -90.0, -95.0),
        (2.0, -1.0, -1.0, -1.0, -1.0),
    ],
)
def test_dpo_gradient_weighting_matches_paper(beta, pc, pr, rc, rr):
    """Autograd of one pair against the paper's weight -beta sigma(r^_r - r^_c), r^ from the inputs."""
    inputs = {
        name: t(value, grad=True)
        for name, value in zip(
            ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected"), (pc, pr, rc, rr)
        )
    }
    dpo_sigmoid_loss(**inputs, beta=beta).sum().backward()
    reward_chosen, reward_rejected = beta * (pc - rc), beta * (pr - rr)
    weight = beta / (1.0 + math.exp(-(reward_rejected - reward_chosen)))
    assert abs(inputs["policy_chosen"].grad.item() - (-weight)) < 1e-9
    assert abs(inputs["policy_rejected"].grad.item() - weight) < 1e-9


def test_conservative_dpo_gradient_by_hand():
    """cDPO, eps = 0.1, beta = 0.5, pair B (x = beta h = 1):
    dL/dx = -(1 - eps) sigma(-x) + eps sigma(x) = -0.9 * 0.268941 + 0.1 * 0.731059
          = -0.242047 + 0.073106 = -0.168941  (= eps - sigma(-x))
    dL/dpi_c = beta * dL/dx = -0.0844707; dL/dpi_r = +0.0844707.
    """
    inputs = {name: t(values[1], grad=True) for name, values in PAIRS.items()}
    dpo_sigmoid_loss(**inputs, beta=0.5, label_smoothing=0.1).sum().backward()
    assert_close(inputs["policy_chosen"].grad, [-0.0844707])
    assert_close(inputs["policy_rejected"].grad, [0.0844707])


# ----------------------------------------------------------------------------------- IPO, hinge
def test_ipo_by_hand():
    """L = (h - 1/(2 beta))^2.

    beta = 0.5 -> target 1:  A: (10 - 1)^2 = 81;  B: (2 - 1)^2 = 1;  C: (-2 - 1)^2 = 9
    beta = 0.1 -> target 5:  A: (10 - 5)^2 = 25;  B: (2 - 5)^2 = 9;  C: (-2 - 5)^2 = 49
    """
    assert_close(ipo_loss(**pairs(), beta=0.5), [81.0, 1.0, 9.0])
    assert_close(ipo_loss(**pairs(), beta=0.1), [25.0, 9.0, 49.0])


def test_ipo_zero_at_target():
    """beta = 0.5, h = 1 (pi_c - ref_c = 0.5, pi_r - ref_r = -0.5) -> (1 - 1)^2 = 0.
    beta = 0.25 -> target 2; h = 2 (pair B) -> 0; gradient 2 (h - target) = 0 there too."""
    assert_close(ipo_loss(t(-1.5), t(-2.5), t(-2.0), t(-2.0), beta=0.5), [0.0])
    inputs = {name: t(values[1], grad=True) for name, values in PAIRS.items()}
    loss = ipo_loss(**inputs, beta=0.25)
    assert_close(loss, [0.0])
    loss.sum().backward()
    assert_close(inputs["policy_chosen"].grad, [0.0])


def test_ipo_gradient_by_hand():
    """dL/dpi_c = 2 (h - 1/(2 beta)), dL/dpi_r = -2 (h - 1/(2 beta)).
    beta = 0.5, target 1: A: 2 * 9 = 18; B: 2 * 1 = 2; C: 2 * -3 = -6 (pushes h up)."""
    inputs = pairs(grad=True)
    ipo_loss(**inputs, beta=0.5).sum().backward()
    assert_close(inputs["policy_chosen"].grad, [18.0, 2.0, -6.0])
    assert_close(inputs["policy_rejected"].grad, [-18.0, -2.0, 6.0])


def test_hinge_by_hand():
    """L = max(0, 1 - beta h).

    beta = 0.1: A: h = 10 -> 1 - 1 = 0 (exactly at the margin);  B: h = 2 -> 1 - 0.2 = 0.8;
                C: h = -2 -> 1 + 0.2 = 1.2
    beta = 0.5: A: 1 - 5 < 0 -> 0;  B: 1 - 1 = 0;  C: 1 + 1 = 2
    """
    assert_close(hinge_loss(**pairs(), beta=0.1), [0.0, 0.8, 1.2])
    assert_close(hinge_loss(**pairs(), beta=0.5), [0.0, 0.0, 2.0])


def test_hinge_zero_beyond_margin_and_gradient():
    """beta = 0.25: h = 4 -> 1 - 1 = 0; h = 8 -> max(0, -1) = 0; h = 2 -> 0.5; h = 0 -> 1.
    Beyond the margin nothing flows back; below it dL/dpi_c = -beta = -0.25, dL/dpi_r = +0.25."""
    policy_chosen = t(2.0, 4.0, 1.0, 0.0, grad=True)
    policy_rejected = t(-2.0, -4.0, -1.0, 0.0, grad=True)
    zeros = torch.zeros(4, dtype=torch.float64)
    loss = hinge_loss(policy_chosen, policy_rejected, zeros, zeros, beta=0.25)
    assert_close(loss, [0.0, 0.0, 0.5, 1.0])
    loss.sum().backward()
    assert_close(policy_chosen.grad[1:], [0.0, -0.25, -0.25])
    assert_close(policy_rejected.grad[1:], [0.0, 0.25, 0.25])


# ----------------------------------------------------------------------------------- chosen NLL
def test_chosen_nll_by_hand():
    """-logp / length: (-6, 3) -> 2; (-5, 2) -> 2.5; (-0.9, 4) -> 0.225; (-1.5, 1) -> 1.5."""
    nll = chosen_nll(t(-6.0, -5.0, -0.9, -1.5), torch.tensor([3, 2, 4, 1]))
    assert_close(nll, [2.0, 2.5, 0.225, 1.5])


def test_chosen_nll_zero_length_is_clamped_to_one():
    """Length 0 would divide by zero; it is clamped to 1: (-1.5, 0) -> 1.5; (0, 0) -> 0, finite."""
    nll = chosen_nll(t(-1.5, 0.0, -4.0), torch.tensor([0, 0, 2]))
    assert torch.isfinite(nll).all()
    assert_close(nll, [1.5, 0.0, 2.0])


def test_chosen_nll_gradient_by_hand():
    """d/dlogp (-logp / n) = -1/n: n = 4 -> -0.25; n = 0 (clamped to 1) -> -1."""
    logps = t(-2.0, -3.0, grad=True)
    chosen_nll(logps, torch.tensor([4, 0])).sum().backward()
    assert_close(logps.grad, [-0.25, -1.0])


# ------------------------------------------------------------------------------------------ shapes
def test_every_per_pair_loss_returns_batch_shape():
    """Each per-pair function maps (B,) inputs to (B,), B = 5, and does not reduce."""
    torch.manual_seed(1)
    B = 5
    pc, pr, rc, rr = (-torch.rand(B, dtype=torch.float64) * 10 for _ in range(4))
    outputs = {
        "bradley_terry": bradley_terry_loss(pc, pr),
        "bradley_terry_margin": bradley_terry_loss(pc, pr, margin=torch.rand(B, dtype=torch.float64)),
        "centering": reward_centering_penalty(pc, pr),
        "dpo": dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1),
        "cdpo": dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1),
        "ipo": ipo_loss(pc, pr, rc, rr, beta=0.1),
        "hinge": hinge_loss(pc, pr, rc, rr, beta=0.1),
        "chosen_nll": chosen_nll(pc, torch.randint(0, 6, (B,))),
    }
    chosen_reward, rejected_reward = implicit_rewards(pc, pr, rc, rr, beta=0.1)
    outputs["implicit_chosen"], outputs["implicit_rejected"] = chosen_reward, rejected_reward
    for name, value in outputs.items():
        assert value.shape == (B,), name


# ---------------------------------------------------------------------------------- policy loss
CASES = [
    # (ratio, A, loss, clipped?)  eps = 0.2, L = max(-A r, -A clip(r, 0.8, 1.2))
    (1.5, 1.0, -1.2, True),  # max(-1.5, -1.2) = -1.2: gain capped
    (0.5, -1.0, 0.8, True),  # max(0.5, 0.8)   = 0.8
    (1.5, -1.0, 1.5, False),  # max(1.5, 1.2)   = 1.5: the pessimistic side is not clipped
    (0.5, 1.0, -0.5, False),  # max(-0.5, -0.8) = -0.5
    (1.1, 2.0, -2.2, False),  # inside the range: -2 * 1.1 = -2.2
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
    logps = t(
        [math.log(1.5), math.log(0.5), 3.0, math.log(1.5)],
        [math.log(0.5), math.log(1.1), math.log(0.9), 3.0],
        grad=True,
    )
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


@pytest.mark.parametrize(
    "v, v_old, r, loss, clipped",
    [
        (1.0, 0.9, 1.5, 0.125, False),
        (1.5, 1.0, 2.0, 0.32, True),
        (1.5, 1.0, 1.0, 0.125, False),
        (0.0, 1.0, -1.0, 1.62, True),
        (2.0, 2.0, 2.0, 0.0, False),  # V = V_old = R: 0, not clipped
    ],
)
def test_ppo_value_loss_single_token_by_hand(v, v_old, r, loss, clipped):
    """The four cases of test_ppo_value_loss_by_hand one at a time, plus a perfect prediction."""
    out, n = ppo_value_loss(t([v]), t([v_old]), t([r]), m([1]), clip_range=0.2)
    assert_close(out, loss)
    assert n.item() == (1.0 if clipped else 0.0)


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
            "kl": kl * mask,
            "rewards": rewards,
            "adv": adv,
            "ret": ret,
            "white": white,
            "policy": pl,
            "clipfrac": pstats["clipfrac"],
            "approxkl": pstats["approxkl"],
            "value": vl,
            "vclip": vclip,
            "entropy": ent,
            "ev": torch.tensor(explained_variance(values, ret, mask)),
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
    labels[0, :3] = -100  # prompt 3, response 4, pad 2
    labels[0, 7:] = -100
    labels[1, :2] = -100  # prompt 2, response of 7 to the end
    labels[2, :5] = -100  # a single response token
    labels[2, 6:] = -100
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
