"""What only a GPU can show: sampling, mixed precision and scoring on CUDA agree with the CPU.

Skipped where no CUDA device is visible (the CPU machines every commit is tested on); run on a GPU
with `scripts/gpu_check.sh`, which also runs every stage there in bf16, in one process and through
the FSDP2 launch path.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ArchitectureConfig
from pipeline.launch import Dist, shard
from pipeline.models import ScalarHead, create_scratch_model, last_scores
from pipeline.sampling import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
GPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))


def tiny_lm(tokenizer, seed: int = 0):
    arch = ArchitectureConfig(n_layer=2, n_head=2, n_embd=64, n_positions=96)
    return create_scratch_model(arch, tokenizer, seed).eval()


def prompts(tokenizer, n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(2, len(tokenizer), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_greedy_sampling_on_cuda_gives_the_cpu_tokens_and_padding_changes_nothing(tiny_tokenizer):
    batch = prompts(tiny_tokenizer)
    kwargs = dict(
        eos_id=tiny_tokenizer.eos_token_id, pad_id=tiny_tokenizer.pad_token_id, max_new_tokens=12, temperature=0.0
    )
    cpu = generate(shard(tiny_lm(tiny_tokenizer), CPU), batch, **kwargs)
    gpu_model = shard(tiny_lm(tiny_tokenizer), GPU)
    gpu = generate(gpu_model, batch, **kwargs)
    assert gpu.sequences == cpu.sequences and gpu.finished == cpu.finished
    alone = [generate(gpu_model, [p], **kwargs).sequences[0] for p in batch]  # left padding in the batch
    assert alone == gpu.sequences


def test_sampling_with_a_cpu_generator_draws_the_same_on_cuda(tiny_tokenizer):
    batch = prompts(tiny_tokenizer)
    kwargs = dict(
        eos_id=tiny_tokenizer.eos_token_id, pad_id=tiny_tokenizer.pad_token_id, max_new_tokens=10, temperature=1.0
    )
    cpu = generate(shard(tiny_lm(tiny_tokenizer), CPU), batch, generator=torch.Generator().manual_seed(3), **kwargs)
    gpu = generate(shard(tiny_lm(tiny_tokenizer), GPU), batch, generator=torch.Generator().manual_seed(3), **kwargs)
    same = sum(a == b for a, b in zip(cpu.sequences, gpu.sequences))
    assert same >= len(batch) - 1  # one uniform per row: only a near-tie in a CDF can tell them apart


def test_bf16_on_cuda_keeps_float32_weights_and_stays_close_to_float32(tiny_tokenizer):
    ids = torch.randint(2, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0)).cuda()
    full = shard(tiny_lm(tiny_tokenizer), GPU)(input_ids=ids).logits
    model = shard(tiny_lm(tiny_tokenizer), GPU, "bfloat16")
    mixed = model(input_ids=ids).logits
    assert mixed.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.float32}
    error = (mixed.float() - full).norm() / full.norm()
    assert 1e-5 < error < 2e-2, error  # bf16 operands: between 1e-3 and 1e-2 relative error


def test_reward_scores_on_cuda_match_the_cpu(tiny_tokenizer):
    from transformers import GPT2ForSequenceClassification

    lm = tiny_lm(tiny_tokenizer)
    lm.config.num_labels = 1
    classifier = GPT2ForSequenceClassification(lm.config).eval()
    ids = torch.randint(2, len(tiny_tokenizer), (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    cpu = last_scores(ScalarHead(classifier)(ids, mask), mask)
    head = shard(ScalarHead(classifier), GPU)
    gpu = last_scores(head(ids.cuda(), mask.cuda()), mask.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4), (cpu, gpu)
