"""What a stage cost: wall-clock and CPU time, tokens, forward passes and FLOPs per model, peak memory.

`CostMeter.watch(model, name)` hooks a model's forward, so no training loop needs to count by hand:
every call adds one forward pass and the tokens it saw (attended positions; new positions only
when a KV cache is passed), and their model FLOPs by the usual rule (Kaplan et al. 2020): 2N per
token for a forward pass without gradients, 6N for one whose backward follows (gradients on, the
model has trainable parameters), N the model's parameters; attention's own FLOPs are left out. The
totals are summed over processes and written to `cost.json`, which the comparison reads to put a
price beside each method. CPU time (process time over every process) and FLOPs measure the work
done; wall time on a shared machine also measures the neighbours.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from pipeline.launch import Dist, all_reduce_sum, gather_objects


class CostMeter:
    def __init__(self, dist: Dist):
        self.dist = dist
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.forward_passes: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.flops: Counter[str] = Counter()

    def watch(self, model: torch.nn.Module, name: str) -> torch.nn.Module:
        parameters = sum(p.numel() for p in model.parameters())  # a sharded DTensor counts its whole shape

        def count(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                return
            self.forward_passes[name] += 1
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            # A decoding step (its cache already holds the context) computes every row, finished ones too.
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            cached = cache is not None and cache.get_seq_length() > 0
            if cached or mask is None:
                tokens = input_ids.numel()
            elif mask.dim() == 4:  # (B, 1, T, T), prefix sharing's: a real token attends to itself
                diagonal = mask.diagonal(dim1=-2, dim2=-1)
                tokens = int(diagonal.sum() if diagonal.dtype == torch.bool else (diagonal == 0).sum())
            else:
                tokens = int(mask.sum())
            self.tokens[name] += tokens
            trains = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
            self.flops[name] += (6 if trains else 2) * parameters * tokens

        model.register_forward_pre_hook(count, with_kwargs=True)
        return model

    def summary(self) -> dict:
        """Totals over every process (call on all ranks); memory is the largest of any process."""
        names = sorted(set(self.forward_passes) | set(self.tokens))
        counts = all_reduce_sum(
            self.dist,
            torch.tensor(
                [[float(self.forward_passes[n]), float(self.tokens[n]), float(self.flops[n])] for n in names]
                or [[0.0, 0.0, 0.0]],
                dtype=torch.float64,  # FLOPs pass 2**24 at once; float32 would round them
            ),
        )
        cpu_s = float(
            all_reduce_sum(self.dist, torch.tensor([time.process_time() - self.cpu_start], dtype=torch.float64))
        )
        peak_rss = max(gather_objects(self.dist, _peak_rss_mb()))
        out = {
            "wall_s": round(time.perf_counter() - self.start, 2),
            "cpu_s": round(cpu_s, 2),
            "processes": self.dist.world_size,
            "peak_rss_mb": round(peak_rss, 1),
            "forward_passes": {n: int(c[0]) for n, c in zip(names, counts.tolist())},
            "tokens": {n: int(c[1]) for n, c in zip(names, counts.tolist())},
            "flops": {n: c[2] for n, c in zip(names, counts.tolist())},
        }
        if torch.cuda.is_available() and self.dist.device.type == "cuda":
            out["peak_gpu_mb"] = round(max(gather_objects(self.dist, torch.cuda.max_memory_allocated() / 2**20)), 1)
        return out

    def write(self, run_root: Path) -> dict:
        summary = self.summary()
        if self.dist.is_main:
            run_root.mkdir(parents=True, exist_ok=True)
            (run_root / "cost.json").write_text(json.dumps(summary, indent=2))
        return summary


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
