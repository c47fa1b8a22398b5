"""Tokenizer hygiene for hub models: a pad token distinct from EOS, right padding for training, and
one EOS shared by the sampler, the tokenization and the reward model."""

from __future__ import annotations

import torch

from pipeline.config import ArchitectureConfig, DataConfig, ModelConfig, SampleConfig
from pipeline.data.tokenize import collate, tokenize_example
from pipeline.models import PAD, create_scratch_model, fit_vocabulary, load_tokenizer
from pipeline.sampling import sample


def hub_like(folder, *, unk: bool, padding_side: str = "right"):
    """A saved tokenizer without a pad token: GPT-2's kind (one <|endoftext|> for BOS and EOS) or,
    with `unk`, Llama's (<s>, </s> and <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.builtin_sentiment import load_rows

    specials = ["<s>", "</s>", "<unk>"] if unk else ["<|endoftext|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([row["review"] for row in load_rows("train", 200)], trainer=trainer)
    names = {"bos_token": specials[0], "eos_token": specials[min(1, len(specials) - 1)]}
    if unk:
        names["unk_token"] = "<unk>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side, **names)
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(folder)
    return folder


def hub_model(folder):
    """A model made for the hub-like tokenizer as saved: one embedding row per token, none for a pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token_id = tokenizer.eos_token_id  # create_scratch_model reads a pad id; the rows do not depend on it
    return create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=32), tokenizer, 0)


def test_a_tokenizer_without_pad_gets_a_new_pad_token_and_the_model_grows_to_hold_it(tmp_path, tiny_tokenizer):
    folder = hub_like(tmp_path / "tok", unk=False, padding_side="left")
    model = hub_model(folder)
    rows = model.get_input_embeddings().num_embeddings
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id == rows and len(tokenizer) == rows + 1  # one new token
    assert tokenizer.padding_side == "right"
    old_rows = model.get_input_embeddings().weight.detach().clone()
    fit_vocabulary(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert torch.equal(model.get_input_embeddings().weight[: len(old_rows)], old_rows)  # old tokens untouched
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # Training batches are right-padded with the pad, and the final EOS stays a label.
    examples = [
        tokenize_example(tokenizer, "the", " film", DataConfig()),
        tokenize_example(tokenizer, "a", " long dull film indeed", DataConfig()),
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"][0, short - 1] == tokenizer.eos_token_id == batch["labels"][0, short - 1]
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all() and (
        batch["attention_mask"][0, short:] == 0
    ).all()
    assert batch["attention_mask"][0, 0] == 1  # right padding: real tokens first


def test_an_unknown_token_distinct_from_eos_becomes_the_pad_without_growing_anything(tmp_path):
    folder = hub_like(tmp_path / "tok", unk=True)
    model = hub_model(folder)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    rows = model.get_input_embeddings().num_embeddings
    fit_vocabulary(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == rows


def test_the_sampler_stops_at_the_eos_the_tokenization_appends(tmp_path):
    folder = hub_like(tmp_path / "tok", unk=False)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    model = fit_vocabulary(hub_model(folder), tokenizer)
    prompts = [[tokenizer.bos_token_id]] * 16
    out = sample(model, tokenizer, prompts, SampleConfig(max_new_tokens=200), torch.Generator().manual_seed(0))
    assert any(out.finished)  # an untrained model over ~320 tokens reaches EOS within 200 draws (seeded)
    finished = [seq for seq, done in zip(out.sequences, out.finished) if done]
    for seq in finished:
        assert seq[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in seq[:-1]
    # Training and scoring append that same EOS to a finished response, and none to a cut one.
    for finished in (True, False):
        ids = tokenize_example(tokenizer, "the", " film", DataConfig(), finished=finished).input_ids
        assert (ids[-1] == tokenizer.eos_token_id) == finished
