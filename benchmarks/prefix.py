"""Pairs with the prompt computed once (`train.share_prompt`) against a row per side, at equal batches.

A DPO training step's policy work, forward and backward on the summed response log-probs, on pairs
shaped like multi-turn HH-RLHF (the prompt about two thirds of a side's tokens) and like the built-in
task (short prompts). Both layouts must give the same log-probs; the times are taken in rounds with
the two interleaved, and the ratio within each round.
"""

from __future__ import annotations

import statistics
import time

import torch

SHAPES = {  # (prompt tokens, response tokens of each side)
    "hh": (160, 80),
    "builtin": (24, 48),
}


def _pairs(batch: int, prompt_len: int, response_len: int, vocab: int, seed: int):
    from pipeline.data.tokenize import TokenizedExample, TokenizedPair

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(batch):
        prompt = torch.randint(2, vocab, (prompt_len,), generator=g).tolist()
        # each side's length within ±25% of response_len, so a batch pads like real data
        sides = [
            torch.randint(
                2, vocab, (int(response_len * (0.75 + 0.5 * torch.rand(1, generator=g).item())),), generator=g
            )
            for _ in range(2)
        ]
        pairs.append(
            TokenizedPair(
                TokenizedExample(prompt + sides[0].tolist(), prompt_len),
                TokenizedExample(prompt + sides[1].tolist(), prompt_len),
            )
        )
    return pairs


def prefix_sharing_speed(model_folder: str, shape: str, batch: int, rounds: int = 3, seed: int = 0) -> dict:
    """Seconds per policy step (forward and backward) both ways, and the largest log-prob difference."""
    from transformers import AutoModelForCausalLM

    from pipeline.prefix_sharing import collate_for, pair_logps

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).train(False)
    prompt_len, response_len = SHAPES[shape]
    pairs = _pairs(batch, prompt_len, response_len, model.config.vocab_size, seed)
    batches = {share: collate_for(pairs, model.config.pad_token_id, share) for share in (False, True)}

    def step(share: bool):
        model.zero_grad(set_to_none=True)
        chosen, rejected, _ = pair_logps(model, batches[share])
        (chosen - rejected).sum().backward()
        return torch.stack([chosen, rejected]).detach()

    logps = {share: step(share) for share in (False, True)}  # warm-up, and the numbers to compare
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        for share in (False, True) if round_ % 2 == 0 else (True, False):
            start = time.perf_counter()
            step(share)
            seconds[share].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(seconds[False], seconds[True])]
    row_tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    shared_tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) - p.chosen.prompt_length for p in pairs)
    return {
        "shape": shape,
        "batch": batch,
        "prompt_len": prompt_len,
        "response_len": response_len,
        "rounds": rounds,
        "tokens_saved": 1 - shared_tokens / row_tokens,
        "per_side_s": statistics.median(seconds[False]),
        "shared_s": statistics.median(seconds[True]),
        "speedup": statistics.median(ratios),
        "speedup_range": [min(ratios), max(ratios)],
        "max_logp_difference": float((logps[True] - logps[False]).abs().max()),
    }
