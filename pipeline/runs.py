"""The run directory: resolved config, metrics.jsonl, atomic checkpoints, model card.

```
runs/<name>/
  config.yaml        the resolved config, every default filled in
  metrics.jsonl      one JSON object per logged step
  checkpoints/       step-N/ folders, written atomically (temp dir, then rename)
  model/             the final save_pretrained folder (a LoRA adapter folder under model.lora)
  model-adapter/     with model.lora.save_merged: the adapters, beside the merged model/
  README.md          a short model card
  tensorboard/       event files, when train.report_to names tensorboard (pipeline/tracking.py)
```
Only rank 0 writes; a failed or interrupted run leaves the last complete checkpoint as it was.
A run never writes into a folder that holds something else unless told to (`--resume` continues
the run there, `--overwrite` removes what an earlier run wrote and nothing more).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline import config as config_module
from pipeline.console import console, plain
from pipeline.errors import InputError, RunFailed
from pipeline.files import replace_dir, weights_problem
from pipeline.launch import (
    Dist,
    broadcast_object,
    full_optimizer_state,
    gather_objects,
    load_full_optimizer_state,
    save_pretrained,
)
from pipeline.tracking import Trackers, open_trackers
from pipeline.training import rng_state, set_rng_state

STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
# What every run writes at its root; a stage adds its own names (sft: tokenizer, ppo: value, ...).
# TensorBoard's events go with metrics.jsonl; W&B's and MLflow's folders (wandb/, mlruns/) hold
# runs of their own, which --overwrite leaves to their owner.
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "model",
    "model-adapter",  # LoRA's adapters beside a merged model/ (model.lora.save_merged)
    "README.md",
    "cost.json",
    "tensorboard",
)

# Keys a resumed run may change: they decide how often it logs, evaluates and saves, how long it
# runs, how many processes share it and what it prints, never the model, the data or the batch order.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.gradient_checkpointing",
    "train.eval_batch_size",
    "sample_table_every",
    "launch.",
    "sample.",
    "reference.batch_size",
    "reference.cache_dir",
    "data.max_eval_examples",
    "model.lora.save_merged",  # only how the final model is written
)


def step_of(path: Path) -> int | None:
    """N for a `step-N` checkpoint folder, None for anything else."""
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_folders(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder, oldest first."""
    if not checkpoints.is_dir():
        return []
    return sorted((step, p) for p in checkpoints.iterdir() if (step := step_of(p)) is not None and p.is_dir())


def prepare_output_dir(
    root: Path, dist: Dist, resume: bool, overwrite: bool, produces: tuple[str, ...], reads: tuple[str, ...] = ()
) -> None:
    """Refuse to write a fresh run into a folder that holds anything; `--overwrite` clears what runs write.

    `reads`: entries the stage expects to find there and reuses (the compare's cached evaluations),
    which neither block a fresh run nor are cleared. Rank 0 decides and every rank gets the verdict,
    so all of them stop together.
    """
    problem = None
    if dist.is_main:
        problem = _output_dir_problem(Path(root), resume, overwrite, produces, reads)
    problem = broadcast_object(dist, problem)
    if problem:
        raise InputError(problem)


