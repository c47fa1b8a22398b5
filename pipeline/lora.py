"""LoRA through peft: low-rank adapters on a model's linear layers, the only weights that train.

`model.lora` turns it on in sft, reward, dpo and ppo. The adapters are injected into the Hugging
Face model in place (peft's `inject_adapter_in_model`), not wrapped in a `PeftModel`: a stage keeps
the model class it loaded, so sharding, `logits_to_keep`, sampling and the reward head work as
without LoRA. Only the adapters, and a reward or value model's `score` head (peft's
`modules_to_save`: a new head must learn in full), have requires_grad, so only they reach the
optimizer.

On disk a model trained with LoRA is an adapter folder in peft's format: `adapter_config.json`,
whose `base_model_name_or_path` names the model the adapters apply to, and
`adapter_model.safetensors`; beside them the model's own `config.json` (every stage checks a model
folder by it, and a reward model keeps its `reward_mean`/`reward_std` there) and the tokenizer.
`models.from_pretrained` knows the folder by `adapter_config.json` and loads the base (itself a
model folder, a hub id or another adapter folder) with the adapters merged into its weights, so a
later stage names it like any model. With `lora.save_merged: true` a stage's `model/` is the
merged model instead, and the adapters go to `model-adapter/` beside it.

peft is imported inside the functions that need it: it costs seconds of start-up, and a run without
LoRA never needs it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.config import ConfigError, ModelConfig, looks_local
from pipeline.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER = "default"  # peft's name for the one adapter a model carries here
# What peft's adapter files call the adapted model (the PeftModel wrapper's names): files written
# with it load with `PeftModel.from_pretrained` and transformers' `load_adapter` too.
PEFT_PREFIX = "base_model.model."
HEAD = "score"  # the one-label head of a reward or value model (transformers' sequence classifiers)


# ----------------------------------------------------------------------------------- on disk


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> tuple[str, str | None]:
    """(the model an adapter folder's adapters apply to, its hub revision), read from adapter_config.json."""
    file = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{file}: cannot be read as an adapter config; re-run the stage that wrote it") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise InputError(f"{file}: names no base model (base_model_name_or_path) for its adapters to apply to")
    if looks_local(base) and not Path(base).expanduser().exists():
        raise InputError(
            f"{folder}: its adapters apply to {base}, which is not there; the base model must stay where it "
            "was trained (model.lora.save_merged: true saves a model that needs no base)"
        )
    return base, config.get("revision")


def write_adapter_folder(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """peft's adapter folder for `model` from `state`, its state dict (gathered), plus its config.json."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.inference_mode = True  # as peft writes it: a loaded adapter is frozen unless asked otherwise
    weights = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER, save_embedding_layers=False)
    save_file(
        {PEFT_PREFIX + name: tensor.contiguous() for name, tensor in weights.items()},
        folder / ADAPTER_WEIGHTS,
        metadata={"format": "pt"},
    )
    config.save_pretrained(folder)
    # As transformers' save_pretrained records it: the class that reads these weights (a reward model
    # adapted from a causal LM is a sequence classifier, which the stages that load it check).
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(folder)


def merged_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's state dict, each adapted weight W replaced by W + (alpha / r) B A.

    `state` is `model`'s own (gathered from its shards), so the live model is never touched: merging
    in place and back would not restore W bit for bit. GPT-2's Conv1D keeps W as (in, out), hence
    the transpose (peft's `fan_in_fan_out`).
    """
    from peft.tuners import lora as peft_lora
    from peft.utils import ModulesToSaveWrapper

    state = dict(state)
    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, peft_lora.Linear):
            a = state.pop(f"{name}.lora_A.{ADAPTER}.weight")  # (r, in)
            b = state.pop(f"{name}.lora_B.{ADAPTER}.weight")  # (out, r)
            delta = (b @ a) * module.scaling[ADAPTER]  # (out, in)
            weight = state.pop(f"{name}.base_layer.weight")
            merged[f"{name}.weight"] = weight + (delta.T if module.fan_in_fan_out else delta)
            if f"{name}.base_layer.bias" in state:
                merged[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
        elif isinstance(module, ModulesToSaveWrapper):
            for key in [k for k in state if k.startswith(f"{name}.")]:
                tensor = state.pop(key)
                trained = f"{name}.modules_to_save.{ADAPTER}."
                if key.startswith(trained):
                    merged[f"{name}.{key[len(trained) :]}"] = tensor
    left = [k for k in state if ".lora_" in k or ".base_layer." in k or ".modules_to_save." in k]
    if left:
        raise ValueError(f"cannot merge the adapters: no rule for {', '.join(left[:3])}")
    return merged | state


# ------------------------------------------------------------------------------ adding adapters


def add_lora(
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    resume_from: Path | None = None,
    head: bool = False,
    base: str | None = None,
) -> torch.nn.Module:
    """`model` with trainable LoRA adapters, new or (resuming) those of a checkpoint's adapter folder.

    `model` is the base as the stage loaded it, from `base` (default `model_cfg.name_or_path`), which
    the adapter folder will name; without `model.lora` it is returned as it is. `head`: a reward or
    value model, whose `score` head also trains.
    """
    lora = model_cfg.lora
    if lora is None:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    from peft.tuners import lora as peft_lora
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if base is None:
        base, revision = model_cfg.name_or_path, model_cfg.revision
    else:
        revision = None
    if base == "scratch":
        raise ConfigError(
            "model.lora: a model created from scratch has no trained weights to adapt; train it in full "
            "(model.lora: null), then put adapters on the saved model"
        )
    if resume_from is not None:
        _attach(model, resume_from, trainable=True)
    else:
        targets = lora.target_modules
        if "all-linear" in targets and len(targets) > 1:
            raise ConfigError("model.lora.target_modules: 'all-linear' already names every linear layer; use it alone")
        config = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else list(targets),
            # GPT-2's Conv1D layers store W transposed; saying so spares peft's warning on each of them
            fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()),
            modules_to_save=[HEAD] if head else None,
            task_type="SEQ_CLS" if head else "CAUSAL_LM",
            base_model_name_or_path=_base_name(base),
            revision=revision,
        )
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        except ValueError as err:
            raise ConfigError(f"model.lora.target_modules: {_first_line(err)}") from None
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not isinstance(module, peft_lora.Linear | ModulesToSaveWrapper):
            raise ConfigError(
                f"model.lora.target_modules: {name} is a {type(module.get_base_layer()).__name__}; "
                "adapters go on linear layers only"
            )
    return model


