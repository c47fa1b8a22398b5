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


def test_sampling_counts_the_prompts_real_tokens_then_every_row_at_each_decoding_step(tiny_tokenizer, tmp_path):
    from pipeline.sampling import generate

    model = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32), tiny_tokenizer, 0)
    meter = CostMeter(Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launched=False))
    meter.watch(model, "policy")
    # Prompts of 3 and 1 tokens (2 padded), 4 new tokens: the prompt pass, then 3 cached steps of 2 rows.
    generate(model.eval(), [[5, 6, 7], [8]], eos_id=-1, pad_id=0, max_new_tokens=4, temperature=0.0)
    cost = meter.write(tmp_path)
    assert cost["forward_passes"] == {"policy": 4} and cost["tokens"] == {"policy": 4 + 3 * 2}


def test_a_shared_prompt_row_counts_its_real_tokens(tiny_tokenizer, tmp_path):
    from pipeline.data.tokenize import TokenizedExample, TokenizedPair
    from pipeline.prefix_sharing import collate_shared_pairs, shared_pair_logps

    model = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32), tiny_tokenizer, 0)
    meter = CostMeter(Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), launched=False))
    meter.watch(model, "policy")
    pairs = [  # 3 + 2 + 4 tokens, and 1 + 1 + 1 padded to 9
        TokenizedPair(TokenizedExample([5, 6, 7, 8, 9], 3), TokenizedExample([5, 6, 7, 10, 11, 12, 13], 3)),
        TokenizedPair(TokenizedExample([5, 6], 1), TokenizedExample([5, 8], 1)),
    ]
    with torch.no_grad():
        for attention in ("sdpa", "eager"):
            model.config._attn_implementation = attention
            shared_pair_logps(model, collate_shared_pairs(pairs, pad_id=0))
    assert meter.write(tmp_path)["tokens"] == {"policy": 2 * (9 + 3)}
