"""Every stage's config as typed dataclasses: each key, its default and its meaning, in one place.

A config is a tree of these dataclasses; `pipeline/config/loading.py` builds it from YAML strictly,
then calls `check()`, which fails with one `ConfigError` line naming the key path. The comment beside
a field is its documentation (`rlhfdpo config show` prints it).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.config.checks import (
    check_fits,
    check_gold,
    check_model_path,
    check_reward_model_path,
    in_range,
    positive,
)
from pipeline.errors import ConfigError

# Defaults that are not a single key's but a rule's: kept here so every default lives in the schema.
DEFAULT_PROMPT_WORDS = (2, 8)  # the DPO paper's IMDb prompts: review prefixes of 2-8 words (format "reviews")
DEFAULT_MIN_SCORE_RATIO = 2.0  # SHP: keep pairs whose preferred score is at least twice the other's
GROUP_BATCHES = 64  # batches per length-sorted megabatch under train.group_by_length (as transformers)


# ----------------------------------------------------------------------------------------- sections


@dataclass
class ArchitectureConfig:
    """The shape of a model created from scratch (`model.name_or_path: scratch`)."""

    # gpt2: learned positions, LayerNorm, GELU MLP. llama: RoPE, RMSNorm, SwiGLU, grouped-query
    # attention. qwen2: llama's blocks with biases on the query, key and value projections.
    type: Literal["gpt2", "llama", "qwen2"] = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256  # longest sequence the model can see, prompt and response together
    vocab_size: int = 2048  # size of the byte-level BPE tokenizer trained on the training texts
    dropout: float = 0.0
    # llama and qwen2 only: key/value heads of grouped-query attention (None: n_head, plain
    # multi-head attention), the SwiGLU hidden width (None: 8/3 n_embd rounded up to a multiple of
    # 32, GPT-2's parameter count), and RoPE's base.
    n_kv_head: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True  # the output layer shares the input embedding's weights

    def check(self, at: str) -> None:
        positive(
            at,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            n_positions=self.n_positions,
            vocab_size=self.vocab_size,
        )
        if self.n_embd % self.n_head:
            raise ConfigError(f"{at}.n_embd: {self.n_embd} is not divisible by n_head={self.n_head}")
        if self.vocab_size < 300:
            raise ConfigError(f"{at}.vocab_size: must be at least 300 (256 bytes plus special tokens)")
        in_range(f"{at}.dropout", self.dropout, 0.0, 1.0)
        if self.type == "gpt2":
            for name in ("n_kv_head", "intermediate_size"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{at}.{name}: only used by type llama or qwen2, not gpt2")
            if not self.tie_word_embeddings:
                raise ConfigError(f"{at}.tie_word_embeddings: GPT-2 always ties its output layer; use type llama")
            return
        if (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                f"{at}.n_head: RoPE needs an even head size, and n_embd/n_head = {self.n_embd // self.n_head}"
            )
        if self.n_kv_head is not None:
            positive(at, n_kv_head=self.n_kv_head)
            if self.n_head % self.n_kv_head:
                raise ConfigError(f"{at}.n_kv_head: {self.n_kv_head} does not divide n_head={self.n_head}")
        if self.intermediate_size is not None:
            positive(at, intermediate_size=self.intermediate_size)
        if self.rope_theta <= 0:
            raise ConfigError(f"{at}.rope_theta: must be positive, got {self.rope_theta}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-(8 * self.n_embd // 3) // 32) * 32


@dataclass
class LoraConfig:
    """Low-rank adapters (peft's LoRA) on the model's linear layers; only they train."""

    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    # Module names to adapt (q_proj, v_proj, ...); ["all-linear"]: every linear layer but the
    # output head, as in QLoRA.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Also write model/ as one merged model (base + adapters) beside the adapter folder.
    save_merged: bool = False

    def check(self, at: str) -> None:
        positive(at, r=self.r)
        if self.alpha <= 0:
            raise ConfigError(f"{at}.alpha: must be positive, got {self.alpha}")
        in_range(f"{at}.dropout", self.dropout, 0.0, 1.0)
        if not self.target_modules:
            raise ConfigError(f"{at}.target_modules: name at least one module, or 'all-linear'")


@dataclass
class ModelConfig:
    # A hub id ("gpt2"), a local save_pretrained folder (the previous stage's `model/`), or
    # "scratch" for a new GPT-2 of `architecture` with a tokenizer trained on the training texts.
    name_or_path: str = "scratch"
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    tokenizer: str | None = None  # defaults to name_or_path
    revision: str | None = None
    # The precision of forward passes. bfloat16 is mixed precision: every model keeps float32
    # weights, gradients and optimizer state (a bf16 AdamW update of lr 1e-6 would round away) and
    # computes in bf16 (autocast in one process, FSDP2's policy when sharded). float16 is not
    # offered: it would need loss scaling.
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    # Hub models only: the attention kernel ("eager", "sdpa", "flash_attention_2"); None lets
    # transformers choose.
    attn_implementation: str | None = None
    lora: LoraConfig | None = None  # train low-rank adapters instead of every weight (null: full fine-tuning)

    def check(self, at: str) -> None:
        if not self.name_or_path:
            raise ConfigError(f"{at}.name_or_path: must not be empty")
        if self.name_or_path != "scratch":
            check_model_path(f"{at}.name_or_path", self.name_or_path)
        self.architecture.check(f"{at}.architecture")
        if self.lora is not None:
            if self.name_or_path == "scratch":
                raise ConfigError(f"{at}.lora: a model created from scratch has nothing to adapt; train it fully first")
            self.lora.check(f"{at}.lora")


SourceFormat = Literal[
    "text",
    "prompt_completion",
    "reviews",
    "messages",
    "hh_rlhf",
    "prompt_chosen_rejected",
    "conversational",
    "ultrafeedback",
    "shp",
]


@dataclass
class SourceConfig:
    # "builtin:sentiment" (reviews), "builtin:dialogues" (chats, format "messages"), a local file
    # (json, jsonl, jsonl.gz, csv, csv.gz, parquet) or a hub id.
    path: str = "builtin:sentiment"
    format: SourceFormat = "reviews"
    name: str | None = None  # hub dataset config name
    data_dir: str | None = None  # hub dataset data_dir (HH-RLHF: "harmless-base")
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)  # the adapter's column -> this file's column
    fraction: float = 1.0  # share of this source's rows to use; mixes sources (safety + 10% helpful)
    max_rows: int | None = None  # cap on raw rows read, before fraction
    # Only for format "shp": keep pairs whose score ratio is at least this (the SHP paper uses 2).
    min_score_ratio: float | None = None
    # Only for format "reviews" when prompts are wanted: prefix length range in words.
    prompt_words: list[int] | None = None

    def check(self, at: str) -> None:
        if not self.path:
            raise ConfigError(f"{at}.path: must not be empty")
        if self.path == "builtin:dialogues" and self.format != "messages":
            raise ConfigError(f"{at}.format: builtin:dialogues holds chats; use format 'messages', not '{self.format}'")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"{at}.fraction: must be in (0, 1], got {self.fraction}")
        if self.max_rows is not None:
            positive(at, max_rows=self.max_rows)
        if self.min_score_ratio is not None:
            if self.format != "shp":
                raise ConfigError(f"{at}.min_score_ratio: only used by format 'shp', not '{self.format}'")
            if self.min_score_ratio < 1.0:
                raise ConfigError(f"{at}.min_score_ratio: must be at least 1, got {self.min_score_ratio}")
        if self.prompt_words is not None:
            if self.format != "reviews":
                raise ConfigError(f"{at}.prompt_words: only used by format 'reviews', not '{self.format}'")
            lo_hi = self.prompt_words
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ConfigError(f"{at}.prompt_words: expected [min, max] with 1 <= min <= max, got {lo_hi}")


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    eval: list[SourceConfig] = field(default_factory=list)  # empty: hold out eval_fraction of train
    eval_fraction: float = 0.05
    max_eval_examples: int | None = 1000
    max_length: int = 256  # prompt + response tokens, EOS included
    max_prompt_length: int = 128
    truncate_prompt: Literal["keep_end", "keep_start"] = "keep_end"  # the end holds the question
    truncate_response: Literal["keep_start", "keep_end"] = "keep_start"
    long_prompts: Literal["truncate", "drop"] = "truncate"  # "drop" counts them as "prompt too long"
    strict: bool = False  # the first dropped row is an error that names it
    seed: int = 0

    def check(self, at: str) -> None:
        if not self.train:
            raise ConfigError(f"{at}.train: at least one source is needed")
        for i, source in enumerate(self.train):
            source.check(f"{at}.train.{i}")
        for i, source in enumerate(self.eval):
            source.check(f"{at}.eval.{i}")
        in_range(f"{at}.eval_fraction", self.eval_fraction, 0.0, 0.9)
        positive(at, max_length=self.max_length, max_prompt_length=self.max_prompt_length)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"{at}.max_prompt_length: {self.max_prompt_length} leaves no room for a response "
                f"within max_length={self.max_length}"
            )


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule; defaults are the Llama 2 recipe."""

    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-5
    weight_decay: float = 0.1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at 10% of the peak rate
    warmup_ratio: float = 0.03
    min_warmup_steps: int = 0  # warmup is max(min_warmup_steps, warmup_ratio * total steps)
    max_grad_norm: float = 1.0

    def check(self, at: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{at}.lr: must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{at}.betas: expected two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"{at}.eps: must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"{at}.weight_decay: must not be negative, got {self.weight_decay}")
        in_range(f"{at}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        in_range(f"{at}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.min_warmup_steps < 0:
            raise ConfigError(f"{at}.min_warmup_steps: must not be negative")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"{at}.max_grad_norm: must be positive, got {self.max_grad_norm}")


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    # Sequences per optimizer step over all processes (OpenRLHF's train_batch_size). It does not
    # change with the number of processes, so a sharded run follows the one-process loss curve.
    batch_size: int = 32
    # Sequences per forward pass in one process; gradient accumulation makes up the rest.
    micro_batch_size: int = 8
    eval_batch_size: int = 16  # per process
    eval_every: int = 100  # optimizer steps; 0 evaluates only at the end
    log_every: int = 10
    # Batches of similar lengths (as transformers' group_by_length): less padding, so faster steps;
    # which examples share a batch changes, every example is still seen once per epoch.
    group_by_length: bool = False
    save_every: int = 200  # checkpoint period in optimizer steps; 0 saves only the final model
    keep_checkpoints: int = 2
    seed: int = 0
    # Keep only each transformer block's input for backward and recompute the rest: less activation
    # memory for about one more forward pass per step; the same numbers.
    gradient_checkpointing: bool = False
    # Pair stages (dpo, reward): each pair as one row [prompt, chosen, rejected], the rejected side
    # masked from the chosen one and its positions restarting after the prompt, so the prompt is
    # computed once; the same log-probs and rewards (to float rounding). Needs sdpa or eager
    # attention (other kinds warn and run a row per side).
    share_prompt: bool = False
    # SFT: a micro-batch's sequences packed into as few rows as fit, each seeing only itself (position
    # ids restart, a block-diagonal mask), so no FLOP goes to padding; the same loss to float
    # rounding. Needs sdpa or eager attention (other kinds warn and pad).
    packing: bool = False
    # Experiment trackers fed from the same records as metrics.jsonl (which stays the source of
    # truth): any of tensorboard, wandb, mlflow, trackio (each an optional extra).
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(default_factory=list)

    def check(self, at: str) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"{at}.epochs: must be positive, got {self.epochs}")
        if self.max_steps is not None:
            positive(at, max_steps=self.max_steps)
        positive(
            at,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            eval_batch_size=self.eval_batch_size,
            log_every=self.log_every,
            keep_checkpoints=self.keep_checkpoints,
        )
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{at}.{name}: must not be negative")

    def accumulation_steps(self, world_size: int) -> tuple[int, int]:
        """(micro-batch size, micro-batches per process per step) that make up `batch_size`."""
        if self.batch_size % world_size:
            raise ConfigError(f"train.batch_size: {self.batch_size} does not split evenly over {world_size} processes")
        per_process = self.batch_size // world_size
        micro = min(self.micro_batch_size, per_process)
        if per_process % micro:
            raise ConfigError(
                f"train.micro_batch_size: {micro} does not divide the {per_process} sequences each of "
                f"{world_size} processes gets per step (train.batch_size={self.batch_size})"
            )
        return micro, per_process // micro


def not_for_single_sequences(stage: str, train: TrainConfig) -> None:
    if train.share_prompt:
        raise ConfigError(
            f"train.share_prompt: only the pair stages (dpo, reward) share a prompt; {stage} has none to share"
        )


def not_for_pairs(stage: str, train: TrainConfig) -> None:
    if train.packing:
        raise ConfigError(
            f"train.packing: only sft packs sequences; {stage} trains on pairs, whose prompt "
            "train.share_prompt computes once instead"
        )


@dataclass
class LaunchConfig:
    """How many processes run the stage, on how many machines (pipeline/launch.py starts them)."""

    # Processes of the whole job, on all machines together, as accelerate's --num_processes counts
    # them: 2 machines of 8 GPUs are 16. train.batch_size is split over all of them.
    num_processes: int = 1
    # Accelerate config file used when num_processes > 1. None picks configs/accelerate/fsdp.yaml
    # on a CUDA machine and configs/accelerate/cpu.yaml elsewhere.
    accelerate_config: str | None = None
    # Machines that run the job together, each the same command with its own machine_rank. null, for
    # this and the next three keys: the environment's NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
    # else accelerate_config's file, else one machine.
    num_machines: int | None = None
    machine_rank: int | None = None  # this machine's number, 0 to num_machines - 1; machine 0 holds rank 0
    main_process_ip: str | None = None  # the address of machine 0, reachable from every machine
    # The port on machine 0 where the machines meet (null: accelerate's 29500; 0: any free port, one machine only)
    main_process_port: int | None = None
    # Run under `accelerate launch` even with one process, so that FSDP2 wraps, shards and gathers
    # over a world of one: the sharded code path on a single GPU (or CPU), as `--num-processes 1`
    # in Accelerate would. Off, one process runs the stage directly.
    always_launch: bool = False

    # The variables a launch script (scripts/slurm/) sets for the machine keys: MASTER_ADDR and
    # MASTER_PORT are torch's own (env://), NNODES and NODE_RANK what torchrun and SLURM scripts
    # commonly export. Accelerate itself reads none of them: it takes its config file or its flags.
    MACHINE_ENVIRONMENT = {
        "num_machines": "NNODES",
        "machine_rank": "NODE_RANK",
        "main_process_ip": "MASTER_ADDR",
        "main_process_port": "MASTER_PORT",
    }

    def check(self, at: str) -> None:
        positive(at, num_processes=self.num_processes)
        if self.accelerate_config is not None and not Path(self.accelerate_config).is_file():
            raise ConfigError(f"{at}.accelerate_config: no such file: {self.accelerate_config}")
        self.on_machines(at=at)  # a layout that cannot run (NODE_RANK=2 of 2 machines) fails now, not after launching

    def on_machines(self, environ=None, at: str = "launch") -> LaunchConfig:
        """This config with its machine keys filled in and checked: each key as set, else from the
        environment, else from the accelerate config file, else one machine of rank 0.

        `environ`: the environment to read (os.environ when None). A bad value fails in one line
        naming where it came from, so a wrong NODE_RANK is not mistaken for a wrong config key.
        """
        import os

        environ = os.environ if environ is None else environ
        from_file = self._accelerate_file_machines()
        values: dict = {"num_machines": 1, "machine_rank": 0, "main_process_ip": None, "main_process_port": None}
        where = {key: f"{at}.{key}" for key in values}  # the key, and where its value came from when not from it
        for key, variable in self.MACHINE_ENVIRONMENT.items():
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
            elif environ.get(variable, "").strip():
                values[key], where[key] = environ[variable].strip(), f"{at}.{key} ({variable})"
            elif from_file.get(key) is not None:
                values[key], where[key] = from_file[key], f"{at}.{key} ({self.accelerate_config})"
            if key != "main_process_ip" and values[key] is not None:
                values[key] = self._whole_number(where[key], values[key])
        machines, rank, ip, port = (values[k] for k in self.MACHINE_ENVIRONMENT)
        if machines < 1:
            raise ConfigError(f"{where['num_machines']}: must be at least 1, got {machines}")
        if not 0 <= rank < machines:
            raise ConfigError(
                f"{where['machine_rank']}: {rank} is not a machine: {where['num_machines']} is {machines}, "
                f"so machines are numbered 0 to {machines - 1}"
            )
        if self.num_processes % machines:
            raise ConfigError(
                f"{at}.num_processes: {self.num_processes} does not split evenly over {machines} machines "
                f"({where['num_machines']}); it counts the processes of all machines together: 2 machines "
                "of 8 GPUs are 16"
            )
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"{where['main_process_port']}: {port} is not a port (0 to 65535)")
        if machines > 1 and not ip:
            raise ConfigError(
                f"{at}.main_process_ip: {machines} machines need the address of machine 0 "
                f"(set {at}.main_process_ip or MASTER_ADDR)"
            )
        if machines > 1 and port == 0:
            raise ConfigError(
                f"{where['main_process_port']}: 0 (any free port) works on one machine only; "
                "the other machines must know the port"
            )
        return LaunchConfig(
            num_processes=self.num_processes,
            accelerate_config=self.accelerate_config,
            num_machines=machines,
            machine_rank=rank,
            main_process_ip=ip,
            main_process_port=port,
            always_launch=self.always_launch,
        )

    def _accelerate_file_machines(self) -> dict:
        """The machine keys of the accelerate config file named here (YAML or JSON), {} without one."""
        if self.accelerate_config is None or not Path(self.accelerate_config).is_file():
            return {}
        import yaml

        try:
            content = yaml.safe_load(Path(self.accelerate_config).read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ConfigError(f"{self.accelerate_config}: not a valid accelerate config (YAML or JSON)") from None
        return {k: content.get(k) for k in self.MACHINE_ENVIRONMENT} if isinstance(content, dict) else {}

    @staticmethod
    def _whole_number(at: str, value) -> int:
        """`value` (an int, or an environment variable's text) as an int, or a one-line error naming `at`."""
        if isinstance(value, bool) or not str(value).lstrip("-").isdigit():
            raise ConfigError(f"{at}: expected a whole number, got {value!r}")
        return int(value)


@dataclass
class SampleConfig:
    """Samples printed (and logged) at the end of a run, from held-out prompts."""

    num_prompts: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0

    def check(self, at: str) -> None:
        if self.num_prompts < 0:
            raise ConfigError(f"{at}.num_prompts: must not be negative")
        positive(at, max_new_tokens=self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"{at}.temperature: must not be negative (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{at}.top_p: must be in (0, 1], got {self.top_p}")


# ------------------------------------------------------------------------------------------- stages


@dataclass
class SFTConfig:
    """`rlhfdpo sft`: supervised fine-tuning, loss on response tokens only."""

    output_dir: str = "runs/sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train=[SourceConfig(format="text")]))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def check(self, at: str = "") -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: must not be empty")
        not_for_single_sequences("sft", self.train)
        for section in ("model", "data", "optim", "train", "launch", "sample"):
            getattr(self, section).check(section)
        self.train.accumulation_steps(self.launch.num_processes)
        check_fits("data.max_length", self.model, self.data.max_length, "the longest sequence")


