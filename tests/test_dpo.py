"""DPO: the loss dispatch by hand, then a run on the small pipeline that must move the gold reward."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import read_metrics, run_ok, sets
from pipeline.config import (
    DataConfig,
    DPOLossConfig,
    ModelConfig,
    SampleConfig,
)
from pipeline.data.builtin_sentiment import heldout_prompts
from pipeline.dpo import preference_loss
from pipeline.evaluation import paired_bootstrap, sample_and_score
from pipeline.judges import gold_reward
from pipeline.models import load_tokenizer


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


@pytest.mark.slow
def test_dpo_starts_at_ln2_and_learns_the_preferences(small_dpo_run):
    metrics = read_metrics(small_dpo_run)
    first = next(m for m in metrics if m.get("step") == 1 and "loss" in m)
    # Policy == reference before the first update: every implicit reward is 0 and the loss ln 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert abs(first["rewards/margins"]) < 1e-3
    final = metrics[-1]
    assert final["eval/rewards/accuracies"] > 0.6
    assert final["eval/rewards/margins"] > 0


@pytest.mark.slow
def test_dpo_raises_the_gold_reward_over_sft(small_pipeline, small_dpo_run):
    prompts = heldout_prompts(200, seed=0)
    sample, data = SampleConfig(max_new_tokens=40, temperature=1.0), DataConfig(max_length=96, max_prompt_length=16)
    gold = gold_reward("vader")
    scores = {}
    for name, path in (("sft", small_pipeline["root"] / "sft" / "model"), ("dpo", small_dpo_run / "model")):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
        scores[name] = sample_and_score(model, tokenizer, prompts, gold, sample, data, seed=1)
    diff, low, high = paired_bootstrap(scores["dpo"].gold, scores["sft"].gold, seed=0)
    assert low > 0, (scores["sft"].mean, scores["dpo"].mean, diff, low, high)


@pytest.mark.slow
def test_a_shared_prompt_gives_the_same_reference_log_probs_and_loss_curve(small_pipeline, small_dpo_run, tmp_path):
    shared = tmp_path / "dpo"
    run_ok(
        "dpo",
        str(small_pipeline["dpo"]),
        *sets(f"output_dir={shared}", f"reference.cache_dir={tmp_path / 'cache'}", "train.share_prompt=true"),
    )
    # The reference pass ran again, one row per pair: the same log-probs as the rows per side cached before.
    (mine,) = (tmp_path / "cache").glob("*.pt")
    (theirs,) = (small_pipeline["root"] / "cache").glob("*.pt")
    mine, theirs = torch.load(mine), torch.load(theirs)
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(mine[side], theirs[side], rtol=0, atol=1e-4)
    curve = lambda run: [(m["step"], m["loss"], m["rewards/margins"]) for m in read_metrics(run) if "loss" in m]  # noqa: E731
    expected, got = curve(small_dpo_run), curve(shared)
    assert [s for s, *_ in got] == [s for s, *_ in expected] and len(got) > 10
    for (_, loss, margin), (_, loss_e, margin_e) in zip(got, expected):
        assert loss == pytest.approx(loss_e, abs=1e-4) and margin == pytest.approx(margin_e, abs=1e-4)
