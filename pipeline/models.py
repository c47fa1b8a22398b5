"""Loading or creating the models every stage needs, and their tokenizers.

A model is either a Hugging Face model (hub id or local `save_pretrained` folder, loaded with the
usual `from_pretrained`, or a LoRA adapter folder on one) or, for `name_or_path: scratch`, a new
GPT-2, Llama or Qwen2 of the configured shape with a byte-level BPE tokenizer, which has a built-in
chat template, trained on the stage's training texts. Both kinds are saved the same way, so the next
stage names the folder and never needs to know which it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from pipeline.config import ArchitectureConfig, ModelConfig, looks_local
from pipeline.errors import InputError
from pipeline.files import weights_problem
from pipeline.lora import ADAPTER_CONFIG

BOS = "<|endoftext|>"
PAD = "<|pad|>"
TURN_START = "<|im_start|>"
EOS = "<|im_end|>"  # the end of a text and of a chat turn: the one token the sampler stops at

# The built-in ChatML-style template of scratch tokenizers: a special token opens each turn and the
# EOS closes it, so that a reply ends where generation stops (Llama 2 likewise ends answers with
# EOS). Nothing follows a turn's EOS, so the rendered prompt is always a prefix of the conversation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """CHAT_TEMPLATE in Python, for rendering before a scratch tokenizer exists (it is trained on the result)."""
    text = "".join(f"{TURN_START}{m['role']}\n{m['content']}{EOS}" for m in messages)
    return text + (f"{TURN_START}assistant\n" if add_generation_prompt else "")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # model.dtype: the compute precision


def is_scratch(model: ModelConfig) -> bool:
    return model.name_or_path == "scratch"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on `texts`: any string stays encodable.

    Pad, BOS and EOS are three distinct tokens, and the chat template's turn markers are special
    tokens, so that no text can spell them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, PAD, TURN_START, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[TURN_START],
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def create_scratch_model(arch: ArchitectureConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A new model of `arch.type` (transformers' own classes); the same seed gives the same weights on every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fuse_activations(AutoModelForCausalLM.from_config(scratch_config(arch, tokenizer)))


def scratch_config(arch: ArchitectureConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch.type == "gpt2":
        return GPT2Config(
            n_positions=arch.n_positions,
            n_embd=arch.n_embd,
            n_layer=arch.n_layer,
            n_head=arch.n_head,
            resid_pdrop=arch.dropout,
            embd_pdrop=arch.dropout,
            attn_pdrop=arch.dropout,
            **special,
        )
    modern = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch.type]
    return modern(
        hidden_size=arch.n_embd,
        intermediate_size=arch.mlp_width,
        num_hidden_layers=arch.n_layer,
        num_attention_heads=arch.n_head,
        num_key_value_heads=arch.kv_heads,
        max_position_embeddings=arch.n_positions,
        rope_theta=arch.rope_theta,
        attention_dropout=arch.dropout,
        tie_word_embeddings=arch.tie_word_embeddings,
        **special,
    )


def load_tokenizer(model: ModelConfig, path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub or local model, with a pad token distinct from EOS and right padding.

    A tokenizer without a pad token (GPT-2, Llama) gets its unknown token as pad when it has one
    distinct from EOS, else a new `<|pad|>` token (the model's embeddings grow to match, see
    `fit_vocabulary`). Padding with EOS would make "the last token that is not pad" skip a real
    final EOS; every stage here scores at the last attended position anyway (`ScalarHead`), but
    a distinct pad keeps a finished response's EOS unambiguous for any tool that reads the data.
    Training batches are right-padded whatever the tokenizer says (`collate`); only the sampler
    left-pads, internally.
    """
    source = path or model.tokenizer or model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token_id
        if unk is not None and unk != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.padding_side = "right"
    return tokenizer


def fit_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Grow the model's embeddings to hold every token id of `tokenizer` (a pad token added to a hub
    tokenizer), and record its pad id; a model that already holds them is left as it is."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_causal_lm(model: ModelConfig, path: str | None = None) -> PreTrainedModel:
    """A hub or local causal LM with float32 weights, its embeddings fitted to its tokenizer's ids."""
    loaded = from_pretrained(
        AutoModelForCausalLM,
        path or model.name_or_path,
        revision=model.revision if path is None else None,
        dtype=torch.float32,  # weights stay float32; model.dtype is the compute precision (launch.shard)
        trust_remote_code=model.trust_remote_code,
        **hub_options(model),
    )
    return fit_vocabulary(loaded, load_tokenizer(model, path))


def hub_options(model: ModelConfig) -> dict:
    """The loading options a user may set beyond the defaults (the attention kernel)."""
    return {"attn_implementation": model.attn_implementation} if model.attn_implementation else {}


