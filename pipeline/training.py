"""Small helpers every training stage shares: optimizer, schedule, batch plan, seeding, progress.

No trainer class: a stage's `run` calls these and keeps its loop in view.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.config import GROUP_BATCHES, OptimConfig, TrainConfig
from pipeline.console import console  # the progress bars draw on it
from pipeline.errors import DataError, RunFailed
from pipeline.launch import Dist


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global random state a step draws from (dropout, shuffles), for an exact resume."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_as_python_random_state(state["python"]))


def _as_python_random_state(state) -> tuple:
    """`random.getstate()` after a round trip through torch.save (lists may come back as tuples)."""
    version, internal, gauss = state
    return int(version), tuple(int(x) for x in internal), gauss


# ----------------------------------------------------------------------------- optimizer, schedule


def checkpoint_activations(model, enabled: bool):
    """Gradient checkpointing on a Hugging Face model (or the one a ScalarHead wraps), if enabled.

    Non-reentrant, the variant that works under FSDP2 and with inputs that need no gradient.
    """
    if enabled:
        hf_model = model if hasattr(model, "gradient_checkpointing_enable") else model.model
        if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases and norm gains do not (the usual GPT/Llama practice)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # One fused kernel over all parameters, as the HF Trainer's default (adamw_torch_fused) under TRL:
    # the for-loop default is a few element-wise passes per tensor, 3x the step's time on a CPU.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)


def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    return max(optim.min_warmup_steps, math.ceil(optim.warmup_ratio * total_steps))


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to min_lr_ratio.

    Llama 2: "cosine learning rate schedule, with warmup of 2000 steps, and decay final learning
    rate down to 10% of the peak learning rate".
    """
    warmup = warmup_steps(optim, total_steps)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    progress = (step - warmup) / max(1, total_steps - warmup - 1)
    progress = min(1.0, progress)
    if optim.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return optim.lr * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------ batch plan


