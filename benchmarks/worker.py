"""One timed training run in a fresh process: `python -m benchmarks.worker SPEC.json RESULT.json`.

A fresh process per run keeps peak memory per run. The same instrument times both frameworks: a
global optimizer-step hook records when every optimizer step ends, so steady-state throughput
and time to first step come from the same clock whatever the training loop.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before any heavy import: time to first step includes imports

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

STEP_TIMES: list[float] = []
# Our stages' real tokens per training step (a pair's as a row per side has them), under the index
# of the step being prepared: STEP_TIMES' length when its batches are made.
STEP_TOKENS: dict[int, int] = {}


def _record_step(_optimizer, _args, _kwargs) -> None:
    if torch.cuda.is_initialized():  # the step's kernels are queued, not done, when it returns
        torch.cuda.synchronize()
    STEP_TIMES.append(time.time())


def counting(make_batch, tokens_of):
    """`make_batch(examples, ...)` that also adds its examples' tokens to the step being prepared."""

    def wrapped(examples, *args, **kwargs):
        step = len(STEP_TIMES)
        STEP_TOKENS[step] = STEP_TOKENS.get(step, 0) + sum(tokens_of(e) for e in examples)
        return make_batch(examples, *args, **kwargs)

    return wrapped


def count_our_tokens(module, stage: str) -> None:
    """Counts what each training step of `module` (a stage's module) batches: the batch functions
    its loop calls by their module-level names. The reference pass (pipeline.reference) and the
    evaluation after the last step fall outside the timed steps."""
    if stage == "sft":
        for name in ("pack", "collate"):
            setattr(module, name, counting(getattr(module, name), lambda e: len(e.input_ids)))
    else:
        pair_tokens = lambda p: len(p.chosen.input_ids) + len(p.rejected.input_ids)  # noqa: E731
        module.collate_for = counting(module.collate_for, pair_tokens)


def data_key(spec: dict, split: str = "") -> str:
    """The fixture file of a spec's stage and pair shape: sft, pairs or pairs_hh (+ _eval)."""
    if spec["stage"] == "sft":
        return "sft" + split
    return "pairs" + ("_hh" if spec.get("shape") == "hh" else "") + split


