"""Loading or creating the models every stage needs, and their tokenizers.

A model is either a Hugging Face model (hub id or local `save_pretrained` folder, loaded with the
usual `from_pretrained`) or, for `name_or_path: scratch`, a new GPT-2 of the configured shape with a
byte-level BPE tokenizer trained on the stage's training texts. Both kinds are saved the same way, so
the next stage names the folder and never needs to know which it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from pipeline.config import ArchitectureConfig, ModelConfig, looks_local
from pipeline.errors import InputError
from pipeline.files import weights_problem

EOS = "<|endoftext|>"
PAD = "<|pad|>"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # model.dtype: the compute precision


def is_scratch(model: ModelConfig) -> bool:
    return model.name_or_path == "scratch"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on `texts`: any string stays encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD, padding_side="right"
    )


def create_scratch_model(arch: ArchitectureConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> GPT2LMHeadModel:
    """A new GPT-2; the same seed gives the same weights on every rank."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=arch.n_positions,
        n_embd=arch.n_embd,
        n_layer=arch.n_layer,
        n_head=arch.n_head,
        resid_pdrop=arch.dropout,
        embd_pdrop=arch.dropout,
        attn_pdrop=arch.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def load_tokenizer(model: ModelConfig, path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub or local model, with a pad token guaranteed (the EOS if none).

    A pad token equal to EOS is safe here: every stage scores a sequence at its last attended
    position (`ScalarHead`), never at "the last token that is not pad".
    """
    source = path or model.tokenizer or model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model: ModelConfig, path: str | None = None) -> PreTrainedModel:
    return from_pretrained(
        AutoModelForCausalLM,
        path or model.name_or_path,
        revision=model.revision if path is None else None,
        dtype=torch.float32,  # weights stay float32; model.dtype is the compute precision (launch.shard)
        trust_remote_code=model.trust_remote_code,
    )


def from_pretrained(loader, path: str | Path, **kwargs):
    """`loader.from_pretrained(path)`, with a damaged local folder named in one line, not a traceback."""
    path = str(path)
    local = looks_local(path)
    if local:
        problem = weights_problem(Path(path))
        if problem:
            raise InputError(f"{problem}; re-run the stage that wrote it (or point at another model)")
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        if not local:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: cannot load the model ({first}); re-run the stage that wrote it") from None


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
        if not isinstance(getattr(model, "score", None), torch.nn.Linear):
            raise InputError(f"{type(model).__name__} has no linear `score` head; reward and value models need one")
        self.model = model
        self._no_split_modules = model._no_split_modules

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
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
