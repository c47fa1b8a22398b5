"""Every loss of the project as a pure function of tensors: reward model, DPO and its variants, PPO.

Shapes: B batch (pairs or rollouts), T token positions. Each function names the equation it
implements. Log-probabilities come from logprobs.py, advantages from advantages.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------ reward model


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair reward-model loss. All arguments (B,); returns (B,).

    Bradley-Terry: L = -log sigma(r(x, y_c) - r(x, y_r))   (InstructGPT, Eq. 1)
    With a margin m(r) from the pair's rating: L = -log sigma(r_c - r_r - m(r))   (Llama 2, Eq. 2)
    A zero margin gives back the plain loss.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)  # Llama 2, Eq. 2


def reward_centering_penalty(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """(r_c + r_r)^2 per pair, (B,) -> (B,): pulls rewards toward zero mean (Eisenstein et al. 2023)."""
    return (chosen_rewards + rejected_rewards) ** 2


# -------------------------------------------------------------------------------------------- DPO


def implicit_rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards r^(x, y) = beta log(pi(y|x) / pi_ref(y|x)), each (B,), detached."""
    chosen = beta * (policy_chosen - reference_chosen).detach()
    rejected = beta * (policy_rejected - reference_rejected).detach()
    return chosen, rejected


def _log_ratio_difference(policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> torch.Tensor:
    """h = log(pi(y_c)/pi_ref(y_c)) - log(pi(y_r)/pi_ref(y_r)), (B,)."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The DPO loss, optionally conservative. Inputs are summed response log-probs, each (B,).

    L = -log sigma(beta * h)   (DPO paper, Eq. 7), h the log-ratio difference.
    Conservative DPO assumes labels flipped with probability eps:
    L = -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h)   (Mitchell 2023, cDPO).
    Returns per-pair losses (B,).
    """
    logits = beta * _log_ratio_difference(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)  # DPO Eq. 7


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO: regress the log-ratio difference onto 1 / (2 beta). Inputs (B,), returns (B,).

    L = (h - 1/(2 beta))^2   (Azar et al. 2023, Eq. 17; beta is their tau)
    """
    h = _log_ratio_difference(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2  # IPO Eq. 17


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """SLiC's calibration hinge on the reference-normalised likelihood ratio. Inputs (B,), returns (B,).

    L = max(0, 1 - beta * h)   (Zhao et al. 2023, SLiC-HF Eq. 1 with delta = 1; DPO paper Sec. 6)
    """
    h = _log_ratio_difference(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return torch.relu(1.0 - beta * h)


def chosen_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term: per-token negative log-likelihood of the chosen response, (B,), (B,) -> (B,).

    L_RPO = L_DPO + alpha * (-log pi(y_c|x) / |y_c|)   (Pang et al. 2024, Eq. 3)
    """
    return -policy_chosen / chosen_lengths.clamp(min=1)


# -------------------------------------------------------------------------------------------- PPO
# Shapes: B rollouts, T token positions (aligned with token_logps: position t scores token t+1).
# `mask` is True on response tokens only; prompt and padding positions never contribute.


def ppo_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over response tokens (Schulman et al. 2017, Eq. 7).

    logps, old_logps, advantages, mask: (B, T). Returns (loss sum over masked tokens, stats sums):
    the caller divides by the token count of the whole minibatch over all processes.
        L = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    """
    log_ratio = torch.where(mask, logps - old_logps, 0.0)  # no exp overflow from a masked position
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    losses = torch.max(unclipped, clipped)  # PPO Eq. 7 (as a loss to minimise)
    mask_f = mask.to(losses.dtype)
    with torch.no_grad():
        stats = {
            "clipfrac": ((clipped > unclipped).to(losses.dtype) * mask_f).sum(),
            "approxkl": (0.5 * log_ratio**2 * mask_f).sum(),
        }
    return (losses * mask_f).sum(), stats


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, summed over response tokens: (loss sum, clipped-token count).

    values, old_values, returns, mask: (B, T).
        L = 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)
    (the value clipping of OpenAI's baselines PPO2 and "The N+ Implementation Details of RLHF").
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    losses = 0.5 * torch.max(unclipped_loss, clipped_loss)
    mask_f = mask.to(losses.dtype)
    with torch.no_grad():
        clipped = ((clipped_loss > unclipped_loss).to(losses.dtype) * mask_f).sum()
    return (losses * mask_f).sum(), clipped
