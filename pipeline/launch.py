"""One process or many: re-launching under `accelerate launch`, FSDP2 sharding, rank-0 helpers.

A stage runs in the current process unless `launch.num_processes > 1` (or `launch.always_launch`);
then the same command line is started again under `accelerate launch` with the configured
Accelerate config file, and each child sees WORLD_SIZE in its environment. On several machines each
runs that command with its own `launch.machine_rank`; ranks, and with them `Dist.is_main`, are
global, so rank 0 of machine 0 alone logs and writes. Sharding is torch's own
FSDP2 (`fully_shard`) on every transformer block and then the root, so the same code path runs on
GPUs (NCCL) and on CPU (gloo): Accelerate's FSDP plugin would not shard on a machine without CUDA.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from pipeline.config import LaunchConfig
from pipeline.errors import ERROR_DIR_ENV, ConfigError
from pipeline.files import replace_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool = False  # under `accelerate launch`, in a process group even when world_size is 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2-wrapped, with collectives: several processes, or one launched on purpose."""
        return self.world_size > 1 or self.launched


# ------------------------------------------------------------------------------------ re-launching


DEFAULT_MAIN_PROCESS_PORT = 29500  # accelerate's, when launch.main_process_port is null

# What a rank's collective raises when another process of the job stopped (gloo, then NCCL): a
# consequence of the failure, never its cause.
LOST_PEER = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote process exited",
    "communicator was aborted",
)


def inside_launch() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def accelerate_config_path(launch: LaunchConfig) -> Path:
    if launch.accelerate_config:
        return Path(launch.accelerate_config)
    name = "fsdp.yaml" if torch.cuda.is_available() else "cpu.yaml"
    return PROJECT_ROOT / "configs" / "accelerate" / name


def launch_command(launch: LaunchConfig, cli_args: list[str]) -> list[str]:
    """The argument list (never a shell string) that re-runs this CLI under `accelerate launch`.

    Every machine key is passed, filled in from the environment or the accelerate config file where
    the config leaves it null (`LaunchConfig.on_machines`), so accelerate sees the layout we checked.
    """
    launch = launch.on_machines()
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config_path(launch)),
        "--num_processes",
        str(launch.num_processes),
        "--num_machines",
        str(launch.num_machines),
        "--machine_rank",
        str(launch.machine_rank),
    ]
    if launch.main_process_ip is not None:
        command += ["--main_process_ip", launch.main_process_ip]
    if launch.main_process_port is not None:
        command += ["--main_process_port", str(launch.main_process_port)]
    return command + ["-m", "pipeline.cli", *cli_args]


def relaunch(launch: LaunchConfig, cli_args: list[str]) -> tuple[int, str | None]:
    """Run the command under `accelerate launch`: (exit status, the first failing rank's message).

    Each rank that fails writes its one-line message (`report_failure`); the launcher's own output
    about the failure comes first, so the caller prints that message last, where it is seen. On
    several machines each machine's launcher knows only its own ranks' messages.
    """
    launch = launch.on_machines()
    per_machine = launch.num_processes // launch.num_machines
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and per_machine > gpus and os.environ.get("ACCELERATE_USE_CPU") != "True":
        if launch.num_machines == 1:
            raise ConfigError(
                f"launch.num_processes: {per_machine} processes need as many GPUs (one each), this machine "
                f"has {gpus}; on one GPU, launch.always_launch: true runs the sharded path in one process"
            )
        raise ConfigError(
            f"launch.num_processes: {launch.num_processes} processes on {launch.num_machines} machines are "
            f"{per_machine} per machine, one GPU each, and this machine has {gpus}"
        )
    if launch.num_machines > 1 and launch.machine_rank == 0:
        port = launch.main_process_port or DEFAULT_MAIN_PROCESS_PORT
        if _port_in_use(port):  # accelerate would stop on it too, with a traceback
            raise ConfigError(
                f"launch.main_process_port: {port} is in use on this machine (machine 0); pick a free one"
            )
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_machine)))
    with tempfile.TemporaryDirectory(prefix="rlhfdpo-errors-") as errors:
        env[ERROR_DIR_ENV] = errors
        code = subprocess.run(launch_command(launch, cli_args), env=env, check=False).returncode
        if code == 0:
            return 0, None
        return failure(Path(errors), code, launch.num_machines)


