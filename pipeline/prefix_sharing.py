"""A preference pair as one row, [prompt, chosen, rejected], so that the prompt is computed once.

The rejected response sits after the chosen one but must not see it: its tokens attend to the
prompt and to the rejected tokens before them, and their position ids restart after the prompt, so
each side's hidden states are the ones it has in a row of its own. The first token of either
response is predicted by the prompt's last position. On pairs whose prompt is most of the tokens
(multi-turn HH-RLHF: about two thirds) this is about a third less computation than a row per side.

Shapes: B pairs, T = the longest prompt + chosen + rejected, V vocabulary.
"""

from __future__ import annotations

import torch

from pipeline.console import console, plain
from pipeline.data.tokenize import IGNORE, TokenizedPair, collate_pairs
from pipeline.logprobs import logits_at, response_token_logps, selected_logps, tempered
from pipeline.models import attends_to_every_earlier_position

PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2  # a position's segment
ATTENTION_WITH_MASKS = ("sdpa", "eager")  # take an arbitrary (B, 1, T, T) mask; flash and flex do not


# Families whose positions come from position_ids and whose masks come from transformers'
# masking_utils, which passes a 4D mask through as it is. ALiBi models (Bloom, MPT) build their
# biases from a 2D mask and would lose them.
FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral")