RATING_LEVELS = ("significantly better", "better", "slightly better", "negligibly better")
"""Llama 2's four preference-strength levels, strongest first ("negligibly better / unsure")."""


@dataclass
class PairingConfig:
    samples_per_prompt: int = 4  # k completions per prompt
    strategy: Literal["all", "best_vs_worst"] = "all"  # all k(k-1)/2 pairs, or one per prompt
    min_gap: float = 1e-6  # pairs whose gold scores differ by less are ties: dropped and counted
    # Gold-score gaps at or above which a pair is "significantly better", "better", "slightly
    # better"; smaller gaps are "negligibly better". VADER scores lie in [-1, 1].
    rating_thresholds: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.2])

    def check(self, at: str) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError(f"{at}.samples_per_prompt: at least 2 samples are needed to form a pair")
        if self.min_gap < 0:
            raise ConfigError(f"{at}.min_gap: must not be negative")
        t = self.rating_thresholds
        if len(t) != 3 or not t[0] >= t[1] >= t[2] >= 0:
            raise ConfigError(f"{at}.rating_thresholds: expected three decreasing non-negative gaps, got {t}")


@dataclass
class PairsConfig:
    """`rlhfdpo data pairs`: sample k completions per prompt, score them with the gold reward, pair them."""

    output_dir: str = "runs/pairs"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="runs/sft/model"))
    # Prompt sources: train prompts from `train`, held-out prompts from `eval` (or eval_fraction).
    data: DataConfig = field(
        default_factory=lambda: DataConfig(
            train=[SourceConfig(split="train")], eval=[SourceConfig(split="test")], max_length=128, max_prompt_length=32
        )
    )
    num_train_prompts: int = 2000
    num_eval_prompts: int = 200
    pairing: PairingConfig = field(default_factory=PairingConfig)
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=48, temperature=1.0))
    gold_reward: str = "vader"
    # Label the pairs by this reward model (a reward run's model folder) instead of the gold reward:
    # rejection sampling (best of k by the reward model) and online DPO. The gold reward is still recorded.
    reward_model: str | None = None
    batch_size: int = 64  # prompts per generation batch per process
    seed: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def check(self, at: str = "") -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: must not be empty")
        for section in ("model", "data", "pairing", "sample", "launch"):
            getattr(self, section).check(section)
        if self.reward_model is not None:
            check_reward_model_path("reward_model", self.reward_model)
        if self.model.lora is not None:
            raise ConfigError("model.lora: pairs only samples from the model, it trains nothing; remove it")
        positive("", num_train_prompts=self.num_train_prompts, batch_size=self.batch_size)
        if self.num_eval_prompts < 0:
            raise ConfigError("num_eval_prompts: must not be negative")
        check_gold("gold_reward", self.gold_reward)
        check_fits(
            "sample.max_new_tokens",
            self.model,
            self.data.max_prompt_length + self.sample.max_new_tokens,
            "data.max_prompt_length + sample.max_new_tokens",
        )


