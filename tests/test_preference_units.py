"""Pair building, reward margins, DPO loss dispatch and their config checks."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import (
    RATING_LEVELS,
    ConfigError,
    DPOConfig,
    DPOLossConfig,
    PairingConfig,
    RewardConfig,
    RewardLossConfig,
    load_config,
)
from pipeline.data.records import PreferencePair
from pipeline.dpo import preference_loss
from pipeline.pairs import make_pairs, rating_level
from pipeline.reward import pair_margin


def test_rating_level_thresholds():
    thresholds = [1.0, 0.5, 0.2]
    assert [rating_level(g, thresholds) for g in (1.5, 1.0, 0.7, 0.5, 0.3, 0.2, 0.1)] == [
        "significantly better", "significantly better", "better", "better",
        "slightly better", "slightly better", "negligibly better",
    ]


def test_all_pairs_orders_by_score_and_drops_ties():
    pairs, ties = make_pairs("p", ["a", "b", "c", "d"], [0.9, -0.5, 0.9, 0.1], PairingConfig())
    assert ties == 1  # a and c score the same
    assert len(pairs) == 5
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    ab = next(p for p in pairs if {p["chosen"], p["rejected"]} == {"a", "b"})
    assert (ab["chosen"], ab["rejected"], ab["margin"], ab["rating"]) == ("a", "b", pytest.approx(1.4), "significantly better")


def test_identical_texts_are_ties_even_with_different_scores():
    pairs, ties = make_pairs("p", ["same", "same"], [0.5, 0.1], PairingConfig())
    assert (pairs, ties) == ([], 1)


def test_best_vs_worst_gives_one_pair():
    pairs, ties = make_pairs("p", ["a", "b", "c"], [0.1, 0.8, -0.3], PairingConfig(strategy="best_vs_worst"))
    assert ties == 0 and len(pairs) == 1
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("b", "c")
    assert pairs[0]["rating"] == "significantly better"


def test_reward_margin_sources():
    pair = PreferencePair("p", "c", "r", "id", rating="better", margin=0.8)
    cfg = RewardConfig()
    assert pair_margin(pair, cfg) == pytest.approx(2 / 3)  # Llama 2's "margin small" for "better"
    cfg.loss = RewardLossConfig(margin="column", margin_scale=2.0)
    assert pair_margin(pair, cfg) == pytest.approx(1.6)
    cfg.loss = RewardLossConfig(margin="none")
    assert pair_margin(pair, cfg) == 0.0
    cfg.loss = RewardLossConfig()
    assert pair_margin(PreferencePair("p", "c", "r", "id"), cfg) == 0.0  # unrated pairs get no margin


def test_unknown_rating_level_in_margin_map_is_rejected(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("model: {name_or_path: gpt2}\nloss:\n  rating_margins: {significantly beter: 1.0}\n")
    with pytest.raises(ConfigError, match=r"loss\.rating_margins\.significantly beter: unknown rating level; did you mean 'significantly better'"):
        load_config(RewardConfig, path)


@pytest.mark.parametrize("variant", ["ipo", "hinge"])
def test_option_a_dpo_variant_does_not_use_is_rejected(tmp_path, variant):
    path = tmp_path / "dpo.yaml"
    path.write_text(f"model: {{name_or_path: gpt2}}\nloss: {{type: {variant}, label_smoothing: 0.1}}\n")
    with pytest.raises(ConfigError, match=rf"loss\.label_smoothing: only used by type 'sigmoid'.*not '{variant}'"):
        load_config(DPOConfig, path)


def test_preference_loss_dispatch_by_hand():
    """h = (pc - rc) - (pr - rr) = (-1 - -2) - (-3 - -2) = 2, beta = 0.5, beta*h = 1.

    sigmoid: -log sigma(1) = 0.313262; ipo: (2 - 1)^2 = 1; hinge: max(0, 1 - 1) = 0.
    RPO adds alpha * (-pc / |y_c|) = 0.5 * (1 / 4) = 0.125.
    """
    pc, pr, rc, rr = (torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0))
    lengths = torch.tensor([4])
    expect = {"sigmoid": 0.313262, "ipo": 1.0, "hinge": 0.0}
    for variant, value in expect.items():
        loss = preference_loss(DPOLossConfig(type=variant, beta=0.5), pc, pr, rc, rr, lengths)
        assert loss.item() == pytest.approx(value, abs=1e-6)
        with_rpo = preference_loss(DPOLossConfig(type=variant, beta=0.5, rpo_alpha=0.5), pc, pr, rc, rr, lengths)
        assert with_rpo.item() == pytest.approx(value + 0.125, abs=1e-6)
    smoothed = preference_loss(DPOLossConfig(beta=0.5, label_smoothing=0.1), pc, pr, rc, rr, lengths)
    assert smoothed.item() == pytest.approx(0.9 * 0.313262 + 0.1 * 1.313262, abs=1e-6)


def test_rating_levels_are_llama2s_four():
    assert RATING_LEVELS == ("significantly better", "better", "slightly better", "negligibly better")
    assert math.isclose(RewardLossConfig().rating_margins["slightly better"], 1 / 3)


def test_prompts_carry_an_optional_unsafe_flag():
    from pipeline.config import SourceConfig
    from pipeline.data.adapters import prompt_adapter

    adapt = prompt_adapter(SourceConfig(path="x.jsonl", format="prompt_completion"), None, seed=0)
    assert adapt({"_id": "1", "prompt": "how do I", "completion": " ok", "unsafe": True}).unsafe is True
    assert adapt({"_id": "2", "prompt": "how do I", "completion": " ok"}).unsafe is False
    renamed = prompt_adapter(SourceConfig(path="x.jsonl", format="prompt_completion", columns={"unsafe": "is_adversarial"}), None, seed=0)
    assert renamed({"_id": "3", "prompt": "p", "completion": " c", "is_adversarial": 1}).unsafe is True