def failure(errors: Path, code: int, num_machines: int = 1) -> tuple[int, str | None]:
    """(exit status, the line that says why) from what this machine's ranks left in `errors`.

    A rank's own message comes first, the earliest; then a rank that started and said nothing,
    which was killed (out of memory, a signal) or crashed in native code while the others lost
    their connection to it; only then a lost connection, whose cause ran on another machine.
    """
    reports = [json.loads(p.read_text()) for p in errors.glob("rank-*.json")]
    started = {p.name.removeprefix("started-") for p in errors.glob("started-*")}
    silent = sorted(started - {r["rank"] for r in reports}, key=int)
    causes = [r for r in reports if not any(text in r["message"] for text in LOST_PEER)]
    if causes:
        first = min(causes, key=lambda r: r["time"])
        # Ranks that hit the same error (a bad config, an occupied folder) race to report it: name
        # the lowest of them, so the same failure always reads the same.
        rank = min((r["rank"] for r in causes if r["message"] == first["message"]), key=int)
        return first["code"], f"rank {rank}: {first['message']}"
    if silent:
        return code, (
            f"rank {silent[0]}: stopped without a message of its own: killed (out of memory? the launcher's "
            "report above names the signal) or crashed, and the other processes lost their connection to it"
        )
    if reports:
        first = min(reports, key=lambda r: r["time"])
        elsewhere = "; it ran on another machine, whose output says why" if num_machines > 1 else ""
        lost = first["message"].split(". This is typically")[0]  # gloo's advice to read the other logs
        message = f"rank {first['rank']}: lost its connection to a process that stopped first{elsewhere} ({lost})"
        return first["code"], message
    return code, None


def _port_in_use(port: int) -> bool:
    """Whether something listens on `port` here: accelerate's own test before machine 0 starts."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("localhost", port)) == 0


# ---------------------------------------------------------------------------------- process group


def init_distributed() -> Dist:
    """Join the process group if launched with several processes; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _mark_started()
    use_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "False") != "True"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    launched = inside_launch()
    if (world_size > 1 or launched) and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device, launched=launched)


