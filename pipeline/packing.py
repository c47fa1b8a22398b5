"""Padding-free SFT batches (`train.packing`): a micro-batch's sequences end to end in one row.

Every weight matmul then runs on real tokens only. Position ids restart at each sequence. A row of
its own never predicts its first token, so a packed sequence's first token gets no label either:
the same loss, to float rounding, without a padded position.

Attention keeps the sequences apart without a (T, T) mask: inside each layer, `packed_attention`
runs causal SDPA over each sequence on its own. Where sequences are long enough, each is one call on
its slice of the row, nothing copied. Where many are short, a call each costs more than copying:
the row's queries, keys and values are scattered into buckets of sequences of similar length, one
padded slot per sequence, one call per bucket (padding sits after every real key, so causality
alone keeps it out, and the kernel skips the blocks above the diagonal), and the outputs gathered
back. A block-diagonal mask over the whole row would compute every pair of positions, other
sequences' included; one bucket for all would pad every sequence to the longest.

Packing takes the models that prefix sharing takes (pipeline/prefix_sharing.py: the families whose
attention goes through transformers' attention interface as written, SDPA or eager, no sliding
window); others (flash or flex attention, ALiBi or sliding-window models) train on padded rows
instead, with a warning. Eager models pack too: their packed attention is SDPA's, equal to eager's
to float rounding.

Shapes: N tokens in the row, S sequences, L the longest sequence, H heads, D head size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from pipeline.data.tokenize import IGNORE, TokenizedExample
from pipeline.prefix_sharing import masks_of_ours_in

ATTENTION = "rlhfdpo_packed"  # our attention function's name in transformers' AttentionInterface


def pack(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, position_ids, sequence (each position's index in `examples`) and labels, each
    (1, N): the examples end to end, in order. `pad_id` is unused (nothing is padded); the
    signature is `collate`'s."""
    input_ids, position_ids, sequence, labels = [], [], [], []
    for index, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids += example.input_ids
        position_ids += range(n)
        sequence += [index] * n
        labels += [IGNORE, *example.labels[1:]]  # the first token is predicted by nothing in a row of its own
    return {
        name: torch.tensor([values], dtype=torch.long)
        for name, values in (
            ("input_ids", input_ids),
            ("position_ids", position_ids),
            ("sequence", sequence),
            ("labels", labels),
        )
    }


# What one SDPA call costs beyond its work, in query-key pairs per head (about 45 microseconds
# forward and backward at 8 heads of 64 on a 2-core CPU, measured): the price of one more bucket.
CALL_COST = 1500
# What scattering a position into a bucket and gathering it back costs, forward and backward, in
# the same pairs (about 3 microseconds a position and layer at 8 heads of 64, measured at
# benchmarks/sft_profile.py's shapes): the price of bucketing at all, against a call per sequence.
COPY_COST = 60
MAX_CUTS = 64  # the most places a bucket may end: bounds the search for a micro-batch of many sequences


@dataclass(frozen=True)
class PackedLayout:
    """How `packed_attention` runs a packed row. lengths: each sequence's, in the row's order.
    buckets: (rows, width) of each SDPA call, a bucket holding `rows` sequences padded to `width`.
    slots: None where each sequence is a bucket of its own, attended where it lies in the row; else
    (N,), each position's index into the buckets laid end to end."""

    lengths: tuple[int, ...]
    buckets: tuple[tuple[int, int], ...]
    slots: torch.Tensor | None


