"""The reward stage: margins by hand, then a reward model trained on the small pipeline's pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from helpers import read_metrics, run_ok, sets
from pipeline.config import (
    RATING_LEVELS,
    RewardConfig,
    RewardLossConfig,
)
from pipeline.data.records import PreferencePair
from pipeline.reward import pair_margin


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


def binomial_upper_tail(successes: int, n: int) -> float:
    """P(X >= successes) for X ~ Binomial(n, 1/2): the one-sided p-value against chance."""
    return sum(math.comb(n, k) for k in range(successes, n + 1)) / 2**n


def one_sided_two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """p-value of the z-test that proportion 1 exceeds proportion 2."""
    pooled = (k1 + k2) / (n1 + n2)
    z = (k1 / n1 - k2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return 0.5 * math.erfc(z / math.sqrt(2))


# ----------------------------------------------------------------------------------------- reward
@pytest.fixture(scope="module")
def reward_run(small_reward_model):
    return small_reward_model


@pytest.mark.slow
def test_reward_model_beats_chance_and_orders_rating_levels(reward_run):
    report = json.loads((reward_run / "eval.json").read_text())
    by_rating = report["by_rating"]
    n = sum(v["pairs"] for v in by_rating.values())
    correct = round(report["metrics"]["eval/accuracy"] * n)
    assert binomial_upper_tail(correct, n) < 1e-6, report["metrics"]
    # Stronger preferences are easier (Llama 2, Table 8): the two strongest levels beat the weakest.
    strong = [by_rating[level] for level in RATING_LEVELS[:2]]
    k_strong = round(sum(v["accuracy"] * v["pairs"] for v in strong))
    n_strong = sum(v["pairs"] for v in strong)
    weak = by_rating[RATING_LEVELS[-1]]
    p = one_sided_two_proportion_p(k_strong, n_strong, round(weak["accuracy"] * weak["pairs"]), weak["pairs"])
    assert p < 0.05, by_rating


@pytest.mark.slow
def test_reward_model_loads_as_sequence_classifier_with_its_statistics(reward_run):
    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(reward_run / "model")
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    metrics = read_metrics(reward_run)[-1]
    assert model.config.reward_mean == pytest.approx(metrics["eval/reward_mean"])
    assert model.config.reward_std == pytest.approx(metrics["eval/reward_std"])


@pytest.mark.slow
def test_reward_score_does_not_change_with_padding(reward_run):
    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_run / "model")
    short = (
        [tokenizer.bos_token_id]
        + tokenizer("the acting is great.", add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
    )
    alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, len(short), dtype=torch.long)).logits
    width = len(short) + 7
    padded = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    padded[0, : len(short)] = torch.tensor(short)
    mask[0, : len(short)] = 1
    longer = [tokenizer.bos_token_id] + tokenizer("the plot drags and the cast is flat", add_special_tokens=False)[
        "input_ids"
    ]
    padded[1, : len(longer[:width])] = torch.tensor(longer[:width])
    mask[1, : len(longer[:width])] = 1
    batched = model(input_ids=padded, attention_mask=mask).logits
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


@pytest.mark.slow
def test_a_shared_prompt_gives_the_same_loss_curve_and_held_out_rewards(small_pipeline, reward_run, tmp_path):
    shared = tmp_path / "reward"
    run_ok("reward", str(small_pipeline["reward"]), *sets(f"output_dir={shared}", "train.share_prompt=true"))
    curve = lambda run: [(m["step"], m["loss"]) for m in read_metrics(run) if "loss" in m]  # noqa: E731
    expected, got = curve(reward_run), curve(shared)
    assert [s for s, _ in got] == [s for s, _ in expected] and len(got) > 1
    for (_, loss), (_, loss_e) in zip(got, expected):
        assert loss == pytest.approx(loss_e, abs=1e-4)
    report, report_e = (json.loads((run / "eval.json").read_text())["metrics"] for run in (shared, reward_run))
    for key in ("eval/loss", "eval/margin", "eval/reward_std"):
        assert report[key] == pytest.approx(report_e[key], abs=1e-4), key
    # A Bradley-Terry loss reads only reward differences, so nothing in it holds the rewards' common
    # level: float rounding moves it freely (the two runs' levels part by ~2e-4 while the loss and the
    # margin agree to 1e-6). PPO reads rewards normalised by the saved mean and std, so the level never
    # reaches a policy.
    assert report["eval/reward_mean"] == pytest.approx(report_e["eval/reward_mean"], abs=1e-3)
    # A pair whose two rewards differ by float rounding may order either way: at most one flips.
    assert report["eval/accuracy"] == pytest.approx(report_e["eval/accuracy"], abs=1.01 / report["eval/pairs"])