def _mark_started() -> None:
    """Tell the launcher this rank is running, so that one that dies without a word can be named (`failure`)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if inside_launch() and folder and Path(folder).is_dir():
        (Path(folder) / f"started-{os.environ.get('RANK', os.environ['LOCAL_RANK'])}").touch()


def close_distributed() -> None:
    """Leave the process group once every rank is done with it.

    Objects left over from collectives (gathered shards, optimizer-state copies) are freed first,
    while the group they came from still exists: gloo work that outlives its group is destroyed
    during interpreter shutdown, where freeing its tensors can abort the process (SIGABRT,
    "terminate called without an active exception"; pytorch/pytorch#179291).
    """
    if torch_dist.is_initialized():
        gc.collect()
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def end_launched_process(code: int) -> None:
    """A launched rank whose work is done and written exits here, skipping interpreter shutdown.

    Nothing is left to finalise (the stage closed its files and its process group), and shutdown is
    where gloo's worker threads and Python's teardown can still collide; the launcher only needs
    the exit status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(dist: Dist) -> None:
    if dist.sharded:
        torch_dist.barrier()


def collective_device() -> torch.device:
    """Where a tensor must be for the process group's collectives: NCCL reduces CUDA tensors only."""
    if torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(dist: Dist, value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over all processes, on `value`'s device (a copy; `value` is left as it was)."""
    value = value.detach().clone()
    if dist.sharded:
        reduced = value.to(collective_device())
        torch_dist.all_reduce(reduced, op=torch_dist.ReduceOp.SUM)
        value = reduced.to(value.device)
    return value


def gather_objects(dist: Dist, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.sharded:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(dist: Dist, obj):
    """Rank 0's `obj` on every rank."""
    if not dist.sharded:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------ FSDP2


def shard(model: torch.nn.Module, dist: Dist, compute_dtype: str = "float32", whole: bool = False) -> torch.nn.Module:
    """The model on this rank's device, FSDP2-sharded when several processes (or a launched one) run.

    Sharding is full: each transformer block is one unit, then the root holds the rest; the blocks
    are found through `_no_split_modules`, the list Hugging Face models keep of the layer classes
    that must stay whole (GPT2Block, LlamaDecoderLayer, ...).

    `whole`: one unit and no blocks, for a small module of ours (PPO's shared value head).
    `compute_dtype` (the stage's `model.dtype`) is the precision of the forward passes; weights,
    gradients and optimizer state stay float32 (mixed precision). Sharded, FSDP2's policy gathers
    the weights in it; in one process, each forward runs under autocast (`compute_in`).
    """
    from pipeline.models import DTYPES

    dtype = DTYPES[compute_dtype]
    model.to(dist.device)
    if not dist.sharded:
        return compute_in(model, dtype, dist.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true") != "false"}
    if dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks and not whole:
        raise RuntimeError(f"{type(model).__name__} names no transformer block class to shard")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def compute_in(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Run `model`'s forward under autocast to `dtype` (nothing to do for float32).

    Per call, not around a whole loop: autocast's cache of down-cast weights lives as long as its
    region, and a region spanning an optimizer step would keep serving the weights from before it.
    """
    if dtype == torch.float32:
        return model
    forward = model.forward

    @functools.wraps(forward)
    def forward_in_dtype(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = forward_in_dtype
    return model


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, gathered from all shards (every rank must call this).

    `trainable_only`: only the parameters that train (LoRA's adapters), not the frozen rest.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_pretrained(
    model, tokenizer, target: Path, dist: Dist, hf_model=None, prefix: str = "", merged: bool = False
) -> None:
    """A normal `save_pretrained` folder (safetensors) written atomically by rank 0.

    `model` is what was sharded; `hf_model` the Hugging Face model inside it whose weights are
    under `prefix` in `model`'s state dict (when `model` is a wrapper, as PPO's value head).
    A model with LoRA adapters is saved as an adapter folder (pipeline/lora.py); with `merged`,
    `target` holds the merged model instead and the adapters go beside it (model/ -> model-adapter/).
    Non-finite weights are never written, and a failed write (a full disk) leaves `target` as it
    was; either raises `RunFailed` on every rank, so no process waits for one that stopped.
    """
    from pipeline import lora

    adapters = lora.has_adapters(model)
    # An adapter folder holds only what trained: the frozen base is not even gathered.
    state = full_state_dict(model, trainable_only=adapters and not merged)
    if hf_model is not None:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        model = hf_model
    target = Path(target)
    if hasattr(model, "save_folder"):  # a module of ours, not a Hugging Face model (PPO's shared value head)
        folders = {target: lambda staging: model.save_folder(state, staging)}
    elif not adapters:
        folders = {target: lambda staging: _save_weights(model, _without_tied_copies(model, state), staging)}
    elif merged:
        folders = {
            target: lambda staging: _save_weights(
                model, _without_tied_copies(model, lora.merged_state(model, state)), staging
            ),
            lora.adapter_sibling(target): lambda staging: lora.write_adapter_folder(model, state, staging),
        }
    else:
        folders = {target: lambda staging: lora.write_adapter_folder(model, state, staging)}
    problem = None
    if dist.is_main:
        bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            problem = f"not saving {target}: non-finite weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
        for folder, write in folders.items():
            problem = problem or _write_folder(folder, write, tokenizer)
    problem = broadcast_object(dist, problem)
    if problem:
        from pipeline.errors import RunFailed

        raise RunFailed(problem)


def _save_weights(model, state: dict, folder: Path) -> None:
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)


def _write_folder(target: Path, write, tokenizer) -> str | None:
    """`write(staging)` and the tokenizer into a staging folder swapped in for `target`; what failed, or None."""
    staging = target.with_name(f".{target.name}.tmp")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        replace_dir(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        return f"cannot write {target}: {err}"
    return None


def _without_tied_copies(model, state: dict) -> dict:
    """Drop the output embedding when it is tied to the input one.

    The gathered state dict holds the tied weight under both names as separate tensors, so
    `save_pretrained` cannot see they are one; loading re-ties them from the config.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None or not getattr(config, "tie_word_embeddings", False):
        return state
    for name, module in model.named_modules():
        if module is output:
            state.pop(f"{name}.weight", None)
    return state