def _pair_files() -> DataConfig:
    return DataConfig(
        train=[SourceConfig(path="runs/pairs/train.jsonl", format="prompt_chosen_rejected")],
        eval=[SourceConfig(path="runs/pairs/test.jsonl", format="prompt_chosen_rejected")],
    )


@dataclass
class RewardLossConfig:
    # Where the margin m(r) of Llama 2's margin ranking loss comes from: the pair's rating level
    # through `rating_margins`, the pair's numeric `margin` column (times margin_scale), or nowhere.
    margin: Literal["rating", "column", "none"] = "rating"
    # Llama 2, Table 27 ("margin small"): 1, 2/3, 1/3, 0 from the strongest level down.
    rating_margins: dict[str, float] = field(
        default_factory=lambda: dict(zip(RATING_LEVELS, [1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0]))
    )
    margin_scale: float = 1.0
    center_coef: float = 0.0  # weight of (r_c + r_r)^2, which keeps rewards centred on zero

    def check(self, at: str) -> None:
        unknown = set(self.rating_margins) - set(RATING_LEVELS)
        if unknown:
            name = sorted(unknown)[0]
            close = difflib.get_close_matches(name, RATING_LEVELS, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; levels: {', '.join(RATING_LEVELS)}"
            raise ConfigError(f"{at}.rating_margins.{name}: unknown rating level{hint}")
        if self.center_coef < 0:
            raise ConfigError(f"{at}.center_coef: must not be negative")


@dataclass
class RewardConfig:
    """`rlhfdpo reward`: a Bradley-Terry reward model with a scalar head on the SFT backbone."""

    output_dir: str = "runs/reward"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="runs/sft/model"))
    data: DataConfig = field(default_factory=_pair_files)
    # Llama 2's reward-model recipe: one epoch, cosine to 10%, warmup 3% of steps (at least 5).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, min_warmup_steps=5))
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    # Held-out accuracy is also reported by bins of |r_c - r_r| with these edges.
    gap_bins: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def check(self, at: str = "") -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: must not be empty")
        not_for_pairs("reward", self.train)
        for section in ("model", "data", "optim", "train", "loss", "launch"):
            getattr(self, section).check(section)
        self.train.accumulation_steps(self.launch.num_processes)
        check_fits("data.max_length", self.model, self.data.max_length, "the longest sequence")
        if sorted(self.gap_bins) != self.gap_bins or any(b <= 0 for b in self.gap_bins):
            raise ConfigError(f"gap_bins: expected increasing positive edges, got {self.gap_bins}")


