"""Log-probabilities of tokens under a causal LM: what every stage's loss and KL are made of.

Shapes: B batch, T sequence length, V vocabulary. Labels are -100 (IGNORE) on positions without a
target (prompt and padding); position t's logits predict token t+1.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch

from pipeline.data.tokenize import IGNORE


def selected_logps(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits)[target] for each row of logits, or for each (rows[i], targets[i]).

    logits: (..., V); targets: logits.shape[:-1], or (M,) with rows (M,) indexing logits' first dim
    (a position whose logits predict more than one trained token, the prompt's last under
    prefix sharing, is read once per token without copying its row). Returns targets' shape.
    One fused log-softmax each way: autograd keeps its (..., V) output in place of the logits,
    about twice as fast as z_y - logsumexp(z), whose backward is four passes over (..., V).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    if rows is not None:  # index_select: its backward adds in order (indexing's adds atomically in threads)
        return log_probs.flatten().index_select(0, rows * log_probs.shape[-1] + targets)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


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


def response_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    forward_kwargs: dict | None = None,
    with_hidden: bool = False,
    groups=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logits (N, V), kept (B, T-1), hidden (B, T, H) or None): the logits of the N positions whose
    next token is labelled (position t predicts token t+1), in row-major order.

    The LM head runs on those positions only (not the prompt or padding) where the model takes a
    boolean `logits_to_keep` (transformers 5); elsewhere the full logits are computed and indexed.
    `forward_kwargs`: more arguments of the model's forward (packed rows' position ids and attention
    layout, pipeline/packing.py, whose rows take no attention mask).
    `with_hidden`: also the last hidden state of every position from the same forward.
    `groups` (pipeline/prompt_groups.py): the same numbers from one row per shared prompt.
    """
    if groups is not None:
        return groups.response_logits(model, labels, with_hidden)
    kept = labels[:, 1:] != IGNORE
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **(forward_kwargs or {})}
    if with_hidden:
        inputs["output_hidden_states"] = True
    if keeps_logit_positions(type(model)):
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = kept
        out = model(**inputs, logits_to_keep=keep)
        if out.logits.dim() == 2 and out.logits.shape[0] == int(kept.sum()):
            return out.logits, kept, out.hidden_states[-1] if with_hidden else None
    out = model(**inputs)
    return out.logits[:, :-1][kept], kept, out.hidden_states[-1] if with_hidden else None


def response_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    forward_kwargs: dict | None = None,
    with_hidden: bool = False,
    groups=None,
):
    """(logps, mask), each (B, T-1): the log-probability of every labelled next token, the same
    numbers as `token_logps` on full logits, with the LM head on the labelled positions only
    (`response_logits`). `temperature` scores under softmax(logits / T), the distribution a sampler
    at T draws from. `with_hidden`: (logps, mask, hidden), hidden (B, T, H) the last hidden state of
    every position from the same forward (PPO's shared value head reads it). `groups`: as in
    `response_logits`.
    """
    logits, kept, hidden = response_logits(
        model, input_ids, attention_mask, labels, forward_kwargs, with_hidden, groups
    )
    logps = selected_logps(tempered(logits, temperature), labels[:, 1:][kept])
    return *scatter_response_logps(logps, labels), *((hidden,) if with_hidden else ())


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32; at T = 1 the logits as they are (every reader takes them to float32)."""
    return logits if temperature == 1.0 else logits.float() / temperature


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, (B, T, V) -> (B, T)."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return log_z - (probs * logits).sum(-1)


def logits_at(model, inputs: dict, positions: torch.Tensor):
    """(output, logits (K, V), index (M,)): the model's forward on `inputs`, and the logits of the
    flat `positions` (M,) into its (B, T) input, position i's being logits[index[i]]. The LM head runs
    on those positions only where the model takes a boolean `logits_to_keep`; elsewhere on all."""
    shape = inputs["input_ids"].shape
    if keeps_logit_positions(type(model)):
        keep = torch.zeros(shape.numel(), dtype=torch.bool, device=positions.device)
        keep[positions] = True
        out = model(**inputs, logits_to_keep=keep.view(shape))
        if out.logits.dim() == 2 and out.logits.shape[0] == int(keep.sum()):
            return out, out.logits, keep.cumsum(0)[positions] - 1
    out = model(**inputs)  # a forward that takes the argument but keeps positions its own way, or none
    return out, out.logits.flatten(0, 1), positions


@cache
def keeps_logit_positions(model_class: type) -> bool:
    """Whether the model's forward can run its LM head on chosen positions only (`logits_to_keep`)."""
    from transformers import modeling_utils

    accepts = "logits_to_keep" in inspect.signature(model_class.forward).parameters
    return accepts and hasattr(modeling_utils, "slice_logits_to_keep")
