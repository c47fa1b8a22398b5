"""From recorded optimizer-step times to the numbers in the table."""

from __future__ import annotations

import statistics


def steady_throughput(step_times: list[float], examples_per_step: int, warmup: int, window: int) -> float:
    """Median examples/s over windows of `window` steps, the first `warmup` steps left out.

    step_times are the wall-clock times at which each optimizer step ended; the interval before
    step i is its duration, so the first step (data preparation, warm-up allocations) never
    counts.
    """
    return steady_rate(step_times, [examples_per_step] * len(step_times), warmup, window)


def steady_rate(step_times: list[float], per_step: list[float], warmup: int, window: int) -> float:
    """`steady_throughput` of any amount: per_step[i] is what the step ending at step_times[i] did."""
    durations = [b - a for a, b in zip(step_times, step_times[1:])][warmup:]
    amounts = per_step[1:][warmup:]
    if len(durations) < window:
        raise ValueError(
            f"{len(step_times)} steps leave fewer than one window of {window} after {warmup} warm-up steps"
        )
    rates = [
        sum(amounts[start : start + window]) / sum(durations[start : start + window])
        for start in range(0, len(durations) - window + 1, window)
    ]
    return statistics.median(rates)


def summarize(
    result: dict, peak_gflops: float, flops_per_token: float, tokens_per_example: float, warmup: int, window: int
) -> dict:
    spec = result["spec"]
    examples_per_s = steady_throughput(result["step_times"], spec["batch_size"], warmup, window)
    # Our stages count the tokens their timed steps batch; TRL's rate is its examples/s times the
    # rows' mean tokens per example, which holds for random batches but not length-grouped ones.
    counted = result.get("step_tokens")
    if counted:
        tokens_per_s = steady_rate(result["step_times"], counted, warmup, window)
    else:
        tokens_per_s = examples_per_s * tokens_per_example
    return {
        "framework": spec["framework"],
        "stage": spec["stage"],
        "size": spec["size"],
        "batch_size": spec["batch_size"],
        "steps": len(result["step_times"]),
        "examples_per_s": examples_per_s,
        "tokens_per_s": tokens_per_s,
        "tokens_counted": bool(counted),
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_gpu_mb": result.get("peak_gpu_mb"),
        "time_to_first_step_s": result["step_times"][0] - result["process_start"],
        "mfu": tokens_per_s * flops_per_token / (peak_gflops * 1e9),
        "matmul_peak_gflops": peak_gflops,
    }
