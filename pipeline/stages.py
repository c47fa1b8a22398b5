"""Every stage in one table: its config, its module, its command and what a finished run leaves.

The command line, `config.STAGES`, the experiment runner and `data inspect` all read this table, so
adding a stage is one module (with `run(cfg, ...)`) and one entry here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.config.schema import (
    AdherenceConfig,
    CompareConfig,
    DPOConfig,
    EvaluateConfig,
    ExperimentConfig,
    GattConfig,
    PairsConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type  # the stage's config dataclass
    module: str  # imported only once the config is good; holds run(cfg, resume=..., overwrite=...)
    command: tuple[str, ...]  # `rlhfdpo <command...> CONFIG`
    help: str
    output: str | None  # the file in output_dir that a finished run leaves (None: no output folder)
    sharded: bool = False  # takes --num-processes
    checkpoints: bool = False  # takes --resume

    @property
    def reads_data(self) -> bool:
        """Whether the stage has a `data` section (what `rlhfdpo data inspect` can show)."""
        return any(f.name == "data" for f in dataclasses.fields(self.config))

    def command_line(self, config: str) -> str:
        return " ".join(["rlhfdpo", *self.command, config])


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "sft",
            SFTConfig,
            "pipeline.sft",
            ("sft",),
            "Supervised fine-tuning, loss on response tokens only.",
            "model/config.json",
            sharded=True,
            checkpoints=True,
        ),
        Stage(
            "pairs",
            PairsConfig,
            "pipeline.pairs",
            ("data", "pairs"),
            "Sample k completions per prompt, score them with the gold reward, write preference pairs.",
            "train.jsonl",
            sharded=True,
        ),
        Stage(
            "reward",
            RewardConfig,
            "pipeline.reward",
            ("reward",),
            "Bradley-Terry reward model (with Llama 2's margin) on preference pairs.",
            "model/config.json",
            sharded=True,
            checkpoints=True,
        ),
        Stage(
            "dpo",
            DPOConfig,
            "pipeline.dpo",
            ("dpo",),
            "Direct preference optimisation (DPO, conservative DPO, IPO, hinge, RPO) from the SFT model.",
            "model/config.json",
            sharded=True,
            checkpoints=True,
        ),
        Stage(
            "ppo",
            PPOConfig,
            "pipeline.ppo",
            ("ppo",),
            "PPO against the reward model (or the gold reward: PPO-GT) with a KL penalty to the SFT model.",
            "model/config.json",
            sharded=True,
            checkpoints=True,
        ),
        Stage(
            "compare",
            CompareConfig,
            "pipeline.compare",
            ("compare",),
            "Sample every policy on held-out prompts; win rates, the reward-vs-KL frontier, cost: report.md.",
            "report.md",
        ),
        Stage(
            "evaluate",
            EvaluateConfig,
            "pipeline.evaluate",
            ("evaluate",),
            "Evaluate one policy's runs (or the SFT baselines) as compare will, kept for it: evaluation.json.",
            "evaluation.json",
        ),
        Stage(
            "gatt",
            GattConfig,
            "pipeline.gatt",
            ("data", "gatt"),
            "Ghost Attention data: sample a policy with the instruction on every turn, keep it in the first only.",
            "train.jsonl",
        ),
        Stage(
            "adherence",
            AdherenceConfig,
            "pipeline.adherence",
            ("adherence",),
            "How often models keep a first-turn instruction, turn by turn, and their attention on it: report.md.",
            "report.md",
        ),
        Stage(
            "experiment",
            ExperimentConfig,
            "pipeline.experiment",
            ("experiment",),
            "Run a list of stages in order (make compare), reusing those whose config and inputs are unchanged.",
            None,
        ),
    )
}
