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
