"""This machine's measured matrix-multiply peak (fp32 on CPU, bf16 on a GPU), and the model FLOPs a
training step needs."""

from __future__ import annotations

import time

import torch


def matmul_peak_gflops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 10, device: str = "cpu") -> float:
    """The best rate of timed n x n fp32 matmuls, in GFLOP/s, with torch's default thread count.

    On a GPU: the median rate of 8192^3 bf16 matmuls on random data (zeros run faster than any
    real input would), the ceiling that MFU is taken against.
    """
    if device == "cuda":
        return _cuda_bf16_matmul_gflops(8192, repeats)
    return max(_matmul_gflops(n, repeats) for n in sizes)


def _cuda_bf16_matmul_gflops(n: int, repeats: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def _matmul_gflops(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # warm-up: thread pool, caches, CPU frequency
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def training_flops_per_token(n_matmul_params: int, n_layer: int, n_embd: int, seq_len: float) -> float:
    """Model FLOPs of one token's forward and backward pass (PaLM, appendix B): 6N + 12 L d T.

    N counts the parameters that multiply activations (the blocks, and the tied embedding when it
    is the LM head); T is the sequence length the token attends over. Padding is never counted, so
    compute spent on padding lowers the utilization, as it should.
    """
    return 6 * n_matmul_params + 12 * n_layer * n_embd * seq_len


def matmul_params(model_folder: str, with_lm_head: bool) -> tuple[int, int, int]:
    """(N, n_layer, n_embd) of a saved GPT-2: block parameters, plus the LM head when it runs."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folder)
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    per_block = 12 * d * d + 13 * d  # attention 4d^2 + MLP 8d^2, with biases and layer norms
    head = vocab * d if with_lm_head else d
    return layers * per_block + head, layers, d