def merge_adapters(model: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """`model` (the base) with the adapters of `folder` merged into its weights: a plain model again.

    Every parameter trains again, as in any freshly loaded model (peft froze the base to add them).
    """
    merged = _attach(model, folder, trainable=False).merge_and_unload()
    return merged.requires_grad_(True)


def _attach(model: torch.nn.Module, folder: str | Path, trainable: bool):
    """Inject the adapters of `folder` into `model` and load their weights (peft's `LoraModel` for them)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import LoraModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftLoraConfig.from_pretrained(str(folder))
    config.inference_mode = not trainable
    tuner = LoraModel(model, config, ADAPTER)  # injects the adapter layers into `model` in place
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(Path(folder) / ADAPTER_WEIGHTS).items()}
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
    # Without this check a mismatch would load silently as fresh adapters (B = 0): the base model.
    missing = [k for k in result.missing_keys if f".{ADAPTER}." in k and (".lora_" in k or ".modules_to_save." in k)]
    unexpected = [k for k in result.unexpected_keys if ".lora_" in k or ".modules_to_save." in k]
    if missing or unexpected:
        raise InputError(
            f"{folder}: its adapters do not fit the model {config.base_model_name_or_path} "
            f"({'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}); re-run the stage that wrote it"
        )
    return tuner


def _base_name(name_or_path: str) -> str:
    """A local base is recorded by its absolute path, so the adapters find it from any working directory."""
    return str(Path(name_or_path).expanduser().resolve()) if looks_local(name_or_path) else name_or_path


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------------------ using adapters


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether LoRA adapters are in `model`: peft marks the module it injected them into with `peft_config`."""
    return any(getattr(m, "peft_config", None) for m in model.modules())


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` computing as the base it was adapted from (a no-op for a model without adapters).

    This is how DPO and PPO get their reference from the policy itself: no second copy. Only peft's
    forward switch is flipped; its `disable_adapter_layers` would also turn requires_grad off and on
    around every reference pass, changing what counts as trainable under FSDP2's feet.
    """
    if not has_adapters(model):
        yield model
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer | ModulesToSaveWrapper)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False


def trainable_parameter_count(model: torch.nn.Module) -> int:
    """Parameters the optimizer updates (the whole model's, also when sharded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_merged(model_cfg: ModelConfig) -> bool:
    """Whether the final model is saved merged (with the adapters beside it) rather than as adapters."""
    return model_cfg.lora is not None and model_cfg.lora.save_merged


def adapter_sibling(folder: Path) -> Path:
    """Where the adapters go when `folder` holds the merged model: model/ -> model-adapter/."""
    return folder.with_name(f"{folder.name}-adapter")


def lora_summary(model_cfg: ModelConfig, model: torch.nn.Module) -> str:
    """What trains, for a stage's opening line: '' in full fine-tuning."""
    if model_cfg.lora is None:
        return ""
    trained, total = trainable_parameter_count(model), sum(p.numel() for p in model.parameters())
    return f"; LoRA r={model_cfg.lora.r}: {trained / 1e6:.3f}M of {total / 1e6:.2f}M parameters train ({100 * trained / total:.2f}%)"
