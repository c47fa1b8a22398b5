"""The run directory: resolved config, metrics.jsonl, atomic checkpoints, model card.

```
runs/<name>/
  config.yaml        the resolved config, every default filled in
  metrics.jsonl      one JSON object per logged step
  checkpoints/       step-N/ folders, written atomically (temp dir, then rename)
  model/             the final save_pretrained folder
  README.md          a short model card
```
Only rank 0 writes; a failed or interrupted run leaves the last complete checkpoint as it was.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import config as config_module
from pipeline.launch import (
    Dist,
    barrier,
    full_optimizer_state,
    load_full_optimizer_state,
    replace_dir,
    save_pretrained,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")


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
    def __init__(self, root: str | Path, dist: Dist):
        self.root = Path(root)
        self.dist = dist
        self.checkpoints = self.root / "checkpoints"
        self.model = self.root / "model"
        self.metrics_path = self.root / "metrics.jsonl"

    # ---- config and metrics

    def write_config(self, config: Any) -> None:
        if self.dist.is_main:
            config_module.write_resolved(config, self.root)

    def start_metrics(self, resume_step: int) -> None:
        """Keep logged lines up to the resumed step; a fresh run starts an empty file.

        A fresh run also removes an earlier run's checkpoints, so that a later `--resume` cannot
        pick up weights that do not belong to this run.
        """
        if not self.dist.is_main:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if not resume_step and self.checkpoints.exists():
            shutil.rmtree(self.checkpoints)
        kept = []
        if resume_step and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    # ---- checkpoints

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        steps = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
        return max(steps)[1] if steps else None

    def save_checkpoint(self, step: int, trainables: list[Trainable], extra: dict, keep: int) -> Path:
        """checkpoints/step-N with one model folder per trainable and the trainer state, renamed in place."""
        target = self.checkpoints / f"step-{step}"
        staging = self.checkpoints / f".step-{step}.tmp"
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier(self.dist)
        optimizers = {}
        for t in trainables:
            save_pretrained(t.model, t.tokenizer, staging / t.name, self.dist, hf_model=t.hf_model, prefix=t.prefix)
            optimizers[t.name] = full_optimizer_state(t.model, t.optimizer)
        if self.dist.is_main:
            torch.save({"step": step, "optimizers": optimizers, "rng": torch.get_rng_state(), **extra},
                       staging / "trainer_state.pt")
            replace_dir(staging, target)
            self._prune(keep)
        barrier(self.dist)
        return target

    def load_trainer_state(self, checkpoint: Path, trainables: list[Trainable]) -> dict:
        """Optimizer states and RNG from a checkpoint; the weights were loaded from its folders."""
        state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
        for t in trainables:
            load_full_optimizer_state(t.model, t.optimizer, state["optimizers"][t.name])
        torch.set_rng_state(state["rng"])
        return state

    def _prune(self, keep: int) -> None:
        steps = sorted(
            (int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))
        )
        for _, path in steps[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    # ---- final model and card

    def save_model(self, model, tokenizer) -> Path:
        save_pretrained(model, tokenizer, self.model, self.dist)
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
            "- model: `model/` (load with `from_pretrained`)",
            "",
            "| metric | value |",
            "| --- | --- |",
            *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final_metrics.items()],
        ]
        if notes:
            lines += ["", *notes]
        (self.root / "README.md").write_text("\n".join(lines) + "\n")
