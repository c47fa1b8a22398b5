"""Padding-free SFT batches (`train.packing`): several sequences in one row, each attending only to itself.

A micro-batch's sequences are packed first-fit, longest first, into rows as wide as its longest
sequence, so no row is wider than the padded batch's and there are never more rows. Position ids
restart at each sequence and a block-diagonal causal mask keeps the sequences apart, so every token
has the hidden state it has in a row of its own. A row of its own never predicts its first token,
so a packed sequence's first token gets no label either: the same loss, to float rounding, on fewer
rows. Models that take no mask of ours (flash or flex attention, ALiBi or sliding-window models) fall
back to padded rows, with a warning (pipeline/prefix_sharing.py decides which those are).

Shapes: R rows, W width (the micro-batch's longest sequence).
"""

from __future__ import annotations

import torch

from pipeline.data.tokenize import IGNORE, TokenizedExample
from pipeline.prefix_sharing import as_model_mask, masks_of_ours_in

PAD = -1  # a padding position's sequence index


def pack(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, position_ids, sequence (each position's index in `examples`, PAD on padding) and
    labels, each (R, W), for `examples` packed first-fit by decreasing length."""
    width = max(len(e.input_ids) for e in examples)
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for index in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids)):
        need = len(examples[index].input_ids)
        row = next((r for r, free in enumerate(room) if free >= need), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= need
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence = torch.full(shape, PAD, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for index in members:
            example = examples[index]
            n = len(example.input_ids)
            span = slice(start, start + n)
            input_ids[r, span] = torch.tensor(example.input_ids)
            position_ids[r, span] = torch.arange(n)
            sequence[r, span] = index
            labels[r, span] = torch.tensor(example.labels)
            labels[r, start] = IGNORE  # predicted by nothing in a row of its own
            start += n
    return {"input_ids": input_ids, "position_ids": position_ids, "sequence": sequence, "labels": labels}


def block_causal_mask(sequence: torch.Tensor, model) -> torch.Tensor:
    """(R, 1, W, W): a position sees the earlier positions of its own sequence. Padding sees only the
    row's first position (a row that sees nothing is NaN in SDPA). Boolean (True: attend) for SDPA,
    additive (0 or the dtype's minimum) for eager attention."""
    width = sequence.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence.device).tril()
    query, key = sequence.unsqueeze(2), sequence.unsqueeze(1)  # (R, W, 1), (R, 1, W)
    allowed = causal & (query == key) & (key != PAD)
    allowed[:, :, 0] |= sequence == PAD
    return as_model_mask(allowed.unsqueeze(1), model)


def packing_in(model, asked: bool, dist) -> bool:
    """`train.packing` as this model can do it: a model that takes no mask of ours trains on padded
    rows instead, the same numbers more slowly, with a warning saying so."""
    return masks_of_ours_in(model, asked, "train.packing", "padded rows", dist)
