"""`python -m benchmarks.sampler_profile`: where a decoding step of our sampler spends its time.

On the bench's 25M GPT-2 shape (d 512, 8 layers, 4,096-token vocabulary, random weights), greedy,
batch 32, 32-token prompts, 96 new tokens, end-of-sequence disabled, as `make bench`'s rollout
section: milliseconds per step of our sampler and of `generate`, the prompt's forward alone, a
floor (the step's weight matmuls alone, at the same shapes), and the torch profiler's operator
table over one of our generations. Times are the best of three after a warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPE = {"n_embd": 512, "n_layer": 8, "n_head": 8, "vocab_size": 4096, "n_positions": 1024}


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.sampling import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rows", type=int, default=15, help="operators in the profile table")
    args = parser.parse_args(argv)
    batch, steps = args.batch, args.new_tokens

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPE, pad_token_id=0)).eval()
    model.generation_config.eos_token_id = None
    prompts = torch.randint(2, SHAPE["vocab_size"], (batch, args.prompt_len))

    def ours():
        return generate(model, prompts.tolist(), eos_id=-1, pad_id=0, max_new_tokens=steps, temperature=0.0)

    def theirs():
        return model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            pad_token_id=0,
        )

    def prefill():
        return model(input_ids=prompts, attention_mask=torch.ones_like(prompts), use_cache=True, logits_to_keep=1)

    d, layers = SHAPE["n_embd"], SHAPE["n_layer"]
    hidden = torch.randn(batch, d)
    weights = [
        (torch.randn(d, 3 * d), torch.randn(d, d), torch.randn(d, 4 * d), torch.randn(4 * d, d)) for _ in range(layers)
    ]
    head = torch.randn(d, SHAPE["vocab_size"])

    def matmuls_only():  # one step's weight matmuls for the batch's one new token per row, no attention
        for _ in range(steps):
            for qkv, out, up, down in weights:
                hidden @ qkv, hidden @ out, (hidden @ up) @ down
            hidden @ head

    ours_s, theirs_s, prefill_s, floor_s = best_of(ours), best_of(theirs), best_of(prefill), best_of(matmuls_only)
    tokens = batch * steps
    print(
        f"{batch} rows x {steps} new tokens after {args.prompt_len}-token prompts, 25M GPT-2, {torch.get_num_threads()} threads"
    )
    print(f"ours      {tokens / ours_s:7.0f} tok/s  {1000 * ours_s / steps:6.1f} ms/step")
    print(
        f"generate  {tokens / theirs_s:7.0f} tok/s  {1000 * theirs_s / steps:6.1f} ms/step  (ours {theirs_s / ours_s:.2f}x)"
    )
    print(f"prompt forward {1000 * prefill_s:.0f} ms; weight matmuls alone {1000 * floor_s / steps:.1f} ms/step")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        ours()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
