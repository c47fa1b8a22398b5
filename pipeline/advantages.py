"""From per-token rewards and values to advantages: KL estimators, GAE, whitening (PPO's step 3).

Shapes: B rollouts, T token positions (aligned with token_logps: position t scores token t+1).
`mask` is True on response tokens only; prompt and padding positions never contribute.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values (B, T) over positions where mask (B, T) is True; a scalar."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    shift_mean: bool = True,
) -> torch.Tensor:
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


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over response tokens: how much of the return the critic predicts."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1.0 - var_residual / var_returns.clamp(min=1e-8))


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, algo
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ppo.advantage: gae` with the config's gamma and lambda."""
    return gae(rewards, values, mask, algo.gamma, algo.lam)


def rloo(sequence_rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages of k samples of each prompt, (G, k) -> (G, k), k >= 2:

        A_i = R_i - 1/(k-1) * sum_{j != i} R_j

    each sample's baseline the mean reward of the prompt's other samples (Kool et al. 2019;
    Ahmadian et al. 2024, Eq. 7), unbiased because it does not depend on the sample itself.
    """
    k = sequence_rewards.shape[1]
    others = (sequence_rewards.sum(dim=1, keepdim=True) - sequence_rewards) / (k - 1)
    return sequence_rewards - others


def grpo(sequence_rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of k samples of each prompt, (G, k) -> (G, k), k >= 2:

        A_i = (R_i - mean(R)) / (std(R) + eps)

    over the prompt's group (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2, outcome supervision; the
    sample standard deviation, as TRL's GRPOTrainer). A group of equal rewards gets advantage 0.
    """
    mean = sequence_rewards.mean(dim=1, keepdim=True)
    std = sequence_rewards.std(dim=1, keepdim=True)
    return (sequence_rewards - mean) / (std + eps)


def _group_advantages(estimator):
    """A critic-free estimator as ADVANTAGE_ESTIMATORS wants it: each rollout's reward is the sum of
    its token rewards (the score minus the KL penalty, so the KL coefficient means what it means for
    GAE), rollouts come in consecutive groups of `algo.samples_per_prompt`, and every response
    token of a rollout gets its advantage. The returns are the advantages: there is no value model."""

    def advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, algo):
        k = algo.samples_per_prompt
        totals = (rewards * mask).sum(-1)  # (B,)
        if totals.shape[0] % k:
            raise ValueError(f"{totals.shape[0]} rollouts are not groups of {k} samples per prompt")
        per_rollout = estimator(totals.view(-1, k)).reshape(-1)  # (B,)
        advantages = per_rollout[:, None] * mask.to(rewards.dtype)
        return advantages, advantages

    return advantages


# ppo.advantage -> (rewards, values, mask, PPOAlgoConfig) -> (advantages, returns), each (B, T).
# `PPOAlgoConfig.advantage` allows exactly these names (a test keeps the two the same).
ADVANTAGE_ESTIMATORS = {"gae": gae_advantages, "rloo": _group_advantages(rloo), "grpo": _group_advantages(grpo)}
CRITIC_FREE = ("rloo", "grpo")  # the estimators that need no value model