def _output_dir_problem(
    root: Path, resume: bool, overwrite: bool, produces: tuple[str, ...], reads: tuple[str, ...] = ()
) -> str | None:
    if resume and overwrite:
        return "--resume and --overwrite exclude each other: continue the run there, or replace it"
    if resume or not root.is_dir() or not any(p.name not in reads for p in root.iterdir()):
        return None
    if not overwrite:
        held = sorted(p.name for p in root.iterdir() if p.name not in reads)
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        return (
            f"{root} already holds {shown}; pass --resume to continue the run there, or --overwrite to "
            "replace what an earlier run wrote (other files are kept), or choose another output_dir"
        )
    for name in produces:
        path = root / name
        if name == "checkpoints" and path.is_dir():
            for _, folder in checkpoint_folders(path):
                shutil.rmtree(folder)
            for leftover in path.glob(".step-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if not any(path.iterdir()):
                path.rmdir()
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        for leftover in (root / f".{name}.tmp", root / f".{name}.old"):
            shutil.rmtree(leftover, ignore_errors=True)
    return None


@dataclass
class Trainable:
    """A model being trained, as a checkpoint stores it: `checkpoints/step-N/<name>/`.

    `hf_model` is the `save_pretrained` owner when `model` is a wrapper around it (the PPO value
    head); `prefix` is then the wrapper's name for it in the state dict.
    """

    name: str
    model: Any
    optimizer: Any
    tokenizer: Any = None
    hf_model: Any = None
    prefix: str = ""


class RunDir:
    def __init__(
        self,
        root: str | Path,
        dist: Dist,
        resume: bool = False,
        overwrite: bool = False,
        produces: tuple[str, ...] = (),
    ):
        self.root = Path(root)
        self.dist = dist
        self.checkpoints = self.root / "checkpoints"
        self.model = self.root / "model"
        self.metrics_path = self.root / "metrics.jsonl"
        self.config = None  # set by write_config; its train.report_to names the trackers start_metrics opens
        self.trackers = Trackers()
        prepare_output_dir(self.root, dist, resume, overwrite, RUN_FILES + produces)

    # ---- config and metrics

    def write_config(self, config: Any) -> None:
        self.config = config
        if self.dist.is_main:
            config_module.write_resolved(config, self.root)

    def start_metrics(self, resume_step: int) -> None:
        """Keep logged lines up to the resumed step; a fresh run starts an empty file.

        The trackers the config's train.report_to names start here and get every record from now
        on; one that cannot start stops the run on every rank.
        """
        problem = None
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step and self.metrics_path.exists():
                for line in self.metrics_path.read_text().splitlines():
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
            problem = self._start_trackers(resume_step)
        problem = broadcast_object(self.dist, problem)
        if problem:
            raise RunFailed(problem)

    def _start_trackers(self, resume_step: int) -> str | None:
        train = getattr(self.config, "train", None)
        if train is None or not train.report_to:
            return None
        stage = next((name for name, cls in config_module.STAGES.items() if isinstance(self.config, cls)), "run")
        try:
            self.trackers = open_trackers(
                train.report_to, self.root, config_module.to_dict(self.config), stage, resume_step
            )
        except RunFailed as err:
            return str(err)
        return None

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.trackers.log(record)  # after the line is written: no tracker can cost metrics.jsonl a record

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    # ---- checkpoints

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that is whole; a damaged newer one is skipped with a warning."""
        for _, path in reversed(checkpoint_folders(self.checkpoints)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if self.dist.is_main:
                console.print(f"[yellow]warning:[/yellow] skipping checkpoint {plain(path)}: {plain(problem)}")
        return None

    def resume_point(self, config: Any) -> Path | None:
        """The checkpoint `--resume` continues from, after checking the config did not change what it trains."""
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            if self.dist.is_main:
                console.print(f"[yellow]no checkpoint under {plain(self.checkpoints)}; starting from step 0")
            return None
        notes = check_resume_config(config, checkpoint, self.root)
        if self.dist.is_main and notes:
            console.print(f"resuming {plain(checkpoint)} with changed {plain(notes)}")
        return checkpoint

    def save_checkpoint(self, step: int, trainables: list[Trainable], extra: dict, keep: int, config: Any) -> Path:
        """checkpoints/step-N with one model folder per trainable, the config and the trainer state.

        Written to a temporary folder and renamed, so a crash or a full disk leaves the earlier
        checkpoints as they were. `extra` is gathered from every rank (per-rank random states).
        """
        target = self.checkpoints / f"step-{step}"
        staging = self.checkpoints / f".step-{step}.tmp"
        problem = None
        if self.dist.is_main:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            except OSError as err:
                problem = str(err)
        if broadcast_object(self.dist, problem):
            raise self._save_failed(target, staging, problem)
        optimizers = {}
        try:
            for t in trainables:
                save_pretrained(t.model, t.tokenizer, staging / t.name, self.dist, hf_model=t.hf_model, prefix=t.prefix)
                optimizers[t.name] = full_optimizer_state(t.model, t.optimizer)
        except RunFailed as err:
            raise self._save_failed(target, staging, str(err)) from None
        per_rank = gather_objects(self.dist, {"rng": rng_state(), **extra})
        if self.dist.is_main:
            try:
                torch.save({"step": step, "optimizers": optimizers, "ranks": per_rank}, staging / TRAINER_STATE)
                config_module.write_resolved(config, staging)
                replace_dir(staging, target)
                self._prune(keep)
            except OSError as err:
                problem = str(err)
        if broadcast_object(self.dist, problem):
            raise self._save_failed(target, staging, problem)
        return target

    def _save_failed(self, target: Path, staging: Path, problem: str) -> RunFailed:
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        kept = [p.name for _, p in checkpoint_folders(self.checkpoints)]
        return RunFailed(
            f"cannot write checkpoint {target}: {problem}; "
            + (
                f"the earlier checkpoints ({', '.join(kept)}) are kept: free space, then --resume"
                if kept
                else "no earlier checkpoint exists: free space and start again"
            )
        )

    def load_trainer_state(self, checkpoint: Path, trainables: list[Trainable]) -> dict:
        """Optimizer states and random states from a checkpoint; the weights were loaded from its folders.

        Returns this rank's entries of what `save_checkpoint` was given as `extra`, plus "step".
        """
        path = checkpoint / TRAINER_STATE
        try:  # weights_only: a checkpoint is tensors and plain values; anything else is not loaded, let alone run
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged or hostile file
            raise InputError(
                f"{path}: cannot be loaded as a checkpoint ({type(err).__name__}); "
                "remove that checkpoint folder to resume from an earlier one"
            ) from None
        for t in trainables:
            load_full_optimizer_state(t.model, t.optimizer, state["optimizers"][t.name])
        ranks = state.get("ranks") or [{"rng": state["rng"]}]
        mine = ranks[self.dist.rank] if self.dist.rank < len(ranks) else ranks[0]
        if len(ranks) != self.dist.world_size and self.dist.is_main:
            console.print(
                f"[yellow]the checkpoint was written by {len(ranks)} process(es), this run has "
                f"{self.dist.world_size}: sampling continues from other random states than an uninterrupted run"
            )
        set_rng_state(mine["rng"])
        return {"step": state["step"], **{k: v for k, v in mine.items() if k != "rng"}}

    def _prune(self, keep: int) -> None:
        for _, path in checkpoint_folders(self.checkpoints)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    # ---- final model and card

    def save_model(self, model, tokenizer, hf_model=None, prefix: str = "", merged: bool = False) -> Path:
        """The final model in model/: a LoRA model as its adapters, or `merged` (adapters in model-adapter/)."""
        save_pretrained(model, tokenizer, self.model, self.dist, hf_model=hf_model, prefix=prefix, merged=merged)
        return self.model

    def write_card(self, stage: str, config: Any, final_metrics: dict, notes: list[str] = ()) -> None:
        if not self.dist.is_main:
            return
        command = " ".join(["rlhfdpo", *sys.argv[1:]]) if sys.argv else f"rlhfdpo {stage}"
        lines = [
            f"# {stage} run",
            "",
            f"- command: `{command}`",
            f"- config digest: `{config_module.digest(config)}` (full config in `config.yaml`)",
            f"- ran on: {self.dist.world_size} process(es), {self.dist.device.type}"
            + (", FSDP2-sharded" if self.dist.sharded else ""),
            "- model: `model/` (load with `from_pretrained`)",
            "",
            "| metric | value |",
            "| --- | --- |",
            *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final_metrics.items()],
        ]
        if notes:
            lines += ["", *notes]
        (self.root / "README.md").write_text("\n".join(lines) + "\n")
        self.trackers.close()  # the card is the last thing every stage writes: its trackers end with it


def checkpoint_problem(path: Path) -> str | None:
    """What makes a checkpoint folder unusable (a missing or damaged file), or None if it is whole.

    Cheap: zip directories and safetensors headers are read, not the tensors.
    """
    state = path / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        with zipfile.ZipFile(state) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return f"{TRAINER_STATE} is damaged (not a complete torch checkpoint)"
    for folder in sorted(p for p in path.iterdir() if (p / "config.json").is_file()):
        problem = weights_problem(folder)
        if problem:
            return problem
    return None


def check_resume_config(config: Any, checkpoint: Path, root: Path) -> list[str]:
    """Compare the config with the one the checkpoint was trained with.

    Changes to the model, the data, the optimizer or the batch order are refused, naming the keys;
    the harmless ones (RESUMABLE_CHANGES) are returned as notes.
    """
    saved_path = checkpoint / "config.yaml"
    if not saved_path.is_file():  # a checkpoint from before configs were stored in them
        saved_path = root / "config.yaml"
    if not saved_path.is_file():
        return []
    saved = _flatten(yaml.safe_load(saved_path.read_text()) or {})
    current = _flatten(config_module.to_dict(config))
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k, _MISSING) != current.get(k, _MISSING))
    refused = [k for k in changed if not k.startswith(RESUMABLE_CHANGES) and k != "output_dir"]
    if refused:
        shown = ", ".join(
            f"{k} ({_show(saved.get(k, _MISSING))} -> {_show(current.get(k, _MISSING))})" for k in refused[:5]
        )
        raise InputError(
            f"--resume: the config differs from the one {checkpoint} was trained with in {shown}"
            f"{' and more' if len(refused) > 5 else ''}; these change the model, the data or the batch order. "
            "Undo the change, or start a fresh run with --overwrite (or another output_dir)"
        )
    return [
        f"{k} ({_show(saved.get(k, _MISSING))} -> {_show(current.get(k, _MISSING))})"
        for k in changed
        if k != "output_dir"
    ]


_MISSING = object()


def _show(value: Any) -> str:
    return "unset" if value is _MISSING else json.dumps(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    if isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        out = {}
        for i, value in enumerate(tree):
            out |= _flatten(value, f"{prefix}{i}.")
        return out
    return {prefix[:-1]: tree}