def from_pretrained(loader, path: str | Path, **kwargs):
    """`loader.from_pretrained(path)`, with a damaged local folder named in one line, not a traceback.

    A LoRA adapter folder (pipeline/lora.py) loads as its base model with the adapters merged in.
    """
    path = str(path)
    local = looks_local(path)
    if local:
        problem = weights_problem(Path(path))
        if problem:
            raise InputError(f"{problem}; re-run the stage that wrote it (or point at another model)")
        if (Path(path) / ADAPTER_CONFIG).is_file():
            return _from_adapter_folder(loader, path, kwargs)
    try:
        return fuse_activations(loader.from_pretrained(path, **kwargs))
    except (OSError, ValueError, RuntimeError) as err:
        if not local:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: cannot load the model ({first}); re-run the stage that wrote it") from None


# GPT-2's activation, gelu_new, is the tanh approximation of GELU written as eight tensor operations, each a
# pass over the MLP's activations forward and more backward; torch's gelu(approximate="tanh") is the same
# function in one kernel each way (equal to about 1e-7): a 4-layer 128-wide model trains about 7% faster.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def fuse_activations(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with each activation module written as several operations swapped for its one-kernel
    equal (FUSED_ACTIVATIONS), its config saying so, so that a saved copy loads the same way."""
    from transformers.activations import ACT2FN

    config = getattr(model, "config", None)
    for written, fused in FUSED_ACTIVATIONS.items():
        slow = type(ACT2FN[written])
        for module in model.modules():
            for name, child in list(module.named_children()):
                if type(child) is slow:
                    setattr(module, name, ACT2FN[fused])
        for sub in (config, getattr(config, "text_config", None)):
            if getattr(sub, "activation_function", None) == written:
                sub.activation_function = fused
    return model


# from_pretrained's own arguments; the rest (num_labels, pad_token_id) are settings of the model's config.
LOADING_KWARGS = ("config", "dtype", "revision", "trust_remote_code", "attn_implementation")


def _from_adapter_folder(loader, folder: str, kwargs: dict):
    """The base model an adapter folder names (any folder or hub id, even another adapter folder), its adapters merged in.

    The folder's own config.json describes the adapted model (a reward model's head and statistics),
    so the base weights are loaded into that architecture rather than the base's.
    """
    from pipeline.lora import adapter_base, merge_adapters

    base, revision = adapter_base(folder)
    kwargs = {**kwargs, "revision": revision}
    if "config" not in kwargs and (Path(folder) / "config.json").is_file():
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k not in LOADING_KWARGS}
        trust = kwargs.get("trust_remote_code", False)
        kwargs["config"] = AutoConfig.from_pretrained(folder, trust_remote_code=trust, **settings)
    model = from_pretrained(loader, base, **kwargs)
    try:
        return merge_adapters(model, folder)
    except InputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{folder}: cannot load its adapters ({first}); re-run the stage that wrote it") from None


class ScalarHead(torch.nn.Module):
    """A sequence classifier's one-label head on every position: reward model and value model in one.

    `forward` gives a score per position, (B, T): the value model uses them all; a reward is the
    score at the last attended position (`last_scores`). Reading the position from the attention
    mask, not from "the last token that is not pad", keeps a final EOS that equals the pad token
    (hub GPT-2 and Llama tokenizers) in view: a finished response is scored at its EOS, a cut one
    at its last word. Wrapping rather than calling the backbone and head separately keeps both
    inside one module's forward, which FSDP2 needs to gather them.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        score = getattr(model, "score", None)
        # Under LoRA the head trains as a copy (peft's modules_to_save) beside the original; its
        # `weight` and `bias` are the copy's.
        if not isinstance(getattr(score, "original_module", score), torch.nn.Linear):
            raise InputError(f"{type(model).__name__} has no linear `score` head; reward and value models need one")
        self.model = model
        self._no_split_modules = model._no_split_modules

    @property
    def config(self):
        return self.model.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        # The head in float32 even under bf16 autocast: rounded to bf16 (steps of 1/64 near 2.0),
        # close scores would tie, and a tie counts as a wrong preference.
        with torch.autocast(hidden.device.type, enabled=False):
            score = self.model.score
            return torch.nn.functional.linear(
                hidden.float(), score.weight.float(), None if score.bias is None else score.bias.float()
            ).squeeze(-1)  # (B, T)


def last_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score at each row's last attended position: (B, T), (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(dim=-1)  # (B,)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)


def attends_to_every_earlier_position(model) -> bool:
    """Whether every layer is full causal attention (no sliding window, chunk or shared KV): then a
    mask or cache of our own making means to the model what its own would."""
    try:  # transformers before 5 cannot describe its layers, and is left to its own masks and caches
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # pragma: no cover - depends on the installed transformers
        return False
    config = getattr(model, "config", None)
    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError):  # a config this transformers cannot describe per layer
        return False
    return bool(layer_types) and all(kind == "full_attention" for kind in layer_types)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model, also when it is sharded (a DTensor reports its global size)."""
    return sum(p.numel() for p in model.parameters())


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameters this process actually holds: its shard under FSDP2, everything otherwise."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of the model off: nn.Dropout modules and the attention-dropout rates kept as floats."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model