@dataclass
class DPOLossConfig:
    type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # DPO Eq. 7, IPO, SLiC's hinge
    beta: float = 0.1
    label_smoothing: float | None = None  # only "sigmoid": conservative DPO's label-flip rate
    rpo_alpha: float | None = None  # weight of an NLL term on the chosen response (RPO)

    def check(self, at: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{at}.beta: must be positive, got {self.beta}")
        if self.label_smoothing is not None:
            if self.type != "sigmoid":
                raise ConfigError(
                    f"{at}.label_smoothing: only used by type 'sigmoid' (conservative DPO), not '{self.type}'"
                )
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(f"{at}.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ConfigError(f"{at}.rpo_alpha: must not be negative")


@dataclass
class ReferenceConfig:
    # Reference log-probs are computed once, stored here keyed by a hash of the reference weights,
    # the data and the tokenization settings, and reused by every later run (a beta sweep).
    cache_dir: str = ".cache/reference_logps"
    batch_size: int = 32  # sequences per forward pass per process

    def check(self, at: str) -> None:
        positive(at, batch_size=self.batch_size)


@dataclass
class DPOConfig:
    """`rlhfdpo dpo`: direct preference optimisation from the SFT model."""

    output_dir: str = "runs/dpo"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="runs/sft/model"))
    data: DataConfig = field(default_factory=_pair_files)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, min_warmup_steps=10))
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def check(self, at: str = "") -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: must not be empty")
        not_for_pairs("dpo", self.train)
        for section in ("model", "data", "optim", "train", "loss", "reference", "launch", "sample"):
            getattr(self, section).check(section)
        self.train.accumulation_steps(self.launch.num_processes)
        check_fits("data.max_length", self.model, self.data.max_length, "the longest sequence")


@dataclass
class RewardSourceConfig:
    """Where PPO's score comes from: learned reward model(s), or a gold reward function (PPO-GT)."""

    kind: Literal["model", "gold"] = "model"
    # kind "model": one path, or two (helpfulness first, safety second) combined by `combine`.
    models: list[str] = field(default_factory=lambda: ["runs/reward/model"])
    # Llama 2: the safety score where it is below `safety_threshold`, else the helpfulness score.
    combine: Literal["llama2", "weighted"] = "llama2"
    safety_threshold: float = 0.15
    weights: list[float] | None = None  # only for combine "weighted": one weight per model
    normalize: bool = True  # (score - reward_mean) / reward_std with the statistics the reward stage saved
    clip: float | None = None  # clip normalised scores to [-clip, clip]
    gold: str = "vader"  # kind "gold": the gold reward function; otherwise only logged (gold/mean)
    missing_eos_penalty: float | None = None  # added to the score of a response that never reached EOS

    def check(self, at: str) -> None:
        if self.kind == "model":
            if not 1 <= len(self.models) <= 2:
                raise ConfigError(f"{at}.models: expected one reward model, or two (helpfulness, safety)")
            for i, path in enumerate(self.models):
                check_reward_model_path(f"{at}.models.{i}", path)
            if self.weights is not None:
                if self.combine != "weighted":
                    raise ConfigError(f"{at}.weights: only used by combine 'weighted', not '{self.combine}'")
                if len(self.weights) != len(self.models):
                    raise ConfigError(f"{at}.weights: {len(self.weights)} weights for {len(self.models)} models")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"{at}.clip: must be positive")
        check_gold(f"{at}.gold", self.gold)


@dataclass
class KLConfig:
    coef: float = 0.05  # initial (or fixed) coefficient of the per-token KL penalty
    estimator: Literal["k1", "k3"] = "k1"
    target: float | None = None  # per-sequence KL to steer toward (adaptive control, Ziegler et al. 2019)
    horizon: int = 10000  # adaptive control's horizon in rollouts

    def check(self, at: str) -> None:
        if self.coef < 0:
            raise ConfigError(f"{at}.coef: must not be negative")
        if self.target is not None and self.target <= 0:
            raise ConfigError(f"{at}.target: must be positive")
        positive(at, horizon=self.horizon)


