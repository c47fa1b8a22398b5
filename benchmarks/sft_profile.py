"""`python -m benchmarks.sft_profile`: where an SFT training step spends its time, padded and packed.

On the bench's 25M GPT-2 shape (d 512, 8 layers, 4,096-token vocabulary, random weights, fp32),
micro-batches of 8 sequences whose lengths follow the bench's SFT rows (prompt and response word
counts uniform in benchmarks/fixtures.py's ranges, about 2.2 tokens a word), loss on the response,
fused AdamW: tokens/s of padded rows, of `train.packing` with every sequence in one bucket, with
buckets by length, and as it runs (a call per sequence where copying into buckets costs more);
then, for the packed step, the torch profiler's operator table, the share of the step in weight
matmuls and the rate they run at, against this machine's matmul peak. Each rate is the best of three passes over the same batches.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.fixtures import PROMPT_WORDS, RESPONSE_WORDS
from benchmarks.hardware import matmul_peak_gflops

SHAPE = {"n_embd": 512, "n_layer": 8, "n_head": 8, "vocab_size": 4096, "n_positions": 1024}
TOKENS_PER_WORD = 2.2


def main(argv: list[str] | None = None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.data.tokenize import TokenizedExample, collate
    from pipeline.logprobs import response_token_logps
    from pipeline.packing import CALL_COST, COPY_COST, pack, packed_forward

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0, help="the model's width as a fraction of 25M's")
    parser.add_argument("--rows", type=int, default=15, help="operators in the profile table")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    shape = {**SHAPE, "n_embd": max(8 * round(SHAPE["n_embd"] * args.scale / 8), 8)}
    model = GPT2LMHeadModel(
        GPT2Config(
            **shape,
            activation_function="gelu_pytorch_tanh",
            attn_implementation="sdpa",
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    rng = random.Random(0)

    def example() -> TokenizedExample:
        prompt = round(TOKENS_PER_WORD * rng.randint(*PROMPT_WORDS))
        response = round(TOKENS_PER_WORD * rng.randint(*RESPONSE_WORDS)) + 1  # and EOS
        return TokenizedExample([rng.randrange(2, shape["vocab_size"]) for _ in range(prompt + response)], prompt)

    batches = [[example() for _ in range(args.batch)] for _ in range(args.steps)]
    tokens = sum(len(e.input_ids) for b in batches for e in b)

    def step(examples, costs):
        if costs is None:
            batch = collate(examples, pad_id=0)
            logps, _ = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            (-logps.sum()).backward()
        else:
            batch = pack(examples, pad_id=0)
            with packed_forward(model, batch, *costs) as layout:
                logps, _ = response_token_logps(model, batch["input_ids"], None, batch["labels"], forward_kwargs=layout)
                (-logps.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()

    def rate(costs) -> float:
        step(batches[0], costs)  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for examples in batches:
                step(examples, costs)
            best = min(best, time.perf_counter() - start)
        return tokens / best

    print(
        f"{args.steps} steps of {args.batch} sequences, {tokens} tokens, d {shape['n_embd']}, {torch.get_num_threads()} threads"
    )
    as_it_runs = (CALL_COST, COPY_COST)
    layouts = {"padded": None, "packed, one bucket": (1e18, 0), "packed, buckets": (CALL_COST, 0), "packed": as_it_runs}
    for label, costs in layouts.items():
        print(f"{label:20s} {rate(costs):7.0f} tok/s")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for examples in batches:
            step(examples, as_it_runs)
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm"))
    # 6 FLOPs a parameter and token, the LM head's on the positions that predict a response token only.
    d, layers = shape["n_embd"], shape["n_layer"]
    predicting = sum(len(e.input_ids) - e.prompt_length for b in batches for e in b)
    flops = 6 * (tokens * layers * 12 * d * d + predicting * shape["vocab_size"] * d)
    peak = matmul_peak_gflops()
    print(
        f"packed, profiled: weight matmuls {matmul_us / total:.0%} of the step, at {flops / matmul_us / 1e3:.0f} "
        f"GFLOP/s against a measured peak of {peak:.0f}"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
