"""PPO rollouts: our KV-cache sampler against the model's own `generate`, at equal batch and length."""

from __future__ import annotations

import statistics
import time

import torch


def _time_once(fn) -> tuple[float, object]:
    _synchronize()
    start = time.perf_counter()
    out = fn()
    _synchronize()
    return time.perf_counter() - start, out


def _synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


@torch.no_grad()
def rollout_speed(
    model_folder: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    rounds: int = 3,
    seed: int = 0,
    device_type: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """Greedy decoding of `new_tokens` tokens for `batch` prompts of `prompt_len` tokens, both ways.

    End-of-sequence is disabled on both sides so every row runs the full length; the greedy
    outputs must then be identical token for token. On a GPU both decode in the bench's dtype
    (the same autocast forward that PPO's rollouts use).
    """
    from transformers import AutoModelForCausalLM

    from pipeline.launch import compute_in
    from pipeline.models import DTYPES
    from pipeline.sampling import generate

    device = torch.device(device_type)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).to(device).eval()
    model = compute_in(model, DTYPES[dtype], device)
    model.generation_config.eos_token_id = None
    pad_id = model.config.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, model.config.vocab_size, (batch, prompt_len), generator=generator).to(device)

    def ours():
        out = generate(model, prompts.tolist(), eos_id=-1, pad_id=pad_id, max_new_tokens=new_tokens, temperature=0.0)
        return torch.tensor(out.sequences, device=device)

    def theirs():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_id,
        )
        return out[:, prompt_len:]

    ours(), theirs()  # warm-up
    # Rounds, ours and theirs within each, in alternating order: a neighbour's load that comes and
    # goes hits both sides of a round alike, so the ratio is taken within the round.
    ours_s, theirs_s = [], []
    for round_ in range(rounds):
        for side in (ours, theirs) if round_ % 2 == 0 else (theirs, ours):
            seconds, out = _time_once(side)
            if side is ours:
                ours_s.append(seconds)
                ours_out = out
            else:
                theirs_s.append(seconds)
                theirs_out = out
    tokens = batch * new_tokens
    ratios = [t / o for o, t in zip(ours_s, theirs_s)]
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "ours_tokens_per_s": tokens / statistics.median(ours_s),
        "ours_tokens_per_s_range": [tokens / max(ours_s), tokens / min(ours_s)],
        "generate_tokens_per_s": tokens / statistics.median(theirs_s),
        "generate_tokens_per_s_range": [tokens / max(theirs_s), tokens / min(theirs_s)],
        "speedup": statistics.median(ratios),
        "speedup_range": [min(ratios), max(ratios)],
        "same_greedy_outputs": bool(torch.equal(ours_out, theirs_out)),
    }
