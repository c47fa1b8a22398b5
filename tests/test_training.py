"""The optimizer, the learning-rate schedule's shape and the batch plan."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import OptimConfig, TrainConfig
from pipeline.errors import DataError
from pipeline.launch import Dist
from pipeline.training import BatchPlan, build_optimizer, lr_at, warmup_steps


def test_cosine_schedule_warms_up_then_decays_to_ten_percent():
    optim = OptimConfig(lr=1.0, warmup_ratio=0.1, min_lr_ratio=0.1)
    total = 102
    lrs = [lr_at(s, total, optim) for s in range(total)]
    warmup = warmup_steps(optim, total)
    assert warmup == 11
    assert lrs[0] == pytest.approx(1 / 11)
    assert lrs[warmup - 1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # rising
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # falling
    assert lrs[-1] == pytest.approx(0.1)
    mid = warmup + (total - warmup - 1) // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # 0.55


def test_min_warmup_steps_and_other_schedules():
    optim = OptimConfig(lr=2.0, warmup_ratio=0.0, min_warmup_steps=5, schedule="linear", min_lr_ratio=0.0)
    assert warmup_steps(optim, 10) == 5
    assert lr_at(4, 10, optim) == pytest.approx(2.0)
    assert lr_at(9, 10, optim) == pytest.approx(0.0)
    constant = OptimConfig(lr=2.0, warmup_ratio=0.0, schedule="constant")
    assert {lr_at(s, 10, constant) for s in range(10)} == {2.0}


def test_the_fused_optimizer_steps_as_the_textbook_adamw_with_decay_on_matrices_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    textbook = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    textbook.load_state_dict(model.state_dict())
    start = model[0].weight.detach().clone()
    optim = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, optim)
    assert all(group["fused"] for group in fused.param_groups)
    matrices = [p for p in textbook.parameters() if p.ndim >= 2]
    others = [p for p in textbook.parameters() if p.ndim < 2]
    loop = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=1e-2,
        betas=tuple(optim.betas),
        eps=optim.eps,
        foreach=False,
    )
    for _ in range(5):
        for net, opt in ((model, fused), (textbook, loop)):
            torch.manual_seed(1)
            net(torch.randn(4, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for ours, reference in zip(model.parameters(), textbook.parameters()):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert (model[0].weight - start).abs().max() > 1e-2  # five steps at lr 1e-2 moved the weights


def dist(rank: int, world: int) -> Dist:
    import torch

    return Dist(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def test_batch_plan_is_the_same_global_batch_for_one_or_two_processes():
    train = TrainConfig(batch_size=8, micro_batch_size=2, seed=3, epochs=2)
    one = BatchPlan.build(50, train, 1)
    two = BatchPlan.build(50, train, 2)
    assert one.total_steps == two.total_steps == 12  # 6 full batches per epoch, 2 epochs
    assert (one.accumulation, two.accumulation) == (4, 2)
    for step in range(one.total_steps):
        single = [i for mb in one.micro_batches(step, dist(0, 1)) for i in mb]
        pair = [i for r in range(2) for mb in two.micro_batches(step, dist(r, 2)) for i in mb]
        assert single == pair and len(set(single)) == 8
    epoch0 = {i for s in range(6) for mb in one.micro_batches(s, dist(0, 1)) for i in mb}
    assert len(epoch0) == 48  # no example twice within an epoch


def test_batch_plan_rejects_too_little_data():
    with pytest.raises(DataError, match="no full batch"):
        BatchPlan.build(3, TrainConfig(batch_size=8), 1)


def _padding(plan: BatchPlan, lengths: list[int], dist) -> int:
    """Padded positions over an epoch: each micro-batch pads to its longest example."""
    waste = 0
    for step in range(plan.steps_per_epoch):
        for micro in plan.micro_batches(step, dist):
            waste += sum(max(lengths[i] for i in micro) - lengths[i] for i in micro)
    return waste


def test_group_by_length_sees_every_example_once_with_less_padding():
    lengths = [int(x) for x in torch.randint(8, 200, (512,), generator=torch.Generator().manual_seed(0))]
    dist = Dist(0, 1, 0, torch.device("cpu"))
    plain = BatchPlan.build(512, TrainConfig(batch_size=8, micro_batch_size=8), 1, lengths)
    grouped = BatchPlan.build(512, TrainConfig(batch_size=8, micro_batch_size=8, group_by_length=True), 1, lengths)
    seen = sorted(i for step in range(grouped.steps_per_epoch) for m in grouped.micro_batches(step, dist) for i in m)
    assert seen == list(range(512))
    assert _padding(grouped, lengths, dist) < 0.2 * _padding(plain, lengths, dist)
    # Batches are still in random order: not sorted by length over the epoch.
    firsts = [lengths[grouped.micro_batches(s, dist)[0][0]] for s in range(grouped.steps_per_epoch)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    # The same seed gives the same plan; grouping without lengths is plain order.
    again = BatchPlan.build(512, TrainConfig(batch_size=8, micro_batch_size=8, group_by_length=True), 1, lengths)
    assert again.micro_batches(5, dist) == grouped.micro_batches(5, dist)
    no_lengths = BatchPlan.build(512, TrainConfig(batch_size=8, micro_batch_size=8, group_by_length=True), 1)
    assert no_lengths.micro_batches(5, dist) == plain.micro_batches(5, dist)


def test_micro_batches_of_a_step_are_cut_from_its_examples_sorted_by_length():
    """With accumulation, a step holds the same examples as without lengths, cut by length."""
    lengths = list(range(100, 0, -1))
    dist = Dist(0, 1, 0, torch.device("cpu"))
    known = BatchPlan.build(100, TrainConfig(batch_size=16, micro_batch_size=4), 1, lengths)
    unknown = BatchPlan.build(100, TrainConfig(batch_size=16, micro_batch_size=4), 1)
    for step in range(3):
        sorted_micro, plain_micro = known.micro_batches(step, dist), unknown.micro_batches(step, dist)
        assert sorted(i for m in sorted_micro for i in m) == sorted(i for m in plain_micro for i in m)
        widths = [[lengths[i] for i in m] for m in sorted_micro]
        assert all(min(a) >= max(b) for a, b in zip(widths, widths[1:]))


# ------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("head", [False, True])
def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(tiny_tokenizer, head):
    """train.gradient_checkpointing: each block runs again during backward, and nothing changes."""
    from transformers import GPT2ForSequenceClassification

    from pipeline.config import ArchitectureConfig
    from pipeline.models import ScalarHead, create_scratch_model
    from pipeline.training import checkpoint_activations

    def build(enabled: bool):
        lm = create_scratch_model(ArchitectureConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), tiny_tokenizer, 0)
        if head:
            lm.config.num_labels = 1
            torch.manual_seed(1)
            model = ScalarHead(GPT2ForSequenceClassification(lm.config))
        else:
            model = lm
        return checkpoint_activations(model, enabled).train()

    ids = torch.randint(0, len(tiny_tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    grads, block_calls = {}, {}
    for enabled in (False, True):
        model = build(enabled)
        calls = []
        blocks = model.model.transformer.h if head else model.transformer.h
        # The attention inside the first block runs again in backward (recomputation stops early,
        # once the tensors backward needs are back, so not every submodule reruns).
        blocks[0].attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        out = model(ids, torch.ones_like(ids)) if head else model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        grads[enabled] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        block_calls[enabled] = len(calls)
    assert block_calls == {False: 1, True: 2}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6), name
