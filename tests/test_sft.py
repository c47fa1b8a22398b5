"""`rlhfdpo sft` end to end through the CLI: outputs, resume, and a sharded 2-process run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import read_metrics, run_cli, tiny_sft_config, write_yaml

pytestmark = pytest.mark.slow


def train_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    config = write_yaml(run_dir.parent / "sft.yaml", tiny_sft_config(run_dir))
    result = run_cli("sft", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, config


def test_sft_writes_a_loadable_model_and_its_run_directory(finished_run):
    run_dir, _ = finished_run
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert model.config.n_layer == 2
    assert (run_dir / "config.yaml").is_file() and "weight_decay" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "README.md").read_text().startswith("# sft run")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-3"]
    metrics = read_metrics(run_dir)
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4, 5, 6]
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    assert all(m["eval/perplexity"] > 1 for m in evals)
    cost = json.loads((run_dir / "cost.json").read_text())
    # 6 steps x 2 micro-batches, 2 evaluations x 3 batches of 16, then 2 prompts sampled for 8 tokens.
    assert cost["forward_passes"]["policy"] == 12 + 6 + 8
    assert cost["tokens"]["policy"] > 6 * 8 * 20 and cost["peak_rss_mb"] > 0 and cost["wall_s"] > 0


def test_training_lowers_the_loss(finished_run):
    losses = train_losses(finished_run[0])
    assert losses[6] < losses[1] - 0.3


def test_resume_continues_exactly_where_the_checkpoint_left_off(finished_run, tmp_path):
    run_dir, config = finished_run
    reference = load_file(run_dir / "model" / "model.safetensors")
    before = train_losses(run_dir)
    # Resume the finished run from its step-3 checkpoint: steps 4-6 must be replayed identically.
    result = run_cli("sft", str(config), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    after = train_losses(run_dir)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]  # no duplicated lines in metrics.jsonl
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(before[step], abs=1e-5)
    resumed = load_file(run_dir / "model" / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_two_processes_shard_the_model_and_follow_the_same_loss_curve(finished_run, tmp_path):
    single_dir, _ = finished_run
    run_dir = tmp_path / "sharded"
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(run_dir))
    result = run_cli("sft", str(config), "--num-processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    params = next(m for m in read_metrics(run_dir) if "params/per_rank" in m)
    per_rank, total = params["params/per_rank"], params["params/total"]
    assert len(per_rank) == 2
    for count in per_rank:
        assert abs(count - total / 2) / total < 0.02  # each rank holds about half
    single, sharded = train_losses(single_dir), train_losses(run_dir)
    assert sorted(sharded) == sorted(single)
    for step in single:
        assert sharded[step] == pytest.approx(single[step], abs=2e-4), (step, single, sharded)
    # Saving gathered the shards into one ordinary, complete model folder that scores like the
    # single-process model (weights agree up to float reduction order, not bit for bit).
    a = load_file(single_dir / "model" / "model.safetensors")
    b = load_file(run_dir / "model" / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    final_eval = [[m["eval/loss"] for m in read_metrics(d) if "eval/loss" in m][-1] for d in (single_dir, run_dir)]
    assert final_eval[1] == pytest.approx(final_eval[0], abs=1e-3)


def test_gradient_checkpointing_follows_the_same_loss_curve(tmp_path):
    losses = {}
    for enabled in (False, True):
        run_dir = tmp_path / str(enabled)
        config = tiny_sft_config(run_dir, max_steps=3, eval_every=0, save_every=0, gradient_checkpointing=enabled)
        result = run_cli("sft", str(write_yaml(tmp_path / f"{enabled}.yaml", config)))
        assert result.returncode == 0, result.stderr[-3000:]
        losses[enabled] = train_losses(run_dir)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