@dataclass
class PPOAlgoConfig:
    rollout_batch_size: int = 64  # prompts per rollout, over all processes
    mini_batch_size: int = 16  # rollouts per PPO update, over all processes
    micro_batch_size: int = 16  # rollouts per forward pass in one process
    epochs: int = 4  # PPO epochs over each rollout batch
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    # The advantage estimator: GAE over response tokens with a value model (gamma, lam), or a
    # critic-free one over samples_per_prompt samples of each prompt, with no value model: RLOO's
    # leave-one-out baseline or GRPO's group-normalised reward. The KL penalty is in the reward for all three.
    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    samples_per_prompt: int = 1  # rollouts per prompt (rollout_batch_size counts prompts); rloo and grpo need >= 2
    whiten_advantages: bool = True
    # The value model's learning rate: optim.lr by default, and 100x optim.lr (SHARED_HEAD_LR_SCALE) for
    # value_model: shared, whose head starts from scratch (a value model starts from the reward model).
    value_lr: float | None = None
    # Dropout off in the policy and value models (TRL's default): with it on, the update's log-probs
    # are of a different, noisy network than the rollout's, and the ratio is not 1 before any update.
    disable_dropout: bool = True
    # Where the rollout's log-probs (the ratio's "old" ones and the KL penalty's) come from: "sampler"
    # records them while sampling, which saves the policy a forward pass over every rollout;
    # "recompute" runs that pass (as OpenRLHF does). In float32 the two agree to about 1e-6; in bf16
    # a one-token decode step rounds differently from a whole-sequence pass, so the KL of a policy to
    # its own copy would not start at 0. "auto": the sampler's in float32, recomputed in bf16, and
    # recomputed with value_model: shared, whose values need the policy's pass anyway.
    old_logps: Literal["auto", "sampler", "recompute"] = "auto"
    # The first N iterations train the value function alone, the policy frozen (OpenRLHF's
    # --freezing_actor_steps): a critic that starts from scratch (value_model: shared) learns the
    # returns before its advantages steer the policy. With a shared head, only the head trains then.
    critic_warmup_iterations: int = 0
    # With several samples per prompt, every pass over the rollouts (policy, reference, value, reward
    # models) computes each prompt once for all of its samples in a micro-batch: one row [prompt,
    # response 1, ..., response k], each response attending to the prompt and itself. The same
    # numbers (to float rounding) with fewer tokens; models whose attention takes no mask of ours
    # (flash, flex, sliding windows) read a row per sample instead.
    share_prompt: bool = True

    def check(self, at: str) -> None:
        if self.critic_warmup_iterations < 0:
            raise ConfigError(f"{at}.critic_warmup_iterations: must not be negative")
        if self.critic_warmup_iterations and self.advantage in ("rloo", "grpo"):
            raise ConfigError(f"{at}.critic_warmup_iterations: advantage {self.advantage} trains no critic; remove it")
        positive(
            at,
            rollout_batch_size=self.rollout_batch_size,
            mini_batch_size=self.mini_batch_size,
            micro_batch_size=self.micro_batch_size,
            epochs=self.epochs,
            samples_per_prompt=self.samples_per_prompt,
        )
        rollouts = self.rollout_batch_size * self.samples_per_prompt
        if rollouts % self.mini_batch_size:
            raise ConfigError(
                f"{at}.mini_batch_size: {self.mini_batch_size} does not divide the {rollouts} rollouts of an iteration "
                f"(rollout_batch_size={self.rollout_batch_size} x samples_per_prompt={self.samples_per_prompt})"
            )
        if self.advantage in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ConfigError(
                f"{at}.samples_per_prompt: {self.advantage} compares several samples of each prompt; set it to 2 or more"
            )
        for name in ("clip_range", "value_clip_range", "value_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{at}.{name}: must not be negative")
        in_range(f"{at}.gamma", self.gamma, 0.0, 1.0)
        in_range(f"{at}.lam", self.lam, 0.0, 1.0)


SHARED_VALUE_HEAD = "shared"  # value_model: a head on the policy's trunk, not a model of its own
# A fresh linear head at the policy's learning rate barely moves in a run: on the built-in task at
# optim.lr 3e-5 its explained variance stayed at 0 over 32 iterations (a critic that knows nothing).
SHARED_HEAD_LR_SCALE = 100.0

# The train keys PPO has no use for: it batches rollouts, not a dataset, and does not evaluate.
PPO_UNUSED_TRAIN_KEYS = (
    "epochs",
    "batch_size",
    "micro_batch_size",
    "eval_batch_size",
    "eval_every",
    "group_by_length",
    "packing",
)


@dataclass
class PPOConfig:
    """`rlhfdpo ppo`: PPO against a reward model (or the gold reward) with a KL penalty to the SFT model."""

    output_dir: str = "runs/ppo"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="runs/sft/model"))
    reference: str | None = None  # the KL anchor; defaults to model.name_or_path
    # The value model: a path (its own network), or "shared", a value head on the policy's own trunk
    # (one forward gives log-probs and values; the value loss trains the trunk too). Defaults to
    # the first reward model (kind "model"), or the policy without one.
    value_model: str | None = None
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    data: DataConfig = field(
        default_factory=lambda: DataConfig(
            train=[SourceConfig(split="train")], eval=[SourceConfig(split="test")], max_length=128, max_prompt_length=32
        )
    )
    rollout: SampleConfig = field(default_factory=lambda: SampleConfig(num_prompts=0, max_new_tokens=48))
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_ratio=0.0, schedule="constant"))
    # train.max_steps is the number of rollout-and-update iterations; logging, checkpoints and the
    # seed are as in every stage. Batches are ppo.rollout_batch_size and ppo.mini_batch_size.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, log_every=1, save_every=50))
    sample_table_every: int = 10  # print a table of completions with their scores this often
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def check(self, at: str = "") -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: must not be empty")
        not_for_single_sequences("ppo", self.train)
        for section in ("model", "reward", "data", "rollout", "ppo", "kl", "optim", "train", "launch"):
            getattr(self, section).check(section)
        for name in ("reference", "value_model"):
            if getattr(self, name) and not (name == "value_model" and self.shared_value_head):
                check_model_path(name, getattr(self, name))
        if self.ppo.old_logps == "sampler" and self.shared_value_head:
            raise ConfigError(
                "ppo.old_logps: value_model shared reads its values from the policy's own pass over the rollouts, "
                "which gives the log-probs too; set it to auto or recompute"
            )
        if self.value_model and self.ppo.advantage in ("rloo", "grpo"):
            raise ConfigError(f"value_model: ppo.advantage {self.ppo.advantage} trains no value model; remove it")
        if self.train.max_steps is None:
            raise ConfigError("train.max_steps: PPO needs the number of iterations")
        if self.ppo.critic_warmup_iterations >= self.train.max_steps:
            raise ConfigError(
                f"ppo.critic_warmup_iterations: {self.ppo.critic_warmup_iterations} of the {self.train.max_steps} "
                "iterations (train.max_steps) would leave the policy untrained"
            )
        default = TrainConfig()
        for name in PPO_UNUSED_TRAIN_KEYS:
            if getattr(self.train, name) != getattr(default, name):
                raise ConfigError(
                    f"train.{name}: not used by PPO (its batches are ppo.rollout_batch_size, "
                    "ppo.mini_batch_size and ppo.micro_batch_size); remove it"
                )
        if self.sample_table_every < 0:
            raise ConfigError("sample_table_every: must not be negative")
        world = self.launch.num_processes
        for name in ("rollout_batch_size", "mini_batch_size"):
            if getattr(self.ppo, name) % world:
                raise ConfigError(f"ppo.{name}: {getattr(self.ppo, name)} does not split evenly over {world} processes")
        # The ratio and the KL are of the distribution the rollouts were sampled from: logits / T.
        # Top-p would sample from a truncated distribution whose log-probs no pass computes.
        if self.rollout.temperature <= 0:
            raise ConfigError(
                f"rollout.temperature: PPO samples its rollouts, so it must be positive, got {self.rollout.temperature}"
            )
        if self.rollout.top_p < 1.0:
            raise ConfigError(
                f"rollout.top_p: {self.rollout.top_p} is not supported by PPO (its log-probs are of the whole "
                "tempered distribution, not the top-p one it would sample from); use top_p: 1.0"
            )
        check_fits(
            "rollout.max_new_tokens",
            self.model,
            self.data.max_prompt_length + self.rollout.max_new_tokens,
            "data.max_prompt_length + rollout.max_new_tokens",
        )

    @property
    def reference_path(self) -> str:
        return self.reference or self.model.name_or_path

    @property
    def shared_value_head(self) -> bool:
        return self.value_model == SHARED_VALUE_HEAD

    @property
    def sampler_logps(self) -> bool:
        """Whether the rollout's log-probs are the sampler's (ppo.old_logps) rather than a policy pass's."""
        if self.ppo.old_logps == "auto":
            return self.model.dtype == "float32" and not self.shared_value_head
        return self.ppo.old_logps == "sampler"

    @property
    def value_lr(self) -> float:
        if self.ppo.value_lr is not None:
            return self.ppo.value_lr
        return self.optim.lr * (SHARED_HEAD_LR_SCALE if self.shared_value_head else 1.0)

    @property
    def value_model_path(self) -> str:
        if self.value_model:
            return self.value_model
        return self.reward.models[0] if self.reward.kind == "model" else self.model.name_or_path


