"""`model.dtype: bfloat16` is mixed precision: bf16 forward passes over float32 weights, gradients and
optimizer state, in one process through autocast (`launch.compute_in`)."""

from __future__ import annotations

import pytest
import torch

from helpers import read_metrics, run_cli, tiny_sft_config, write_yaml
from pipeline.config import ArchitectureConfig
from pipeline.launch import Dist, shard
from pipeline.models import ScalarHead, create_scratch_model

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_lm(tokenizer, seed: int = 0):
    return create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64), tokenizer, seed)


def test_bf16_computes_in_bf16_over_float32_weights_and_sees_every_update(tiny_tokenizer):
    model = shard(tiny_lm(tiny_tokenizer), CPU, "bfloat16")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids)
    assert out.logits.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out.logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())

    # After an optimizer step the next forward uses the new weights: a copy built from them agrees.
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    fresh = tiny_lm(tiny_tokenizer)
    fresh.load_state_dict(model.state_dict())
    fresh = shard(fresh, CPU, "bfloat16")
    assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert not torch.equal(model(input_ids=ids).logits, out.logits)


def test_float32_leaves_the_forward_alone(tiny_tokenizer):
    model = tiny_lm(tiny_tokenizer)
    forward = model.forward
    assert shard(model, CPU, "float32").forward == forward


def test_reward_head_scores_in_float32_under_bf16(tiny_tokenizer):
    """Scores 1e-3 apart near 2.0 stay apart: rounded to bf16 (steps of 1/64 there) they would tie."""
    from transformers import GPT2ForSequenceClassification

    lm = tiny_lm(tiny_tokenizer)
    lm.config.num_labels = 1
    classifier = GPT2ForSequenceClassification(lm.config)
    head = shard(ScalarHead(classifier), CPU, "bfloat16")
    with torch.no_grad():
        classifier.score.weight.zero_()
        classifier.score.weight[0, 0] = 1.0
        classifier.transformer.ln_f.weight.zero_()
        classifier.transformer.ln_f.bias.fill_(2.0)
        classifier.transformer.ln_f.bias[0] = 2.001
        scores = head(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert scores.dtype == torch.float32
    assert scores[0, 0].item() == pytest.approx(2.001, abs=1e-6)


def test_float16_is_refused_with_the_valid_choices():
    result = run_cli("config", "show", "sft", "--set", "model.dtype=float16")
    assert result.returncode != 0
    assert "model.dtype" in result.stderr and "bfloat16" in result.stderr


@pytest.mark.slow
def test_a_bf16_sft_run_saves_float32_weights_and_follows_the_float32_loss_curve(tmp_path):
    from safetensors.torch import load_file

    losses, weights = {}, {}
    for dtype in ("float32", "bfloat16"):
        run_dir = tmp_path / dtype
        config = tiny_sft_config(run_dir, max_steps=4, eval_every=0, save_every=0)
        config["model"]["dtype"] = dtype
        result = run_cli("sft", str(write_yaml(tmp_path / f"{dtype}.yaml", config)))
        assert result.returncode == 0, result.stderr[-3000:]
        losses[dtype] = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
        weights[dtype] = load_file(run_dir / "model" / "model.safetensors")
    assert {w.dtype for w in weights["bfloat16"].values()} == {torch.float32}
    assert losses["bfloat16"] != losses["float32"]  # the forward passes did run in bf16
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