def shares_prefixes(model) -> bool:
    """Whether the model takes a mask of our making: a family that reads it as it is, every layer full
    attention (a 4D mask replaces a sliding window's own), SDPA or eager attention."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in FAMILIES
        and getattr(config, "_attn_implementation", None) in ATTENTION_WITH_MASKS
        and attends_to_every_earlier_position(model)
    )


def share_prompt_in(model, asked: bool, dist) -> bool:
    """`train.share_prompt` as this model can do it: with attention that takes no mask of ours
    (flash, flex), a row per side, the same numbers more slowly, and a warning saying so."""
    return masks_of_ours_in(model, asked, "train.share_prompt", "a row per side", dist)


def masks_of_ours_in(model, asked: bool, option: str, fallback: str, dist) -> bool:
    """Whether `option` (a layout that needs a (B, 1, T, T) mask of ours) runs: asked, and the model
    takes such a mask; asked but not taken, a warning naming the `fallback` layout it runs instead."""
    if asked and not shares_prefixes(model):
        if dist.is_main:
            config = getattr(model, "config", None)
            console.print(
                f"[yellow]warning:[/yellow] {option} needs a {'/'.join(FAMILIES)} model with "
                f"{' or '.join(ATTENTION_WITH_MASKS)} attention and no sliding window; this is "
                f"{plain(getattr(config, 'model_type', type(model).__name__))} with "
                f"{plain(getattr(config, '_attn_implementation', '?'))} attention: {fallback} instead (the same numbers)"
            )
        return False
    return asked


def collate_shared_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows [prompt, chosen response, rejected response], each (B, T):

    input_ids, position_ids (the rejected response's restart after the prompt), segments (PROMPT,
    CHOSEN, REJECTED or PAD), labels (the token at each position where its side trains on it, else
    IGNORE) and predictor (the position whose logits predict the token at each position: the one
    before, except for the rejected response's first token, whose is the prompt's last); margin (B,).
    """
    rows = []
    for pair in pairs:
        chosen, rejected = pair.chosen, pair.rejected
        prompt = chosen.prompt_length
        if rejected.prompt_length != prompt or chosen.input_ids[:prompt] != rejected.input_ids[:prompt]:
            raise ValueError("a pair's two sides begin with different prompt tokens: they cannot share one")
        c, r = len(chosen.input_ids) - prompt, len(rejected.input_ids) - prompt
        rejected_labels = rejected.labels[prompt:]
        if prompt == 0 and r:  # no prompt position to predict its first token from, as in a row of its own
            rejected_labels[0] = IGNORE
        rows.append(
            (
                chosen.input_ids + rejected.input_ids[prompt:],
                list(range(prompt + c)) + list(range(prompt, prompt + r)),
                [PROMPT] * prompt + [CHOSEN] * c + [REJECTED] * r,
                chosen.labels + rejected_labels,
                [max(j - 1, 0) for j in range(prompt + c)]
                + [max(prompt - 1, 0)] * min(r, 1)
                + list(range(prompt + c, prompt + c + r - 1)),
            )
        )
    width = max(len(ids) for ids, *_ in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "segments": torch.full((len(rows), width), PAD, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
        "predictor": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for row, values in enumerate(rows):
        n = len(values[0])
        for key, value in zip(("input_ids", "position_ids", "segments", "labels", "predictor"), values):
            batch[key][row, :n] = torch.tensor(value, dtype=torch.long)
    batch["labels"][:, 0] = IGNORE  # nothing predicts the first token
    batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return batch


def attention_mask(segments: torch.Tensor, model) -> torch.Tensor:
    """(B, 1, T, T): a query position sees the earlier positions of the prompt and of its own side.

    Every real position sees itself; padding sees only the row's first position (a row that sees
    nothing is NaN in SDPA), so the diagonal counts the real tokens (pipeline/cost.py reads it).
    Boolean (True: attend) for SDPA; additive (0 or the dtype's minimum) for eager attention, which
    adds the mask to its scores.
    """
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)  # (B, T, 1), (B, 1, T)
    allowed = causal & (key != PAD) & (query != PAD) & ((key == PROMPT) | (key == query))
    allowed[:, :, 0] |= segments == PAD
    return as_model_mask(allowed.unsqueeze(1), model)


def as_model_mask(allowed: torch.Tensor, model) -> torch.Tensor:
    """A boolean (B, 1, T, T) mask (True: attend) as the model's attention takes it: as it is for
    SDPA; additive (0 or the dtype's minimum) for eager attention, which adds it to its scores."""
    if model.config._attn_implementation == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def shared_pair_logps(
    model, batch: dict[str, torch.Tensor], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-prob, rejected log-prob, chosen length, rejected length), each (B,): log π(y|x)
    summed over each side's trained tokens, from one forward over collate_shared_pairs' rows.

    The LM head runs only on positions that predict a trained token (the prompt's last once for
    both sides) where the model takes a boolean `logits_to_keep`; otherwise on every position.
    """
    labels, segments, predictor = batch["labels"], batch["segments"], batch["predictor"]
    rows, positions = (labels != IGNORE).nonzero(as_tuple=True)  # every trained token, row-major
    targets = labels[rows, positions]
    sources = predictor[rows, positions]
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": attention_mask(segments, model),
        "position_ids": batch["position_ids"],
    }
    _, logits, sources = logits_at(model, inputs, rows * labels.shape[1] + sources)
    logits = tempered(logits, temperature)
    token_logps = selected_logps(logits, targets, rows=sources)  # (M,)
    chosen = segments[rows, positions] == CHOSEN
    pairs = labels.shape[0]
    sums = torch.zeros((2, pairs), dtype=token_logps.dtype, device=token_logps.device)
    sums[0].index_add_(0, rows[chosen], token_logps[chosen])
    sums[1].index_add_(0, rows[~chosen], token_logps[~chosen])
    lengths = torch.bincount(rows[chosen], minlength=pairs), torch.bincount(rows[~chosen], minlength=pairs)
    return sums[0], sums[1], *lengths


def shared_pair_scores(head, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen reward, rejected reward), each (B,): a ScalarHead's score at each side's last token,
    from one forward over collate_shared_pairs' rows. A side with no response token is read at the
    prompt's last, the last position a row of its own would attend."""
    segments = batch["segments"]
    scores = head(batch["input_ids"], attention_mask(segments, head), position_ids=batch["position_ids"])  # (B, T)
    prompt, chosen, rejected = ((segments == kind).sum(-1) for kind in (PROMPT, CHOSEN, REJECTED))
    # clamped: with no prompt token either, position 0, as last_scores reads an empty row
    chosen_last = prompt + chosen - 1
    rejected_last = torch.where(rejected > 0, prompt + chosen + rejected - 1, prompt - 1)
    picked = scores.gather(1, torch.stack([chosen_last, rejected_last], dim=1).clamp(min=0))  # (B, 2)
    return picked[:, 0], picked[:, 1]


def collate_for(pairs: list[TokenizedPair], pad_id: int, share_prompt: bool) -> dict[str, torch.Tensor]:
    """A batch of pairs: one shared row per pair, or chosen rows then rejected rows (2B, T)."""
    return collate_shared_pairs(pairs, pad_id) if share_prompt else collate_pairs(pairs, pad_id)


def pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen log-prob, rejected log-prob, chosen length), each (B,), from either layout of `collate_for`."""
    if "segments" in batch:
        chosen, rejected, chosen_lengths, _ = shared_pair_logps(model, batch)
        return chosen, rejected, chosen_lengths
    token_logps, mask = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps, lengths = token_logps.sum(-1), mask.sum(-1)  # (2B,): log pi(y|x) over the response only
    half = logps.shape[0] // 2
    return logps[:half], logps[half:], lengths[:half]
