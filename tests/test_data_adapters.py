"""Format adapters on hand-written fixtures (every drop reason each can raise) and on the real files."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from pipeline.config import SourceConfig
from pipeline.data.adapters import (
    clean_review,
    conversational_pair,
    hh_rlhf_pair,
    pair_adapter,
    prompt_adapter,
    remap,
    review_prompt,
    sft_adapter,
)
from pipeline.data.records import DataError, Drop, PreferencePair, PromptRecord, SFTExample
from pipeline.data.sources import read_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILE = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
IMDB_FILE = SHARED / "imdb" / "imdb-reviews-sample.csv.gz"

# A chat template small enough to read: every message on its own line after a role tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tag_render(messages: list[dict], add_generation_prompt: bool) -> str:
    """CHAT_TEMPLATE written out in Python, for tests that need no tokenizer."""
    text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def adapt_all(path: Path, make, **source) -> tuple[dict[str, object], dict[str, str]]:
    """(records by row id, drop reason by row id) for every row of a fixture."""
    rows = read_rows(SourceConfig(path=str(path), **source))
    adapt = make(SourceConfig(path=str(path), **source))
    kept, dropped = {}, {}
    for row in rows:
        try:
            kept[row["_id"]] = adapt(row)
        except Drop as drop:
            dropped[row["_id"]] = drop.reason
    return kept, dropped


def pairs(render=None):
    return lambda source: pair_adapter(source, render)


def sfts(render=None):
    return lambda source: sft_adapter(source, render)


def prompts(render=None, seed=0):
    return lambda source: prompt_adapter(source, render, seed)


def fid(name: str, index: int) -> str:
    return f"{name}:{index}"


# ------------------------------------------------------------------------------------- SFT formats


def test_text():
    kept, dropped = adapt_all(FIXTURES / "text.jsonl", sfts(), format="text")
    assert kept == {
        fid("text.jsonl", 0): SFTExample("", "The quick brown fox jumps over the lazy dog.", fid("text.jsonl", 0)),
        fid("text.jsonl", 1): SFTExample("", "A second line of plain text.", fid("text.jsonl", 1)),
    }
    assert dropped == {fid("text.jsonl", 2): "empty response", fid("text.jsonl", 3): "missing field"}


def test_text_remapped_column():
    kept, dropped = adapt_all(FIXTURES / "text.jsonl", sfts(), format="text", columns={"text": "body"})
    assert kept == {fid("text.jsonl", 3): SFTExample("", "no text column here", fid("text.jsonl", 3))}
    assert set(dropped.values()) == {"missing field"}  # the "text" column no longer counts


def test_text_has_no_pairs_or_prompts():
    source = SourceConfig(path="x.jsonl", format="text")
    with pytest.raises(DataError, match="format 'text' holds no preference pairs; use one of hh_rlhf"):
        pair_adapter(source, None)
    with pytest.raises(DataError, match="format 'text' holds no prompts"):
        prompt_adapter(source, None, 0)


def test_prompt_completion():
    path = FIXTURES / "prompt_completion.json"
    kept, dropped = adapt_all(path, sfts(), format="prompt_completion")
    assert kept == {
        "pc-1": SFTExample("Translate 'chat' to English:", " cat", "pc-1"),
        "pc-2": SFTExample("2 + 2 =", " 4", "pc-2"),
    }
    assert dropped == {"pc-3": "empty response", "pc-4": "missing field"}
    kept, _ = adapt_all(path, prompts(), format="prompt_completion")
    assert kept["pc-2"] == PromptRecord("2 + 2 =", "pc-2", reference=" 4")


def test_clean_review():
    assert clean_review("One.<br /><br />Two<br/>three<BR>four  \n five ") == "One. Two three four five"


def test_reviews_as_text_and_prompts():
    path = FIXTURES / "reviews.csv"
    kept, dropped = adapt_all(path, sfts(), format="reviews")
    assert [r.response for r in kept.values()] == [
        "A fine film. The cast is great but the plot drags. Still, worth it.",
        "Dull. Dull.",
    ]
    assert all(r.prompt == "" for r in kept.values())
    assert dropped == {fid("reviews.csv", 2): "empty response"}

    kept, dropped = adapt_all(path, prompts(), format="reviews")
    # "Dull. Dull." has 2 words: nothing would follow a 2-word prompt.
    assert dropped == {fid("reviews.csv", 1): "empty response", fid("reviews.csv", 2): "empty response"}
    (record,) = kept.values()
    assert record.prompt + record.reference == "A fine film. The cast is great but the plot drags. Still, worth it."
    assert 2 <= len(record.prompt.split()) <= 8 and record.reference.startswith(" ")


def test_review_prompt_length_range_and_seed():
    row = {"_id": "r", "review": " ".join(f"w{i}" for i in range(40))}
    lengths = {len(review_prompt({**row, "_id": f"r{i}"}, (3, 5), seed=0).prompt.split()) for i in range(200)}
    assert lengths == {3, 4, 5}
    assert review_prompt(row, (2, 8), 0) == review_prompt(dict(row), (2, 8), 0)
    by_seed = {review_prompt({**row, "_id": f"r{i}"}, (2, 8), 1).prompt for i in range(20)}
    assert by_seed != {review_prompt({**row, "_id": f"r{i}"}, (2, 8), 0).prompt for i in range(20)}
    # A review shorter than the drawn length keeps one word as reference.
    assert review_prompt({"_id": "s", "review": "a b c"}, (2, 8), 0) == PromptRecord("a b", "s", reference=" c")


def test_reviews_prompt_words_from_config():
    rows = [{"_id": str(i), "review": " ".join(["word"] * 30)} for i in range(50)]
    adapt = prompt_adapter(SourceConfig(path="r.csv", format="reviews", prompt_words=[4, 4]), None, 0)
    assert {len(adapt(row).prompt.split()) for row in rows} == {4}


def test_reviews_remapped_columns():
    row = {"_id": "1", "text": "Good<br />film", "label": 1}
    source = SourceConfig(path="r.csv", format="reviews", columns={"review": "text", "sentiment": "label"})
    adapt = sft_adapter(source, None)
    assert adapt(row) == SFTExample("", "Good film", "1")


def test_remap_swaps_and_hides_missing():
    row = {"a": 1, "b": 2, "c": 3}
    assert remap(row, {"a": "b", "b": "a"}) == {"a": 2, "b": 1, "c": 3}
    assert remap(row, {"c": "zzz"}) == {"a": 1, "b": 2}


# ------------------------------------------------------------------------------ preference formats


def test_hh_rlhf_fixture():
    path = FIXTURES / "hh_rlhf.jsonl"
    kept, dropped = adapt_all(path, pairs(), format="hh_rlhf")
    assert kept == {
        fid("hh_rlhf.jsonl", 0): PreferencePair(
            prompt="\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:",
            chosen=" Blue.",
            rejected=" Fish.",
            source_id=fid("hh_rlhf.jsonl", 0),
        )
    }
    assert dropped == {
        fid("hh_rlhf.jsonl", 1): "differing context",
        fid("hh_rlhf.jsonl", 2): "empty response",
        fid("hh_rlhf.jsonl", 3): "chosen equals rejected",
        fid("hh_rlhf.jsonl", 4): "missing field",
        fid("hh_rlhf.jsonl", 5): "missing field",
    }


def test_hh_missing_marker_detail():
    with pytest.raises(Drop, match="'chosen' has no '\\\\n\\\\nAssistant:' turn"):
        hh_rlhf_pair({"_id": "x", "chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"})


def test_prompt_chosen_rejected_csv():
    path = FIXTURES / "prompt_chosen_rejected.csv"
    kept, dropped = adapt_all(path, pairs(), format="prompt_chosen_rejected")
    assert kept == {
        fid("prompt_chosen_rejected.csv", 0): PreferencePair(
            "Name a colour.",
            "Blue.",
            "Fish.",
            fid("prompt_chosen_rejected.csv", 0),
            rating="significantly better",
            margin=1.5,
        ),
        fid("prompt_chosen_rejected.csv", 1): PreferencePair(
            "Name a fruit.", "An apple.", "A chair.", fid("prompt_chosen_rejected.csv", 1)
        ),
    }
    assert dropped == {
        fid("prompt_chosen_rejected.csv", 2): "chosen equals rejected",
        fid("prompt_chosen_rejected.csv", 3): "empty response",
    }


def test_prompt_chosen_rejected_bad_margin_is_missing_field():
    adapt = pair_adapter(SourceConfig(path="p.csv", format="prompt_chosen_rejected"), None)
    with pytest.raises(Drop, match="'margin' is str, not a number") as caught:
        adapt({"_id": "1", "prompt": "p", "chosen": "a", "rejected": "b", "margin": "lots"})
    assert caught.value.reason == "missing field"


def test_preference_formats_give_sft_on_chosen_and_prompts_with_reference():
    path = FIXTURES / "prompt_chosen_rejected.csv"
    sft, _ = adapt_all(path, sfts(), format="prompt_chosen_rejected")
    prompt, _ = adapt_all(path, prompts(), format="prompt_chosen_rejected")
    first = fid("prompt_chosen_rejected.csv", 0)
    assert sft[first] == SFTExample("Name a colour.", "Blue.", first)
    assert prompt[first] == PromptRecord("Name a colour.", first, reference="Blue.")


def test_conversational_fixture():
    kept, dropped = adapt_all(FIXTURES / "conversational.jsonl", pairs(tag_render), format="conversational")
    assert kept == {
        "c-implicit": PreferencePair("<|user|>hi there\n<|assistant|>", "hello friend\n", "go away\n", "c-implicit"),
        "c-explicit": PreferencePair("<|user|>name a colour\n<|assistant|>", "blue\n", "fish\n", "c-explicit"),
    }
    assert dropped == {
        "c-context": "differing context",
        "c-no-assistant": "missing field",
        "c-empty": "empty response",
        "c-equal": "chosen equals rejected",
        "c-not-messages": "missing field",
    }


def test_conversational_prompt_not_a_prefix_is_a_template_mismatch():
    def odd_render(messages, add_generation_prompt):
        """Announces the reply as <|assistant|> but renders the written reply as <|bot|>."""
        text = tag_render(messages, add_generation_prompt)
        return text if add_generation_prompt else text.replace("<|assistant|>", "<|bot|>")

    row = {
        "_id": "x",
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}],
    }
    with pytest.raises(Drop, match="not a prefix of the rendered 'chosen'") as caught:
        conversational_pair(row, odd_render)
    assert caught.value.reason == "template mismatch"


def test_chat_formats_need_a_renderer():
    for fmt in ("conversational", "ultrafeedback"):
        with pytest.raises(DataError, match=f"format '{fmt}' is rendered with the tokenizer's chat template"):
            pair_adapter(SourceConfig(path="c.jsonl", format=fmt), None)


def test_ultrafeedback_fixture():
    kept, dropped = adapt_all(FIXTURES / "ultrafeedback.jsonl", pairs(tag_render), format="ultrafeedback")
    first = fid("ultrafeedback.jsonl", 0)
    assert kept == {
        first: PreferencePair("<|user|>name a colour\n<|assistant|>", "blue\n", "fish\n", first, margin=5.5)
    }
    assert dropped == {fid("ultrafeedback.jsonl", 1): "tie", fid("ultrafeedback.jsonl", 2): "missing field"}


def test_shp_fixture():
    path = FIXTURES / "shp.jsonl"
    kept, dropped = adapt_all(path, pairs(), format="shp")
    assert kept == {
        fid("shp.jsonl", 0): PreferencePair(
            "What is the best way to learn to cook?",
            "Start with eggs; they teach heat control.",
            "Buy a microwave.",
            fid("shp.jsonl", 0),
            margin=math.log(4.0),
        ),
        fid("shp.jsonl", 1): PreferencePair(
            "Why is the sky blue?",
            "Rayleigh scattering favours short wavelengths.",
            "Because it is.",
            fid("shp.jsonl", 1),
            margin=math.log(4.0),
        ),
    }
    assert dropped == {fid("shp.jsonl", 2): "below score ratio", fid("shp.jsonl", 3): "missing field"}
    # A looser threshold keeps the 6-vs-4 pair (ratio 1.5).
    kept, _ = adapt_all(path, pairs(), format="shp", min_score_ratio=1.5)
    assert kept[fid("shp.jsonl", 2)].margin == pytest.approx(math.log(1.5))


def test_conversational_with_a_real_chat_template():
    """The renderer the loader builds from a tokenizer: a PreTrainedTokenizerFast with a Jinja template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    backend.train_from_iterator(["hi there", "hello friend", "go away"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = CHAT_TEMPLATE

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    kept, dropped = adapt_all(FIXTURES / "conversational.jsonl", pairs(render), format="conversational")
    assert kept["c-implicit"] == PreferencePair(
        "<|user|>hi there\n<|assistant|>", "hello friend\n", "go away\n", "c-implicit"
    )
    assert kept["c-explicit"].prompt + kept["c-explicit"].chosen == "<|user|>name a colour\n<|assistant|>blue\n"
    assert len(kept) == 2 and len(dropped) == 5


# ------------------------------------------------------------------------------------- real files

HH_KEPT = 2303
HH_DROPPED = {"differing context": 5, "empty response": 4}
# The five rows whose chosen reply itself holds a "\n\nAssistant:" turn (the model wrote extra turns),
# so the two dialogues no longer agree up to their last assistant marker.
HH_DIFFERING = [1254, 1688, 1950, 1952, 2036]


@pytest.fixture(scope="module")
def hh_rows() -> list[dict]:
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is not there")
    return read_rows(SourceConfig(path=str(HH_FILE), format="hh_rlhf", split="test"))


def test_hh_real_counts(hh_rows):
    kept, dropped = {}, {}
    for i, row in enumerate(hh_rows):
        try:
            kept[i] = hh_rlhf_pair(row)
        except Drop as drop:
            dropped[i] = drop.reason
    assert len(hh_rows) == 2312
    assert len(kept) == HH_KEPT
    assert {r: list(dropped.values()).count(r) for r in set(dropped.values())} == HH_DROPPED
    assert sorted(i for i, r in dropped.items() if r == "differing context") == HH_DIFFERING
    for i, pair in kept.items():
        assert pair.prompt.startswith("\n\nHuman:") and pair.prompt.endswith("\n\nAssistant:")
        assert pair.prompt + pair.chosen == hh_rows[i]["chosen"]
        assert pair.prompt + pair.rejected == hh_rows[i]["rejected"]


def test_hh_real_differing_rows_truly_differ(hh_rows):
    """In each dropped row one reply holds an extra assistant turn, so no single cut fits both sides."""
    for i in HH_DIFFERING:
        chosen, rejected = hh_rows[i]["chosen"], hh_rows[i]["rejected"]
        assert chosen.count("\n\nAssistant:") != rejected.count("\n\nAssistant:")
        assert chosen[: chosen.rfind("\n\nAssistant:")] != rejected[: rejected.rfind("\n\nAssistant:")]


def test_hh_real_file_is_what_the_readme_says():
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is not there")
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert set(first) == {"chosen", "rejected"}


@pytest.fixture(scope="module")
def imdb_rows() -> list[dict]:
    if not IMDB_FILE.is_file():
        pytest.skip(f"{IMDB_FILE} is not there")
    return read_rows(SourceConfig(path=str(IMDB_FILE), format="reviews"))


def test_imdb_real_reviews(imdb_rows):
    assert len(imdb_rows) == 3180
    assert sum("<br" in row["review"] for row in imdb_rows) > 1000  # the raw file is full of them
    adapt_text = sft_adapter(SourceConfig(path=str(IMDB_FILE), format="reviews"), None)
    adapt_prompt = prompt_adapter(SourceConfig(path=str(IMDB_FILE), format="reviews"), None, 0)
    texts = [adapt_text(row) for row in imdb_rows]
    prompts_ = [adapt_prompt(row) for row in imdb_rows]
    assert len(texts) == len(prompts_) == 3180  # every review is long enough to keep
    assert not any("<br" in t.response.lower() for t in texts)
    assert all("  " not in t.response and t.response == t.response.strip() for t in texts)
    lengths = [len(p.prompt.split()) for p in prompts_]
    assert min(lengths) == 2 and max(lengths) == 8
    assert all(p.prompt + p.reference == t.response for p, t in zip(prompts_, texts, strict=True))
    assert not any("<br" in p.prompt.lower() or "<br" in p.reference.lower() for p in prompts_)
    assert [adapt_prompt(row) for row in imdb_rows[:50]] == prompts_[:50]


def test_prompts_carry_an_optional_unsafe_flag():
    from pipeline.config import SourceConfig
    from pipeline.data.adapters import prompt_adapter

    adapt = prompt_adapter(SourceConfig(path="x.jsonl", format="prompt_completion"), None, seed=0)
    assert adapt({"_id": "1", "prompt": "how do I", "completion": " ok", "unsafe": True}).unsafe is True
    assert adapt({"_id": "2", "prompt": "how do I", "completion": " ok"}).unsafe is False
    renamed = prompt_adapter(
        SourceConfig(path="x.jsonl", format="prompt_completion", columns={"unsafe": "is_adversarial"}), None, seed=0
    )
    assert renamed({"_id": "3", "prompt": "p", "completion": " c", "is_adversarial": 1}).unsafe is True
