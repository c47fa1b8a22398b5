"""`rlhfdpo evaluate`: one policy's runs, or the SFT baselines, evaluated as the compare will.

The same config as `rlhfdpo compare` plus `policy`: its runs (one per seed) are sampled on the
held-out prompts at every temperature and scored (gold, reward model, KL to SFT along each sample),
their checkpoints put on the frontier, and the result kept in output_dir/evaluations/ under a key
of every model and setting it read. The compare then reuses it instead of sampling again, so the
experiment evaluates each run as soon as it is trained, beside the runs still training.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.compare import Evaluator
from pipeline.config import EvaluateConfig
from pipeline.console import console, plain
from pipeline.launch import close_distributed, init_distributed
from pipeline.training import seed_everything


def run(cfg: EvaluateConfig, overwrite: bool = False) -> Path:
    """`overwrite` is accepted for the command's sake: a kept evaluation is replaced whenever its key
    differs and reused when it matches, so there is nothing else to overwrite."""
    seed_everything(cfg.seed)
    dist = init_distributed()
    evaluator = Evaluator(cfg, dist)
    if cfg.policy == "sft":
        evaluated = evaluator.baselines()
    else:
        policy = next(p for p in cfg.policies if p.name == cfg.policy)
        evaluated = [s for seed in cfg.seeds for s in evaluator.policy_run(policy, seed)]
    if dist.is_main:
        for s in evaluated:
            gold = sum(s.gold) / len(s.gold)
            kl = f", KL {sum(s.kl) / len(s.kl):.2f}" if s.kl is not None else ""
            where = f"seed {s.seed}, " if cfg.policy != "sft" else ""
            step = f", step {s.step}" if s.step != "final" else ""
            console.print(f"{plain(s.name)} ({where}T={s.temperature:g}{step}): gold {gold:+.3f}{kl}")
        console.print(f"kept in {plain(cfg.result_dir)}")
    close_distributed()
    return Path(cfg.result_dir)
