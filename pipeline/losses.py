"""Every loss of the project as a pure function of tensors.

Shapes: B batch, T sequence length, V vocabulary. Labels use -100 for positions that carry no loss
(prompt and padding). Each function names the equation it implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token under the model.

    logits: (B, T, V) from a causal LM on the whole sequence; labels: (B, T), the same sequence with
    -100 where no loss is wanted. Position t's logits predict token t+1, so both are shifted.
    Returns (logps, mask), each (B, T-1); logps is 0 where mask is False.
    """
    logits = logits[:, :-1, :]  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE
    safe_targets = targets.masked_fill(~mask, 0)
    # cross_entropy gathers the target's log-probability without keeping a (B, T, V) log-softmax.
    logps = -F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), safe_targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return logps * mask, mask


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the response tokens, and how many there were.

    logits: (B, T, V); labels: (B, T) with -100 on prompt and padding.
    Returns (nll_sum, n_tokens), both scalars. The caller divides by the token count of the whole
    optimizer step (all micro-batches, all processes), so that every response token weighs the same
    whatever the batch layout: L = -(1/N) sum_t log p(y_t | x, y_<t)  (Llama 2, Sec. 3.1: loss on
    answer tokens only).
    """
    logps, mask = token_logps(logits, labels)
    return -logps.sum(), mask.sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's response tokens, and how many there are.

    logits: (B, T, V); labels: (B, T) with -100 on prompt and padding. Returns (logps, n_tokens),
    each (B,). DPO's log pi(y|x) is this sum over the response only.
    """
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


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
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards r^(x, y) = beta log(pi(y|x) / pi_ref(y|x)), each (B,), detached."""
    chosen = beta * (policy_chosen - reference_chosen).detach()
    rejected = beta * (policy_rejected - reference_rejected).detach()
    return chosen, rejected


def _log_ratio_difference(policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> torch.Tensor:
    """h = log(pi(y_c)/pi_ref(y_c)) - log(pi(y_r)/pi_ref(y_r)), (B,)."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
    beta: float, label_smoothing: float = 0.0,
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
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, beta: float,
) -> torch.Tensor:
    """IPO: regress the log-ratio difference onto 1 / (2 beta). Inputs (B,), returns (B,).

    L = (h - 1/(2 beta))^2   (Azar et al. 2023, Eq. 17; beta is their tau)
    """
    h = _log_ratio_difference(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2  # IPO Eq. 17


def hinge_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, beta: float,
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
