"""The cost meter: forward passes, tokens, FLOPs by hand (6N per trained token, 2N per inferred one)
and CPU time, from hooks on the model's forward."""

from __future__ import annotations

import json

import torch

from pipeline.config import ArchitectureConfig
from pipeline.cost import CostMeter
from pipeline.launch import Dist
from pipeline.models import create_scratch_model


def test_flops_tokens_and_cpu_time_by_hand(tiny_tokenizer, tmp_path):
    model = create_scratch_model(
        ArchitectureConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=400), tiny_tokenizer, 0
    )
    n = sum(p.numel() for p in model.parameters())
    meter = CostMeter(Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launched=False))
    meter.watch(model, "policy")
    ids = torch.randint(0, 300, (2, 5))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()  # trained: 10 tokens
    with torch.no_grad():  # inference: 7 attended tokens (3 padded)
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]))
    for p in model.parameters():
        p.requires_grad_(False)  # gradients on, nothing to train (a frozen reference): a forward pass only
    model(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]))
    sum(i * i for i in range(200_000))  # some CPU work for the process clock

    cost = meter.write(tmp_path)
    assert cost["forward_passes"] == {"policy": 3} and cost["tokens"] == {"policy": 10 + 7 + 5}
    assert cost["flops"] == {"policy": 6 * n * 10 + 2 * n * 7 + 2 * n * 5}
    assert cost["cpu_s"] > 0 and cost["wall_s"] > 0
    assert json.loads((tmp_path / "cost.json").read_text()) == cost
