"""`rlhfdpo data pairs`: rating levels and pairing by hand, then the pairs of the small pipeline."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from pipeline.config import (
    RATING_LEVELS,
    DataConfig,
    PairingConfig,
    SourceConfig,
)
from pipeline.pairs import make_pairs, rating_level


def test_rating_level_thresholds():
    thresholds = [1.0, 0.5, 0.2]
    assert [rating_level(g, thresholds) for g in (1.5, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1)] == [
        "significantly better",
        "significantly better",
        "better",
        "better",
        "slightly better",
        "slightly better",
        "negligibly better",
    ]


def test_all_pairs_orders_by_score_and_drops_ties():
    pairs, ties = make_pairs("p", ["a", "b", "c", "d"], [0.9, -0.5, 0.9, 0.1], PairingConfig())
    assert ties == 1  # a and c score the same
    assert len(pairs) == 5
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    ab = next(p for p in pairs if {p["chosen"], p["rejected"]} == {"a", "b"})
    assert (ab["chosen"], ab["rejected"], ab["margin"], ab["rating"]) == (
        "a",
        "b",
        pytest.approx(1.4),
        "significantly better",
    )


def test_identical_texts_are_ties_even_with_different_scores():
    pairs, ties = make_pairs("p", ["same", "same"], [0.5, 0.1], PairingConfig())
    assert (pairs, ties) == ([], 1)


def test_best_vs_worst_gives_one_pair():
    pairs, ties = make_pairs("p", ["a", "b", "c"], [0.1, 0.8, -0.3], PairingConfig(strategy="best_vs_worst"))
    assert ties == 0 and len(pairs) == 1
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("b", "c")
    assert pairs[0]["rating"] == "significantly better"


# ------------------------------------------------------------------------------------------ pairs
@pytest.mark.slow
def test_pairs_are_gold_ordered_rated_and_counted(small_pipeline):
    root = small_pipeline["root"]
    rows = [json.loads(line) for line in (root / "pairs" / "train.jsonl").read_text().splitlines()]
    summary = json.loads((root / "pairs" / "summary.json").read_text())
    prompts = summary["train"]["prompts"]
    assert 1000 <= prompts <= 1200  # distinct prefixes of the first 1500 reviews, capped at 1200
    assert summary["train"]["samples"] == 4 * prompts
    assert summary["train"]["pairs"] == len(rows)
    assert summary["train"]["pairs"] + summary["train"]["ties_dropped"] == 6 * prompts  # k(k-1)/2 each
    for row in rows:
        assert row["chosen_score"] > row["rejected_score"]
        assert row["margin"] == pytest.approx(row["chosen_score"] - row["rejected_score"])
        assert row["rating"] in RATING_LEVELS
    assert {r["rating"] for r in rows} == set(RATING_LEVELS)
    strong = [r for r in rows if r["rating"] == "significantly better"]
    assert min(r["margin"] for r in strong) >= 1.0


@pytest.mark.slow
def test_pairs_record_which_responses_finished_and_training_follows_it(small_pipeline):
    from pipeline.data.loading import load_pairs
    from pipeline.data.records import DropLedger
    from pipeline.data.tokenize import tokenize_pair

    root = small_pipeline["root"]
    rows = [json.loads(line) for line in (root / "pairs" / "train.jsonl").read_text().splitlines()]
    summary = json.loads((root / "pairs" / "summary.json").read_text())["train"]
    sides = [row[f"{side}_finished"] for row in rows for side in ("chosen", "rejected")]
    assert all(isinstance(flag, bool) for flag in sides)
    assert 0.0 < summary["finished_fraction"] < 1.0  # 40 new tokens: some reviews end, some are cut
    tokenizer = AutoTokenizer.from_pretrained(root / "sft" / "model")
    data = DataConfig(max_length=128, max_prompt_length=16)
    source = SourceConfig(path=str(root / "pairs" / "train.jsonl"), format="prompt_chosen_rejected")
    pairs, _ = load_pairs(DataConfig(train=[source], eval_fraction=0.0), DropLedger())
    for pair in pairs[:200]:
        tokenized = tokenize_pair(tokenizer, pair, data)
        for side, finished in ((tokenized.chosen, pair.chosen_finished), (tokenized.rejected, pair.rejected_finished)):
            assert (side.input_ids[-1] == tokenizer.eos_token_id) == finished