def buckets_by_length(lengths: list[int], call_cost: float = CALL_COST) -> list[list[int]]:
    """The sequences' indices in buckets of similar length, shortest first: sorted by length, cut
    where one more SDPA call costs less than the padding it saves (each bucket computes
    rows x width^2 query-key pairs). Exact, by dynamic programming over the cut points; past
    MAX_CUTS sequences, over every (S / MAX_CUTS)-th of them."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    step = -(-len(order) // MAX_CUTS)
    ends = [*range(step, len(order), step), len(order)]  # where a bucket may end, in `order`
    best = {0: 0.0}  # best[j]: the cheapest buckets of the first j sequences
    cut = {}
    for j in ends:
        width = lengths[order[j - 1]]  # the longest of any bucket that ends at j
        best[j], cut[j] = min((best[i] + call_cost + (j - i) * width * width, i) for i in best)
    buckets, j = [], len(order)
    while j:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]


def layout_of(
    sequence: torch.Tensor, position_ids: torch.Tensor, call_cost: float = CALL_COST, copy_cost: float = COPY_COST
) -> PackedLayout:
    """`PackedLayout` of pack's row (1, N): a call per sequence where that costs no more than the
    cheapest buckets and their copies (`copy_cost` a position), else those buckets."""
    sequence, position_ids = sequence.view(-1), position_ids.view(-1)
    lengths = torch.bincount(sequence).tolist()
    buckets = buckets_by_length(lengths, call_cost)
    widths = [max(lengths[i] for i in bucket) for bucket in buckets]
    own_cost = sum(call_cost + n * n for n in lengths)
    bucketed_cost = sum(call_cost + len(b) * w * w for b, w in zip(buckets, widths)) + copy_cost * len(sequence)
    if own_cost <= bucketed_cost:
        return PackedLayout(tuple(lengths), tuple((1, n) for n in lengths), None)
    start_of = torch.zeros(len(lengths), dtype=torch.long)  # each sequence's first slot
    offset = 0
    for bucket, width in zip(buckets, widths):
        for row, index in enumerate(bucket):
            start_of[index] = offset + row * width
        offset += len(bucket) * width
    slots = start_of.to(sequence.device)[sequence] + position_ids
    return PackedLayout(tuple(lengths), tuple((len(b), w) for b, w in zip(buckets, widths)), slots)


def packed_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_layout=None, **kwargs
):
    """transformers' attention signature: query (1, H, N, D), key and value (1, H_kv, N, D) of one
    packed row; returns ((1, N, H, D), None). Each position attends to the earlier positions of its
    own sequence only. `packed_layout`: the row's `PackedLayout`, passed on by `packed_forward`."""
    if packed_layout is None or attention_mask is not None or kwargs.get("sliding_window") is not None:
        raise RuntimeError(f"{ATTENTION} attention runs packed rows only (pipeline.packing.packed_forward)")
    heads, size = query.shape[1], query.shape[3]
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves heads/h_kv queries
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)

    def attend(q, k, v):  # (rows, H, width, D) each -> (rows, width, H, D)
        # Padding sits after every real key of its row, so causality alone keeps it out.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling).transpose(1, 2)

    if packed_layout.slots is None:
        # split, not a slice per sequence: its backward is one concatenation, a slice's a zeroed row each.
        lengths = list(packed_layout.lengths)
        parts = zip(*(states.split(lengths, dim=2) for states in (query, key, value)))
        return torch.cat([attend(q, k, v) for q, k, v in parts], dim=1), None

    sizes = [rows * width for rows, width in packed_layout.buckets]

    def bucketed(states: torch.Tensor) -> torch.Tensor:  # (1, H, N, D) -> (slots, H, D), zero on padding
        flat = states[0].transpose(0, 1)  # (N, H, D)
        return flat.new_zeros(sum(sizes), heads, size).index_copy(0, packed_layout.slots, flat)

    parts = zip(*(bucketed(states).split(sizes) for states in (query, key, value)))
    outs = []
    for (rows, width), states in zip(packed_layout.buckets, parts):
        q, k, v = (part.view(rows, width, heads, size).transpose(1, 2) for part in states)
        outs.append(attend(q, k, v).reshape(rows * width, heads, size))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, packed_layout.slots).unsqueeze(0), None


AttentionInterface.register(ATTENTION, packed_attention)


@contextmanager
def packed_forward(model, batch: dict[str, torch.Tensor], call_cost: float = CALL_COST, copy_cost: float = COPY_COST):
    """Within it, `model` attends as `packed_attention` over `batch` (pack's, on the model's device);
    yields the keyword arguments the model's forward takes for that (position ids included).
    `call_cost`, `copy_cost`: `layout_of`'s."""
    layout = layout_of(batch["sequence"], batch["position_ids"], call_cost, copy_cost)
    config = model.config
    own = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield {"position_ids": batch["position_ids"], "packed_layout": layout}
    finally:
        config._attn_implementation = own


def packing_in(model, asked: bool, dist) -> bool:
    """`train.packing` as this model can do it: a model that takes no mask of ours trains on padded
    rows instead, the same numbers more slowly, with a warning saying so."""
    return masks_of_ours_in(model, asked, "train.packing", "padded rows", dist)
