"""The built-in review corpus and the VADER gold reward that the sentiment experiment rests on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from statistics import mean

import pytest

from pipeline.data.builtin_sentiment import (
    generate_reviews,
    heldout_prompts,
    load_rows,
    review_prefix,
    train_prompts,
)
from pipeline.judges import GOLD_REWARDS, VaderGold, gold_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def train_rows() -> list[dict]:
    return load_rows("train")


@pytest.fixture(scope="module")
def train_scores(train_rows: list[dict]) -> list[float]:
    return VaderGold()([row["review"] for row in train_rows])


def test_rows_have_the_imdb_columns() -> None:
    rows = generate_reviews(50, seed=3)
    assert all(set(row) == {"id", "review", "sentiment"} for row in rows)
    assert {row["sentiment"] for row in rows} == {"positive", "negative", "neutral"}
    assert len({row["id"] for row in rows}) == 50


def test_generation_is_deterministic_and_ignores_global_random_state() -> None:
    import random

    random.seed(1)
    first = generate_reviews(200, seed=7)
    random.seed(2)
    assert generate_reviews(200, seed=7) == first
    assert generate_reviews(200, seed=8) != first


def test_generation_does_not_depend_on_hash_randomization() -> None:
    code = (
        "import json; from pipeline.data.builtin_sentiment import load_rows; print(json.dumps(load_rows('test', 100)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert json.loads(out.stdout) == load_rows("test", 100)


def test_shorter_outputs_are_prefixes_of_longer_ones() -> None:
    assert generate_reviews(300, seed=5)[:40] == generate_reviews(40, seed=5)
    assert load_rows("train", 500)[:60] == load_rows("train", 60)


def test_splits_differ_and_have_default_sizes() -> None:
    test = load_rows("test")
    assert len(test) == 2000
    assert not {r["review"] for r in test} & {r["review"] for r in load_rows("train", 2000)}


def test_unknown_split_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="test.*train|train.*test"):
        load_rows("validation")


def test_review_prefix_joins_the_first_words() -> None:
    assert review_prefix("i  watched this\nlast weekend.", 3) == "i watched this"
    assert review_prefix("short one", 8) == "short one"


def test_prompts_are_short_distinct_deterministic_prefixes() -> None:
    train = train_prompts(300, seed=0)
    heldout = heldout_prompts(100, seed=0)
    for prompts in (train, heldout):
        assert len(set(prompts)) == len(prompts)
        assert all(2 <= len(p.split()) <= 8 for p in prompts)
    assert train == train_prompts(300, seed=0)
    assert heldout == heldout_prompts(100, seed=0)
    assert train_prompts(50, seed=0) == train[:50]


def test_heldout_prompts_begin_no_train_review(train_rows: list[dict]) -> None:
    heldout = heldout_prompts(200, seed=0)
    train_prefixes = {review_prefix(r["review"], k) for r in train_rows for k in range(2, 9)}
    assert not set(heldout) & train_prefixes
    assert not set(heldout) & set(train_prompts(5000, seed=0))


def test_corpus_gold_reward_is_centred_and_spread(train_scores: list[float]) -> None:
    n = len(train_scores)
    assert n == 20000
    assert abs(mean(train_scores)) < 0.1
    assert sum(s < -0.5 for s in train_scores) / n >= 0.10
    assert sum(s > 0.5 for s in train_scores) / n >= 0.10
    assert sum(-0.5 <= s <= 0.5 for s in train_scores) / n >= 0.15


def test_reviews_are_short_and_use_negation_and_contrast(train_rows: list[dict]) -> None:
    reviews = [r["review"] for r in train_rows]
    lengths = [len(r.split()) for r in reviews]
    assert sum(10 <= n <= 60 for n in lengths) / len(lengths) > 0.99
    assert any("not " in r for r in reviews)
    assert any(" but " in r for r in reviews)
    assert len({w for r in reviews[:5000] for w in r.lower().split()}) < 1500


def test_prompts_are_mostly_sentiment_neutral() -> None:
    scores = VaderGold()(heldout_prompts(200, seed=0))
    assert sum(abs(s) < 0.05 for s in scores) / len(scores) > 0.7


@pytest.mark.parametrize(
    ("text", "expected"),
    [("this movie is great", 0.6249), ("this movie is terrible", -0.4767), ("it runs about two hours", 0.0)],
)
def test_vader_gold_on_known_sentences(text: str, expected: float) -> None:
    assert VaderGold()([text]) == pytest.approx([expected], abs=1e-4)


def test_vader_understands_negation() -> None:
    not_bad, bad = VaderGold()(["not bad at all", "bad"])
    assert not_bad > 0 > bad


def test_gold_reward_registry() -> None:
    assert gold_reward("vader").name == "vader"
    assert set(GOLD_REWARDS) >= {"vader"}
    with pytest.raises(ValueError, match="vader"):
        gold_reward("nope")