@dataclass
class PolicySpec:
    """One trained policy in the comparison: a run directory whose model/ (and checkpoints) are sampled."""

    name: str = "dpo"
    # dpo; ppo, rloo, grpo (PPO with those advantages) against the reward model, ppo_gt against the gold
    # reward, ppo_shared (PPO with value_model: shared, a value head on the policy's trunk); rs (SFT on
    # the reward model's best of k); online_dpo (DPO on pairs the reward model labels from the current
    # policy, in rounds). Methods are compared with each other on the frontier.
    method: Literal["dpo", "ppo", "ppo_gt", "ppo_shared", "rloo", "grpo", "rs", "online_dpo"] = "dpo"
    # The run directory; with several seeds, a pattern with {seed} (runs/dpo/seed-{seed}).
    run: str = "runs/dpo"
    # Runs this method also needed beyond the shared SFT, pairs and reward runs (its own sampled pairs,
    # earlier rounds), with {seed} where they are per seed: their cost counts toward its own.
    inputs: list[str] = field(default_factory=list)

    def run_for(self, seed: int) -> str:
        return self.run.replace("{seed}", str(seed))

    def check(self, at: str, seeds: list[int] | None = None) -> None:
        if not self.name:
            raise ConfigError(f"{at}.name: must not be empty")
        seeds = seeds or [0]
        if len(seeds) > 1 and "{seed}" not in self.run:
            raise ConfigError(
                f"{at}.run: {self.run} names one run, but seeds are {seeds}; write where each seed's run is, "
                "e.g. runs/dpo/seed-{seed}"
            )
        for seed in seeds:
            check_model_path(f"{at}.run", str(Path(self.run_for(seed)) / "model"))


