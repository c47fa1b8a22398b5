"""Pairs, reward model and DPO on a small real pipeline: outputs, behaviour, cache, sharding."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import read_metrics, run_cli
from pipeline.config import RATING_LEVELS, DataConfig, ModelConfig, SampleConfig, SourceConfig
from pipeline.data.builtin_sentiment import heldout_prompts
from pipeline.evaluation import paired_bootstrap, sample_and_score
from pipeline.judges import gold_reward
from pipeline.models import load_tokenizer

pytestmark = pytest.mark.slow


def binomial_upper_tail(successes: int, n: int) -> float:
    """P(X >= successes) for X ~ Binomial(n, 1/2): the one-sided p-value against chance."""
    return sum(math.comb(n, k) for k in range(successes, n + 1)) / 2**n


def one_sided_two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """p-value of the z-test that proportion 1 exceeds proportion 2."""
    pooled = (k1 + k2) / (n1 + n2)
    z = (k1 / n1 - k2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return 0.5 * math.erfc(z / math.sqrt(2))


def run_ok(*args: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------ pairs


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


# ----------------------------------------------------------------------------------------- reward


@pytest.fixture(scope="module")
def reward_run(small_reward_model):
    return small_reward_model


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


def test_reward_model_loads_as_sequence_classifier_with_its_statistics(reward_run):
    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(reward_run / "model")
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    metrics = read_metrics(reward_run)[-1]
    assert model.config.reward_mean == pytest.approx(metrics["eval/reward_mean"])
    assert model.config.reward_std == pytest.approx(metrics["eval/reward_std"])


def test_reward_score_does_not_change_with_padding(reward_run):
    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_run / "model")
    short = [tokenizer.bos_token_id] + tokenizer("the acting is great.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, len(short), dtype=torch.long)).logits
    width = len(short) + 7
    padded = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    padded[0, : len(short)] = torch.tensor(short)
    mask[0, : len(short)] = 1
    longer = [tokenizer.bos_token_id] + tokenizer("the plot drags and the cast is flat", add_special_tokens=False)["input_ids"]
    padded[1, : len(longer[:width])] = torch.tensor(longer[:width])
    mask[1, : len(longer[:width])] = 1
    batched = model(input_ids=padded, attention_mask=mask).logits
    assert batched[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


# -------------------------------------------------------------------------------------------- DPO


@pytest.fixture(scope="module")
def dpo_run(small_pipeline):
    run_ok("dpo", str(small_pipeline["dpo"]))
    return small_pipeline["root"] / "dpo"


def test_dpo_starts_at_ln2_and_learns_the_preferences(dpo_run):
    metrics = read_metrics(dpo_run)
    first = next(m for m in metrics if m.get("step") == 1 and "loss" in m)
    # Policy == reference before the first update: every implicit reward is 0 and the loss ln 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert abs(first["rewards/margins"]) < 1e-3
    final = metrics[-1]
    assert final["eval/rewards/accuracies"] > 0.6
    assert final["eval/rewards/margins"] > 0


def test_dpo_raises_the_gold_reward_over_sft(small_pipeline, dpo_run):
    prompts = heldout_prompts(200, seed=0)
    sample, data = SampleConfig(max_new_tokens=40, temperature=1.0), DataConfig(max_length=96, max_prompt_length=16)
    gold = gold_reward("vader")
    scores = {}
    for name, path in (("sft", small_pipeline["root"] / "sft" / "model"), ("dpo", dpo_run / "model")):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
        scores[name] = sample_and_score(model, tokenizer, prompts, gold, sample, data, seed=1)
    diff, low, high = paired_bootstrap(scores["dpo"].gold, scores["sft"].gold, seed=0)
    assert low > 0, (scores["sft"].mean, scores["dpo"].mean, diff, low, high)


def test_reference_cache_is_reused_and_invalidated(small_pipeline, dpo_run, tmp_path):
    root = small_pipeline["root"]
    cache = root / "cache"
    files = set(cache.iterdir())
    assert len(files) == 1
    quick = ["--set", "train.max_steps=1", "--set", f"output_dir={tmp_path / 'run'}", "--overwrite"]
    reference_passes = lambda: json.loads((tmp_path / "run" / "cost.json").read_text())["forward_passes"].get("reference", 0)  # noqa: E731

    run_ok("dpo", str(small_pipeline["dpo"]), *quick, "--set", "loss.beta=0.5")  # a beta sweep point
    assert read_metrics(tmp_path / "run")[0]["reference_cache_hit"] is True
    assert set(cache.iterdir()) == files
    assert reference_passes() == 0  # the reference model never ran

    run_ok("dpo", str(small_pipeline["dpo"]), *quick, "--set", "data.train.0.max_rows=2000")  # other data
    assert read_metrics(tmp_path / "run")[0]["reference_cache_hit"] is False
    assert len(set(cache.iterdir())) == 2
    # One reference forward per batch of 32 pairs (train and eval together), no more.
    n_pairs = 2000 + sum(1 for _ in (root / "pairs" / "test.jsonl").open())
    assert 0 < reference_passes() <= -(-n_pairs // 32)

    changed = tmp_path / "reference"
    shutil.copytree(root / "sft" / "model", changed)
    weights = load_file(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    run_ok("dpo", str(small_pipeline["dpo"]), *quick, "--set", f"model.name_or_path={changed}")  # other reference
    assert read_metrics(tmp_path / "run")[0]["reference_cache_hit"] is False
    assert len(set(cache.iterdir())) == 3


# ------------------------------------------------------------------------------------ two processes


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_two_processes_follow_the_one_process_loss_curve(small_pipeline, stage, tmp_path):
    short = ["--set", "train.max_steps=4", "--set", "train.log_every=1", "--set", "data.train.0.max_rows=600"]
    if stage == "dpo":
        short += ["--set", f"reference.cache_dir={tmp_path / 'cache'}"]
    losses = {}
    for n in (1, 2):
        out = tmp_path / f"{stage}-{n}"
        run_ok(stage, str(small_pipeline[stage]), *short, "--set", f"output_dir={out}", "--num-processes", str(n))
        losses[n] = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
        assert (out / "model" / "model.safetensors").is_file()
    assert sorted(losses[1]) == sorted(losses[2]) == [1, 2, 3, 4]
    for step in losses[1]:
        assert losses[2][step] == pytest.approx(losses[1][step], abs=2e-4), (losses[1], losses[2])
