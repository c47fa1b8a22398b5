"""Token boundaries, masks, EOS and truncation."""

from __future__ import annotations

import pytest

from pipeline.config import DataConfig
from pipeline.data.records import Drop, PreferencePair
from pipeline.data.tokenize import IGNORE, collate, collate_pairs, tokenize_example, tokenize_pair
from pipeline.models import train_tokenizer

TEXTS = ["the movie was great and the cast was superb", "i did not enjoy the plot at all", "what a film"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def data(**kw) -> DataConfig:
    return DataConfig(**{"max_length": 64, "max_prompt_length": 16, **kw})


def test_response_tokens_are_exactly_those_after_the_prompt(tok):
    prompt, response = "the movie", " was great"
    ex = tokenize_example(tok, prompt, response, data())
    assert ex.input_ids[0] == tok.bos_token_id
    assert ex.input_ids[1 : ex.prompt_length] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex.input_ids[ex.prompt_length :] == tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ex.input_ids[ex.prompt_length : -1]) == response


def test_labels_mask_the_prompt_only(tok):
    ex = tokenize_example(tok, "the movie", " was great", data())
    labels = ex.labels
    assert labels[: ex.prompt_length] == [IGNORE] * ex.prompt_length
    assert labels[ex.prompt_length :] == ex.input_ids[ex.prompt_length :]


def test_plain_text_trains_every_token_after_bos(tok):
    ex = tokenize_example(tok, "", "what a film", data())
    assert ex.prompt_length == 1 and ex.input_ids[0] == tok.bos_token_id
    assert ex.labels[1:] == ex.input_ids[1:]


def test_eos_appended_once(tok):
    ex = tokenize_example(tok, "the", f" movie{tok.eos_token}", data())
    assert ex.input_ids.count(tok.eos_token_id) == 1 and tok.bos_token_id != tok.eos_token_id
    assert ex.input_ids[-1] == tok.eos_token_id and ex.input_ids[-2] != tok.eos_token_id


def test_long_prompt_keeps_its_end_by_default(tok):
    prompt = " ".join(["the movie was great"] * 10)
    ex = tokenize_example(tok, prompt, " ok", data(max_prompt_length=8))
    full = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex.prompt_length == 8
    assert ex.input_ids[:8] == full[-8:]
    ex = tokenize_example(tok, prompt, " ok", data(max_prompt_length=8, truncate_prompt="keep_start"))
    assert ex.input_ids[:8] == full[:8]


def test_long_prompt_can_be_dropped_with_a_reason(tok):
    with pytest.raises(Drop) as err:
        tokenize_example(tok, " ".join(["the movie"] * 20), " ok", data(max_prompt_length=8, long_prompts="drop"))
    assert err.value.reason == "prompt too long"


def test_long_response_keeps_its_start_and_loses_eos(tok):
    response = " " + " ".join(["i did not enjoy the plot"] * 10)
    cfg = data(max_length=20, max_prompt_length=8)
    ex = tokenize_example(tok, "what", response, cfg)
    ids = tok(response, add_special_tokens=False)["input_ids"]
    assert len(ex.input_ids) == 20
    assert ex.input_ids[ex.prompt_length :] == ids[: 20 - ex.prompt_length]
    assert tok.eos_token_id not in ex.input_ids[ex.prompt_length :]
    ex = tokenize_example(tok, "what", response, data(max_length=20, max_prompt_length=8, truncate_response="keep_end"))
    assert ex.input_ids[-1] == tok.eos_token_id


def test_collate_pads_right_and_masks_padding(tok):
    a = tokenize_example(tok, "the", " movie was great", data())
    b = tokenize_example(tok, "", "film", data())
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(a.input_ids))
    assert batch["attention_mask"][1].sum() == len(b.input_ids)
    assert (batch["labels"][1, len(b.input_ids) :] == IGNORE).all()
    assert (batch["input_ids"][1, len(b.input_ids) :] == tok.pad_token_id).all()


def test_pairs_share_the_prompt_and_stack_chosen_then_rejected(tok):
    pair = PreferencePair("the movie", " was great", " was not great", "row-1")
    tp = tokenize_pair(tok, pair, data(), margin=0.5)
    assert tp.chosen.input_ids[: tp.chosen.prompt_length] == tp.rejected.input_ids[: tp.rejected.prompt_length]
    batch = collate_pairs([tp, tp], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0, : len(tp.chosen.input_ids)].tolist() == tp.chosen.input_ids
    assert batch["input_ids"][2, : len(tp.rejected.input_ids)].tolist() == tp.rejected.input_ids
    assert batch["margin"].tolist() == [0.5, 0.5]