def training_rows(spec: dict, fixtures: dict) -> Path:
    """The first steps x batch_size rows of the stage's data: every row is trained on once, and
    the reference pass (part of time to first step) covers exactly the rows that are used."""
    source = Path(fixtures["data"][data_key(spec)])
    rows = source.read_text().splitlines()[: spec["steps"] * spec["batch_size"]]
    path = Path(spec["out"]) / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def run_ours(spec: dict, fixtures: dict) -> None:
    import yaml

    from pipeline.config import STAGES, load_config

    stage, out = spec["stage"], Path(spec["out"])
    pairs = stage != "sft"
    data = {
        "train": [
            {
                "path": str(training_rows(spec, fixtures)),
                "format": "prompt_chosen_rejected" if pairs else "prompt_completion",
            }
        ],
        "eval": [
            {
                "path": fixtures["data"][data_key(spec, "_eval")],
                "format": "prompt_chosen_rejected" if pairs else "prompt_completion",
            }
        ],
        "max_length": spec["max_length"],
        "max_prompt_length": spec.get("max_prompt_length", spec["max_length"] // 2),
        "max_eval_examples": 16,
    }
    config = {
        "output_dir": str(out / "run"),
        "model": {
            "name_or_path": fixtures["models"][spec["size"]],
            "dtype": spec.get("dtype", "float32"),
            **spec.get("model", {}),  # e.g. lora (benchmarks/memory.py)
        },
        "data": data,
        "optim": {"lr": spec["lr"], "min_warmup_steps": spec["warmup_steps"], "warmup_ratio": 0.0},
        "train": {
            "max_steps": spec["steps"],
            "batch_size": spec["batch_size"],
            "micro_batch_size": spec["batch_size"],
            "eval_batch_size": 16,
            "eval_every": 0,
            "save_every": 0,
            "log_every": spec["steps"],
            "seed": spec["seed"],
            **spec.get("ours", {}),
        },
    }
    if stage == "reward":
        config["loss"] = {"margin": "none"}
    else:
        config["sample"] = {"num_prompts": 0}
    if stage == "dpo":
        config["reference"] = {"cache_dir": str(out / "reference-cache"), "batch_size": spec["reference_batch_size"]}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(STAGES[stage], path, [])
    module = __import__(f"pipeline.{stage}", fromlist=["run"])
    count_our_tokens(module, stage)
    module.run(cfg, overwrite=True)


def rl_prompts(spec: dict, fixtures: dict) -> Path:
    """The fixture rows whose prompt fits max_prompt_length tokens: TRL's GRPO/RLOO trainers do not
    truncate prompts, so both sides sample from exactly the same prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixtures["models"][spec["size"]])
    rows = [json.loads(line) for line in Path(fixtures["data"]["pairs"]).read_text().splitlines()]
    fits = [r for r in rows if len(tokenizer(r["prompt"])["input_ids"]) <= spec["max_prompt_length"]]
    path = Path(spec["out"]) / "prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in fits))
    return path


def run_ppo(spec: dict, fixtures: dict) -> dict:
    """A few PPO iterations; returns the mean seconds of each phase, the first iteration left out."""
    import yaml

    from pipeline import ppo
    from pipeline.config import STAGES, load_config

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    folder = fixtures["models"][spec["size"]]
    config = {
        "output_dir": str(out / "run"),
        "model": {"name_or_path": folder, "dtype": spec.get("dtype", "float32"), **spec.get("model", {})},
        "reward": {"kind": "model", "models": [fixtures["reward_models"][spec["size"]]], "normalize": False},
        "data": {
            "train": [{"path": str(rl_prompts(spec, fixtures)), "format": "prompt_chosen_rejected"}],
            "max_length": spec["max_length"],
            "max_prompt_length": spec["max_prompt_length"],
        },
        "rollout": {"max_new_tokens": spec["new_tokens"], "temperature": 1.0},
        "kl": {"coef": spec["kl_coef"]},
        "optim": {"lr": spec["lr"], "warmup_ratio": 0.0, "schedule": "constant"},
        "ppo": {
            "rollout_batch_size": spec["rollout_batch_size"],
            "mini_batch_size": min(16, spec["rollout_batch_size"]),
            "micro_batch_size": min(16, spec["rollout_batch_size"]),
            **spec.get("ppo", {}),
        },
        "train": {
            "max_steps": spec["iterations"],
            "log_every": 1,
            "save_every": 0,
            "seed": spec["seed"],
            **spec.get("ours", {}),
        },
        "sample_table_every": 0,
        **({"value_model": spec["value_model"]} if spec.get("value_model") else {}),
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    ppo.run(load_config(STAGES["ppo"], path, []), overwrite=True)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/generate" in r][1:]
    phases = ("generate", "score", "advantages", "update")
    return {phase: sum(r[f"time/{phase}"] for r in rows) / len(rows) for phase in phases}


def trl_arguments(spec: dict, **settings) -> dict:
    """TRL's training arguments common to every bench run, ours' optimizer (AdamW 0.9/0.95, eps 1e-5,
    weight decay 0.1, clipping at 1.0) and no saving, logging or evaluation on the clock; `settings`
    on top."""
    return dict(
        output_dir=str(Path(spec["out"]) / "run"),
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-5,
        weight_decay=0.1,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=spec["seed"],
        disable_tqdm=True,
        bf16=spec.get("dtype") == "bfloat16",  # TRL's bf16 is autocast over float32 weights, as ours
        fp16=False,  # TRL defaults to bf16; ours follows model.dtype, so both are set alike
        dataloader_num_workers=0,
        # TRL 1.x's configs turn gradient checkpointing on by default (a forward again in every
        # backward, for less memory); ours keep every activation (train.gradient_checkpointing off), so
        # TRL's is off too: the same work and memory trade both ways.
        gradient_checkpointing=False,
        **settings,
    )


def run_trl(spec: dict, fixtures: dict) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    stage = spec["stage"]
    folder = fixtures["models"][spec["size"]]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = datasets.load_dataset("json", data_files=str(training_rows(spec, fixtures)), split="train")
    common = trl_arguments(
        spec,
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=spec["warmup_steps"],
        logging_steps=spec["steps"],
        eval_strategy="no",
        max_length=spec["max_length"],
        **spec.get("trl", {}),
    )
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(folder)
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=train, processing_class=tokenizer)
    elif stage == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
        trainer = RewardTrainer(
            model=model, args=RewardConfig(**common), train_dataset=train, processing_class=tokenizer
        )
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(folder)
        args = DPOConfig(
            **common, precompute_ref_log_probs=True, precompute_ref_batch_size=spec["reference_batch_size"], beta=0.1
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()


def run_trl_rl(spec: dict, fixtures: dict) -> None:
    """TRL's GRPOTrainer or RLOOTrainer at the settings of our critic-free PPO iteration (run_ppo with
    ppo.advantage grpo or rloo): the same model, prompts, samples per prompt, new tokens, sampling
    temperature, KL coefficient (so both run a reference pass) and reward model; one generation and
    one optimizer step on all of its completions per iteration. TRL generates with the model's own
    `generate`."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = fixtures["models"][spec["size"]]
    ppo = spec["ppo"]
    completions = ppo["rollout_batch_size"] * ppo["samples_per_prompt"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reward_model = AutoModelForSequenceClassification.from_pretrained(fixtures["reward_models"][spec["size"]])
    prompts = datasets.load_dataset("json", data_files=str(rl_prompts(spec, fixtures)), split="train")
    prompts = prompts.select_columns(["prompt"])
    common = trl_arguments(
        spec,
        per_device_train_batch_size=completions,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=ppo["samples_per_prompt"],
        max_completion_length=spec["new_tokens"],
        temperature=1.0,
        beta=spec["kl_coef"],
        max_steps=spec["iterations"],
        lr_scheduler_type="constant",
        logging_steps=1,
        disable_dropout=True,
    )
    if spec["stage"] == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(
            model=folder,
            reward_funcs=reward_model,
            args=GRPOConfig(**common, scale_rewards="group"),
            train_dataset=prompts,
            processing_class=tokenizer,
            reward_processing_classes=tokenizer,
        )
    else:
        from trl import RLOOConfig, RLOOTrainer

        trainer = RLOOTrainer(
            model=folder,
            reward_funcs=reward_model,
            args=RLOOConfig(**common),
            train_dataset=prompts,
            processing_class=tokenizer,
            reward_processing_classes=tokenizer,
        )
    trainer.train()


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    fixtures = json.loads(Path(spec["fixtures"]).read_text())
    torch.manual_seed(spec["seed"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    register_optimizer_step_post_hook(_record_step)
    extra = {}
    if spec["stage"] in ("grpo", "rloo") and spec["framework"] == "trl":
        run_trl_rl(spec, fixtures)
    elif spec["stage"] in ("ppo", "grpo", "rloo"):
        extra["ppo_phases"] = run_ppo(spec, fixtures)
    else:
        {"ours": run_ours, "trl": run_trl}[spec["framework"]](spec, fixtures)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if torch.cuda.is_initialized():
        extra["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(result_path).write_text(
        json.dumps(
            {
                "spec": spec,
                "process_start": PROCESS_START,
                "step_times": STEP_TIMES,
                # aligned with step_times: the tokens of the step that ended at each; none from TRL
                **({"step_tokens": [STEP_TOKENS.get(i, 0) for i in range(len(STEP_TIMES))]} if STEP_TOKENS else {}),
                "peak_rss_mb": peak_kib / 1024,
                "end": time.time(),
                **extra,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
