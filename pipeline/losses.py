"""Every loss of the project as a pure function of tensors.

Shapes: B batch, T sequence length, V vocabulary. Labels use -100 for positions that carry no loss
(prompt and padding). Each function names the equation it implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def selected_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for each row, without a (N, V) log-softmax kept for backward.

    logits: (N, V); targets: (N,). Returns (N,). log p(y) = z_y - logsumexp(z): autograd keeps only
    the logits (already held) and the (N,) normaliser.
    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token under the model.

    logits: (B, T, V) from a causal LM on the whole sequence; labels: (B, T), the same sequence with
    -100 where no loss is wanted. Position t's logits predict token t+1, so both are shifted.
    Returns (logps, mask), each (B, T-1); logps is 0 where mask is False.
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE
    logps = selected_logps(logits[:, :-1, :], targets.masked_fill(~mask, 0))  # a view: no (B, T-1, V) copy
    return logps * mask, mask


def scatter_response_logps(kept_logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, T-1) from those of the response positions only.

    kept_logps: (N,), the log-probs of the N labelled next tokens in row-major order (what a model
    run with logits_to_keep = the labelled positions gives); labels: (B, T). Returns (logps, mask)
    exactly as token_logps would, 0 off the mask.
    """
    mask = labels[:, 1:] != IGNORE
    logps = torch.zeros(mask.shape, dtype=kept_logps.dtype, device=kept_logps.device)
    return logps.masked_scatter(mask, kept_logps), mask


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


# -------------------------------------------------------------------------------------------- PPO
# Shapes: B rollouts, T token positions (aligned with token_logps: position t scores token t+1).
# `mask` is True on response tokens only; prompt and padding positions never contribute.


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, T) over positions where mask (B, T) is True; a scalar."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor | None = None,
                  var: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked positions, (B, T) -> (B, T); 0 where masked out.

    Pass `mean` and `var` to whiten with statistics gathered elsewhere (over all processes).
    """
    if mean is None:
        mean = masked_mean(values, mask)
    if var is None:
        var = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref: unbiased, can be negative (Schulman 2020)."""
    return log_ratio


def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref / pi: unbiased and never negative (Schulman 2020)."""
    return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = exp(-log_ratio)


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}  # `KLConfig.estimator` allows exactly these names


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, (B, T) -> (B, T).

    ("Approximating KL divergence", Schulman 2020; the estimators are KL_ESTIMATORS.)
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logps - ref_logps)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward: -kl_coef * KL_t on every response token, plus the score on the last one.

    scores: (B,); kl, mask: (B, T). Returns (B, T), 0 outside the response
    (Ziegler et al. 2019, Eq. 2; InstructGPT Eq. 2 without the pretraining term).
    """
    rewards = -kl_coef * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
    has_response = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_response]
    rewards[rows, last[has_response]] += scores[has_response].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, Eq. 16).

    rewards, values, mask: (B, T), the response a contiguous run of True in each row. After the
    last response token the episode ends (the next value is 0).
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t = delta_t + gamma * lam * A_{t+1}
    Returns (advantages, returns = advantages + values), each (B, T), 0 outside the response.
    """
    mask_f = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask_f[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage  # GAE Eq. 16
        advantages[:, t] = advantage * m
        # Outside the response the recursion restarts, so a prompt or pad position passes nothing on.
        next_value = values[:, t] * m
        next_advantage = advantage * m
    return advantages, (advantages + values) * mask_f


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, (B, T, V) -> (B, T)."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return log_z - (probs * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over response tokens: how much of the return the critic predicts."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1.0 - var_residual / var_returns.clamp(min=1e-8))
