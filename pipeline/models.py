"""Loading or creating the models every stage needs, and their tokenizers.

A model is either a Hugging Face model (hub id or local `save_pretrained` folder, loaded with the
usual `from_pretrained`) or, for `name_or_path: scratch`, a new GPT-2 of the configured shape with a
byte-level BPE tokenizer trained on the stage's training texts. Both kinds are saved the same way, so
the next stage names the folder and never needs to know which it was.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from functools import cache
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

from pipeline.config import ArchitectureConfig, ModelConfig
from pipeline.losses import IGNORE, scatter_response_logps, selected_logps, token_logps

EOS = "<|endoftext|>"
PAD = "<|pad|>"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """The tokenizer of a hub or local model, with a pad token guaranteed (the EOS if none)."""
    source = path or model.tokenizer or model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model: ModelConfig, path: str | None = None) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        path or model.name_or_path,
        revision=model.revision,
        dtype=DTYPES[model.dtype],
        trust_remote_code=model.trust_remote_code,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model, also when it is sharded (a DTensor reports its global size)."""
    return sum(p.numel() for p in model.parameters())


def local_parameter_count(model: torch.nn.Module) -> int:
    """Parameters this process actually holds: its shard under FSDP2, everything otherwise."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def is_model_folder(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def response_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, mask), each (B, T-1): the log-probability of every labelled next token.

    The LM head runs on the labelled positions only (the response, not the prompt or padding)
    where the model takes a boolean `logits_to_keep` (transformers 5); on the rest, the full
    logits are computed and gathered. Both give the same numbers as `token_logps` on full logits.
    """
    kept = labels[:, 1:] != IGNORE  # position t predicts token t+1
    if keeps_logit_positions(type(model)):
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = kept
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        if logits.dim() == 2 and logits.shape[0] == int(kept.sum()):
            return scatter_response_logps(selected_logps(logits, labels[:, 1:][kept]), labels)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return token_logps(logits, labels)


@cache
def keeps_logit_positions(model_class: type) -> bool:
    """Whether the model's forward can run its LM head on chosen positions only (`logits_to_keep`)."""
    from transformers import modeling_utils

    accepts = "logits_to_keep" in inspect.signature(model_class.forward).parameters
    return accepts and hasattr(modeling_utils, "slice_logits_to_keep")