@dataclass(frozen=True)
class BatchPlan:
    """Which examples every process sees at every optimizer step, from the step number alone.

    The global batch of step s is a slice of a seeded per-epoch permutation; process r takes its
    contiguous share and cuts it into micro-batches. Because it depends only on (seed, step), a run
    resumes exactly where it stopped, and N processes see the same global batches as one.
    """

    n_examples: int
    batch_size: int
    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    seed: int
    # Token length of each example: micro-batches are cut from length-sorted shares, and with
    # train.group_by_length whole batches are formed from examples of similar length.
    lengths: tuple[int, ...] | None = None
    group_by_length: bool = False
    # The current epoch's order, computed once per epoch rather than at every step.
    _orders: dict[int, list[int]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        n_examples: int,
        train: TrainConfig,
        world_size: int,
        lengths: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> BatchPlan:
        """`batch_size` stands for train.batch_size, in one micro-batch per step (PPO's prompts per rollout)."""
        if batch_size is not None:
            train = dataclasses.replace(train, batch_size=batch_size, micro_batch_size=batch_size)
        micro, accumulation = train.accumulation_steps(world_size)
        steps_per_epoch = n_examples // train.batch_size
        if steps_per_epoch == 0:
            raise DataError(
                f"{n_examples} training examples make no full batch of train.batch_size={train.batch_size}; "
                "lower train.batch_size or give the stage more data"
            )
        total = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch))
        if lengths is not None and len(lengths) != n_examples:
            raise ValueError(f"{len(lengths)} lengths for {n_examples} examples")
        return cls(
            n_examples,
            train.batch_size,
            micro,
            accumulation,
            steps_per_epoch,
            total,
            train.seed,
            tuple(lengths) if lengths is not None else None,
            train.group_by_length and lengths is not None,
        )

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders.clear()
            self._orders[epoch] = self._order(epoch)
        return self._orders[epoch]

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n_examples, generator=generator).tolist()
        if not self.group_by_length:
            return order
        # Megabatches of GROUP_BATCHES random batches are sorted by length and cut into batches,
        # whose order is then shuffled: batches are homogeneous, the epoch is still random.
        span = self.batch_size * GROUP_BATCHES
        batches = []
        for start in range(0, len(order), span):
            mega = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [i for b in batches if len(b) < self.batch_size for i in b]
        shuffled = torch.randperm(len(full), generator=generator).tolist()
        return [i for k in shuffled for i in full[k]] + rest

    def micro_batches(self, step: int, dist: Dist) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._permutation(epoch)
        global_batch = order[index * self.batch_size : (index + 1) * self.batch_size]
        share = len(global_batch) // dist.world_size
        mine = global_batch[dist.rank * share : (dist.rank + 1) * share]
        if self.lengths is not None and self.accumulation > 1:
            # The step's gradient is the same sum in any order; similar lengths pad less.
            mine = sorted(mine, key=lambda i: -self.lengths[i])
        return [mine[i : i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -------------------------------------------------------------------------------------- progress


class StepProgress:
    """A rich progress bar on rank 0 showing the latest metrics; silent on other ranks."""

    def __init__(self, dist: Dist, total: int, start: int, description: str):
        self.enabled = dist.is_main
        self.progress = Progress(
            TextColumn(f"[bold]{description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.enabled,
        )
        self.task = self.progress.add_task(description, total=total, completed=start, metrics="")

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self.progress.update(self.task, completed=step, metrics=text)


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"


class Throughput:
    """Tokens per second between two calls to `rate`."""

    def __init__(self):
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.tokens, self.start = 0, time.perf_counter()
        return rate


# ------------------------------------------------------------------------------- one optimizer step


def count_over_ranks(dist: Dist, local: float) -> torch.Tensor:
    """A count summed over every process (the normaliser of a token- or pair-level mean)."""
    from pipeline.launch import all_reduce_sum

    return all_reduce_sum(dist, torch.tensor(float(local))).to(dist.device)


def backward_global_mean(loss_sum: torch.Tensor, global_count: torch.Tensor, dist: Dist) -> None:
    """Backward of this micro-batch's share of a mean over the whole step, on every process.

    `loss_sum` sums per-token (or per-pair) losses of this micro-batch; `global_count` counts the
    tokens (or pairs) of the whole optimizer step over all processes. FSDP2 averages gradients over
    ranks; scaling by the world size makes that a sum, so the step's gradient is the gradient of one
    mean over every token of the global batch, however the batch is split across processes and
    micro-batches (the loss curve of N processes is that of one).
    """
    (loss_sum * dist.world_size / global_count).backward()


class Sums:
    """Named running sums of a step's statistics, summed over processes in one all-reduce."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}

    def add(self, **values) -> None:
        for name, value in values.items():
            value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
            self.values[name] = self.values[name] + value if name in self.values else value

    def over_ranks(self, dist: Dist) -> dict[str, float]:
        from pipeline.launch import all_reduce_sum

        names = list(self.values)
        totals = all_reduce_sum(dist, torch.stack([self.values[n] for n in names])).tolist() if names else []
        return dict(zip(names, totals))


def sync_on_last(model, dist: Dist, index: int, n_micro_batches: int) -> None:
    """Reduce-scatter gradients once per step, on the last micro-batch, not on every one."""
    if dist.sharded:
        model.set_requires_gradient_sync(index == n_micro_batches - 1)


def clip_and_step(model, optimizer: torch.optim.Optimizer, max_grad_norm: float, step: int) -> float:
    """Clip the gradient norm, step, clear; returns the norm before clipping.

    A non-finite norm (a NaN or infinite loss somewhere in the step) stops the run before the
    update, so no NaN ever reaches the weights, a checkpoint or the next stage. The norm is global
    under FSDP2, so every process stops at the same step.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    norm = float(norm)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise diverged(step, "gradient norm", norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def ensure_finite(step: int, **values: float) -> None:
    """Stop the run at `step` if a logged value (a loss, a score) is NaN or infinite."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise diverged(step, name, value)


def diverged(step: int, name: str, value: float) -> RunFailed:
    return RunFailed(
        f"step {step}: the {name} is {value}; the run stopped before this step's update and saved nothing "
        "from it (checkpoints saved earlier are kept; --resume continues from the newest). "
        "Lower optim.lr or check the data"
    )


def due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (eval, checkpoint) falls on `step`; the final step has its own."""
    return every > 0 and step % every == 0 and step != total