@dataclass
class CompareConfig:
    """`rlhfdpo compare`: sample every policy on the same held-out prompts and score them all."""

    output_dir: str = "runs/compare"
    sft: str = "runs/sft"  # the SFT run: baseline, KL anchor and Best-of-N sampler
    reward: str | None = "runs/reward"  # the reward run: Best-of-N ranking and the proxy's verdicts
    policies: list[PolicySpec] = field(
        default_factory=lambda: [
            PolicySpec("dpo", "dpo", "runs/dpo"),
            PolicySpec("ppo", "ppo", "runs/ppo"),
            PolicySpec("ppo-gt", "ppo_gt", "runs/ppo-gt"),
        ]
    )
    best_of_n: list[int] = field(
        default_factory=lambda: [4, 16]
    )  # Best-of-N from the SFT model, ranked by the reward model
    # Temperatures Best-of-N samples at (N samples per prompt cost N times one); None: every one above 0.
    best_of_n_temperatures: list[float] | None = None
    num_prompts: int = 500  # held-out prompts (the first num_prompts distinct ones)
    prompt_seed: int = 0
    # Where the prompts come from: None means the built-in task's held-out prompts (disjoint from
    # every training prompt); otherwise the eval split of this data section (e.g. IMDb test reviews).
    prompt_data: DataConfig | None = None
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])  # 0 is greedy
    frontier_temperature: float = 1.0  # the reward-vs-KL frontier samples at this temperature
    checkpoints: bool = True  # also put each run's saved checkpoints on the frontier
    max_new_tokens: int = 48
    gold: str = "vader"
    bootstrap_resamples: int = 1000
    batch_size: int = 250  # prompts sampled together
    seed: int = 0  # sampling seed (the same for every method, so samples pair by prompt) and bootstrap seed
    # The training seeds of every policy: each number is a mean over seeds and prompts, its interval
    # from a bootstrap over both (pipeline/uncertainty.py). `rlhfdpo experiment` sets it from its own seeds.
    seeds: list[int] = field(default_factory=lambda: [0])
    samples_per_prompt: int = 1  # completions per prompt and method; a prompt's value is their mean

    def check(self, at: str = "") -> None:
        self.check_settings()
        for i, policy in enumerate(self.policies):
            policy.check(f"policies.{i}", self.seeds)

    def check_settings(self) -> None:
        """Every check but the policies' runs: those a compare needs all of, an evaluation one."""
        check_model_path("sft", str(Path(self.sft) / "model"))
        if self.reward is not None:
            check_reward_model_path("reward", str(Path(self.reward) / "model"))
        elif self.best_of_n:
            raise ConfigError("best_of_n: needs a reward model to rank the samples (reward is null)")
        names = [p.name for p in self.policies]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct seeds, at least one, got {self.seeds}")
        if len(set(names)) != len(names) or "sft" in names:
            raise ConfigError(f"policies: names must be distinct and not 'sft', got {names}")
        if any(n < 2 for n in self.best_of_n):
            raise ConfigError(f"best_of_n: each N must be at least 2, got {self.best_of_n}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError(f"temperatures: expected non-negative values, got {self.temperatures}")
        for t in self.best_of_n_temperatures or []:
            if t not in self.temperatures or t == 0:
                raise ConfigError(
                    f"best_of_n_temperatures: {t} is not a non-zero value of temperatures {self.temperatures}"
                )
        if self.frontier_temperature == 0:
            raise ConfigError(
                "frontier_temperature: greedy decoding (0) has no KL to put on the frontier; use one above 0"
            )
        if self.frontier_temperature not in self.temperatures:
            raise ConfigError(
                f"frontier_temperature: {self.frontier_temperature} is not among temperatures {self.temperatures}"
            )
        positive(
            "",
            num_prompts=self.num_prompts,
            max_new_tokens=self.max_new_tokens,
            bootstrap_resamples=self.bootstrap_resamples,
            batch_size=self.batch_size,
            samples_per_prompt=self.samples_per_prompt,
        )
        check_gold("gold", self.gold)


EVALUATIONS = "evaluations"  # in a compare's output_dir: each run's evaluation, kept for the compare to reuse
EVALUATION_FILE = "evaluation.json"


def evaluation_folder(output_dir: str, unit: str, seed: int | None) -> Path:
    """Where one unit's evaluation is kept: the SFT baselines (seed None) or one policy's run for one seed."""
    folder = Path(output_dir) / EVALUATIONS / unit
    return folder if seed is None else folder / f"seed-{seed}"


@dataclass
class EvaluateConfig(CompareConfig):
    """`rlhfdpo evaluate`: one policy's runs (or the SFT baselines) sampled and scored exactly as
    `rlhfdpo compare` with the same config does, kept in output_dir/evaluations/ for the compare to
    reuse: the experiment evaluates each run as soon as it is trained, beside the runs still training."""

    policy: str = "sft"  # one of policies by name, or sft: the SFT model and Best-of-N from it

    def check(self, at: str = "") -> None:
        names = [p.name for p in self.policies]
        if self.policy != "sft" and self.policy not in names:
            close = difflib.get_close_matches(self.policy, ["sft", *names], n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"policy: '{self.policy}' is not sft or one of policies {names}{hint}")
        self.check_settings()
        if self.policy == "sft":
            return
        index = names.index(self.policy)
        self.policies[index].check(f"policies.{index}", self.seeds)

    @property
    def result_dir(self) -> str:
        """The folder this evaluation leaves its evaluation.json in (with several seeds, their parent)."""
        one_seed = self.seeds[0] if len(self.seeds) == 1 and self.policy != "sft" else None
        return str(evaluation_folder(self.output_dir, self.policy, one_seed))


@dataclass
class InstructionSpec:
    """One instruction for Ghost Attention, with the checks that decide whether a reply follows it."""

    text: str = ""
    short: str | None = None  # a shorter wording, used for short_fraction of the training examples
    sentiment: Literal["positive", "negative"] | None = None  # the sign of VADER's score of the reply
    contains: str | None = None  # a word the reply must contain
    max_words: int | None = None  # the most words a reply may have

    def check(self, at: str) -> None:
        if not self.text.strip():
            raise ConfigError(f"{at}.text: must not be empty")
        if self.contains is not None and (not self.contains.strip() or len(self.contains.split()) > 1):
            raise ConfigError(f"{at}.contains: expected one word, got {self.contains!r}")
        if self.max_words is not None:
            positive(at, max_words=self.max_words)


def _check_dialogues(
    at: str,
    instructions: list[InstructionSpec],
    dialogues: SourceConfig,
    combine: list[int],
    sample: SampleConfig,
    splits: tuple[str, ...],
) -> None:
    """The checks GAtt and its evaluation share: instructions, how they combine, where dialogues come from."""
    if not instructions and dialogues.path != "builtin:dialogues":
        raise ConfigError(f"{at}: name the instructions to keep (only builtin:dialogues has its own)")
    for i, instruction in enumerate(instructions):
        instruction.check(f"{at}.{i}")
    if len(combine) != 2 or not 1 <= combine[0] <= combine[1]:
        raise ConfigError(f"combine: expected [min, max] with 1 <= min <= max, got {combine}")
    if dialogues.format != "messages":
        raise ConfigError(f"dialogues.format: dialogues are read as 'messages', not '{dialogues.format}'")
    if dialogues.fraction != 1.0:
        raise ConfigError("dialogues.fraction: not used here; num_dialogues (or max_rows) says how many are read")
    if sample.num_prompts != SampleConfig().num_prompts:
        raise ConfigError("sample.num_prompts: not used here (every dialogue is sampled); remove it")
    if dialogues.path == "builtin:dialogues" and dialogues.split not in splits:
        raise ConfigError(
            f"dialogues.split: use {' or '.join(repr(x) for x in splits)} of builtin:dialogues here, not "
            f"'{dialogues.split}'"
            + (" (its dialogues already hold instructions)" if dialogues.split in ("train", "test") else "")
        )


def _dialogue_source(split: str) -> SourceConfig:
    return SourceConfig(path="builtin:dialogues", format="messages", split=split)


@dataclass
class GattConfig:
    """`rlhfdpo data gatt`: Ghost Attention data (Llama 2, Sec. 3.3) sampled from a policy."""

    output_dir: str = "runs/gatt/data"
    # The latest RLHF model (a DPO or PPO run's model/): it samples every reply.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="runs/dpo/model"))
    # Multi-turn dialogues in format "messages": their user turns are kept, their replies resampled.
    dialogues: SourceConfig = field(default_factory=lambda: _dialogue_source("gatt"))
    # Instructions to keep for a whole dialogue; empty: the built-in task's (builtin:dialogues only).
    instructions: list[InstructionSpec] = field(default_factory=list)
    combine: list[int] = field(default_factory=lambda: [1, 3])  # instructions given together: [min, max]
    num_dialogues: int = 400
    # Each dialogue is cut to a number of user turns drawn from [min, max] (all it has, if fewer).
    turns: list[int] = field(default_factory=lambda: [1, 3])
    # Share of the training examples whose system message holds the instructions' short wording
    # (Llama 2 had the model shorten them; here each instruction's own `short` text stands in).
    short_fraction: float = 0.5
    # Train only on sampled replies that pass the instructions' checks (unchecked ones always pass).
    only_adherent: bool = True
    max_length: int = 384  # tokens of a dialogue, through its last reply; longer ones stop there
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=32, temperature=0.7))
    batch_size: int = 64  # dialogues sampled together
    seed: int = 0

    def check(self, at: str = "") -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: must not be empty")
        self.model.check("model")
        if self.model.name_or_path == "scratch" or self.model.lora is not None:
            raise ConfigError(
                "model.name_or_path: name the trained policy that samples the replies (no scratch, no lora)"
            )
        self.dialogues.check("dialogues")
        self.sample.check("sample")
        _check_dialogues("instructions", self.instructions, self.dialogues, self.combine, self.sample, ("gatt",))
        if len(self.turns) != 2 or not 1 <= self.turns[0] <= self.turns[1]:
            raise ConfigError(f"turns: expected [min, max] with 1 <= min <= max, got {self.turns}")
        in_range("short_fraction", self.short_fraction, 0.0, 1.0)
        positive("", num_dialogues=self.num_dialogues, max_length=self.max_length, batch_size=self.batch_size)
        check_fits("max_length", self.model, self.max_length, "max_length")
        if self.sample.max_new_tokens >= self.max_length:
            raise ConfigError(f"sample.max_new_tokens: {self.sample.max_new_tokens} leaves no room within max_length")


@dataclass
class ModelSpec:
    name: str = "before"
    path: str = "runs/gatt/dpo/model"

    def check(self, at: str) -> None:
        if not self.name:
            raise ConfigError(f"{at}.name: must not be empty")
        check_model_path(f"{at}.path", self.path)


@dataclass
class AdherenceConfig:
    """`rlhfdpo adherence`: how well models keep a first-turn instruction, turn by turn."""

    output_dir: str = "runs/gatt/adherence"
    # The models compared, on the same dialogues and instructions (first: the model before GAtt).
    models: list[ModelSpec] = field(
        default_factory=lambda: [
            ModelSpec("before", "runs/gatt/chat/model"),
            ModelSpec("after", "runs/gatt/tuned/model"),
        ]
    )
    dialogues: SourceConfig = field(default_factory=lambda: _dialogue_source("heldout"))
    instructions: list[InstructionSpec] = field(default_factory=list)  # empty: the built-in task's
    combine: list[int] = field(default_factory=lambda: [1, 3])
    num_dialogues: int = 200
    turns: int = 6  # every dialogue runs this many turns; at least twice the longest training dialogue
    # Also roll out the first model with no instruction at all: how often replies pass the checks by chance.
    chance_baseline: bool = True
    attention_dialogues: int = 32  # dialogues whose attention on the system message is measured
    max_length: int = 384
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=32, temperature=0.7))
    batch_size: int = 100
    bootstrap_resamples: int = 1000
    seed: int = 0

    def check(self, at: str = "") -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: must not be empty")
        if not self.models:
            raise ConfigError("models: name at least one model")
        for i, spec in enumerate(self.models):
            spec.check(f"models.{i}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names) or "chance" in names:
            raise ConfigError(f"models: names must be distinct and not 'chance', got {names}")
        self.dialogues.check("dialogues")
        self.sample.check("sample")
        _check_dialogues("instructions", self.instructions, self.dialogues, self.combine, self.sample, ("heldout",))
        for i, spec in enumerate(self.models):
            check_fits(f"max_length (models.{i})", ModelConfig(name_or_path=spec.path), self.max_length, "max_length")
        if self.instructions and not any(i.sentiment or i.contains or i.max_words for i in self.instructions):
            raise ConfigError("instructions: none has a check (sentiment, contains, max_words); nothing to measure")
        positive(
            "",
            num_dialogues=self.num_dialogues,
            turns=self.turns,
            max_length=self.max_length,
            batch_size=self.batch_size,
            bootstrap_resamples=self.bootstrap_resamples,
        )
        if self.attention_dialogues < 0:
            raise ConfigError("attention_dialogues: must not be negative")
        if self.sample.max_new_tokens >= self.max_length:
            raise ConfigError(f"sample.max_new_tokens: {self.sample.max_new_tokens} leaves no room within max_length")


# How compare encodes its held-out prompts: the last 64 tokens of a long prompt are kept.
COMPARE_PROMPT_DATA = DataConfig(max_length=256, max_prompt_length=64)


@dataclass
class StepSpec:
    """One stage run of an experiment: a shipped config plus overrides, and the steps it reads."""

    name: str = "sft"
    stage: Literal["sft", "pairs", "reward", "dpo", "ppo", "evaluate", "compare", "gatt", "adherence"] = "sft"
    config: str = "configs/sft.yaml"
    set: list[str] = field(default_factory=list)  # --set overrides, e.g. ["loss.beta=0.5", "output_dir=runs/dpo-b0.5"]
    after: list[str] = field(default_factory=list)  # names of earlier steps whose outputs this one reads
    # Run once per experiment seed, its seed (train.seed or seed) and {seed} in `set` set to it; its output_dir
    # must hold {seed} (output_dir=runs/dpo-b0.1/seed-{seed}). A compare step gets seeds=<the seeds>; a
    # seeded evaluate step, seeds=[<its seed>].
    seeded: bool = False

    def check(self, at: str) -> None:
        if not Path(self.config).is_file():
            raise ConfigError(f"{at}.config: no such file: {self.config}")


@dataclass
class ExperimentConfig:
    """`rlhfdpo experiment`: run stages in order, reusing any whose config and inputs are unchanged."""

    steps: list[StepSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds of every `seeded` step
    # Steps run at once, each as soon as the steps it reads (`after`) are done: on 2 CPU cores two
    # small-model steps of one thread each finish in 0.6 of the time of one after the other; on a
    # machine with GPUs, one step per GPU. Several at once, each step's output goes to
    # experiment.log in its output_dir instead of the terminal.
    jobs: int = 1
    # Each step a fork of one process that imported torch, transformers and the stages once
    # (pipeline/step_server.py): about 5 s less a step than a fresh Python process. false, or on a
    # system other than Linux: a fresh `python -m pipeline.cli` per step.
    fork_steps: bool = True

    def check(self, at: str = "") -> None:
        if not self.steps:
            raise ConfigError("steps: at least one step is needed")
        if self.jobs < 1:
            raise ConfigError(f"jobs: must be at least 1, got {self.jobs}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct seeds, at least one, got {self.seeds}")
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            step.check(f"steps.{i}")
            # an evaluation's folder is named by its policy and seed (evaluation_folder) whatever output_dir is
            per_seed_output = step.stage == "evaluate" or any(
                o.startswith("output_dir=") and "{seed}" in o for o in step.set
            )
            if step.seeded and not per_seed_output:
                raise ConfigError(
                    f"steps.{i}.set: a seeded step writes one run per seed: add output_dir=<folder with {{seed}}>"
                )
            if step.seeded and step.stage in ("compare", "adherence"):
                raise ConfigError(f"steps.{i}.seeded: {step.stage} trains nothing; it reads every seed's runs")
            if step.name in seen:
                raise ConfigError(f"steps.{i}.name: '{step.name}' is used twice")
            for name in step.after:
                if name not in seen:
                    raise ConfigError(f"steps.{i}.after: '{name}' is not an earlier step")
            seen.add(step.name)


STAGES: dict[str, type] = {
    "sft": SFTConfig,
    "pairs": PairsConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "compare": CompareConfig,
    "evaluate": EvaluateConfig,
    "gatt": GattConfig,
    "adherence": AdherenceConfig,
    "experiment": ExperimentConfig,
}


__all__ = [
    "AdherenceConfig",
    "ArchitectureConfig",
    "COMPARE_PROMPT_DATA",
    "CompareConfig",
    "DEFAULT_MIN_SCORE_RATIO",
    "DEFAULT_PROMPT_WORDS",
    "DPOConfig",
    "DPOLossConfig",
    "DataConfig",
    "EVALUATIONS",
    "EVALUATION_FILE",
    "EvaluateConfig",
    "ExperimentConfig",
    "GROUP_BATCHES",
    "GattConfig",
    "InstructionSpec",
    "KLConfig",
    "LaunchConfig",
    "LoraConfig",
    "ModelConfig",
    "ModelSpec",
    "OptimConfig",
    "PPOAlgoConfig",
    "PPOConfig",
    "PPO_UNUSED_TRAIN_KEYS",
    "PairingConfig",
    "PairsConfig",
    "PolicySpec",
    "RATING_LEVELS",
    "ReferenceConfig",
    "RewardConfig",
    "RewardLossConfig",
    "RewardSourceConfig",
    "SFTConfig",
    "SampleConfig",
    "SourceConfig",
    "StepSpec",
    "TrainConfig",
    "evaluation_folder",
]
