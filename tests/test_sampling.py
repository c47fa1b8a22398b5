"""The sampler: temperature, top-p and seeding follow the distribution they claim."""

from __future__ import annotations

import pytest
import torch

from pipeline.sampling import next_tokens


def test_sampling_follows_the_distribution_and_never_picks_a_zero_probability_token():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logits = probs.log().expand(20000, 4).clone()
    tokens = next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert counts[1] == 0
    assert torch.allclose(counts, probs, atol=0.015)  # 20,000 draws: standard error under 0.004
    again = next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)  # the same seed gives the same tokens
    # top-p 0.6 keeps {0, 2}: renormalised 0.625 / 0.375
    kept = torch.bincount(next_tokens(logits, 1.0, 0.6, torch.Generator().manual_seed(1)), minlength=4).float() / 20000
    assert kept[1] == kept[3] == 0 and abs(kept[0] - 0.625) < 0.015


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_decoding_in_the_preallocated_cache_equals_transformers_generate(tiny_tokenizer, kind):
    from pipeline.config import ArchitectureConfig
    from pipeline.models import create_scratch_model
    from pipeline.sampling import PreallocatedLayer, generate, preallocated_cache

    arch = ArchitectureConfig(type=kind, n_layer=2, n_head=4, n_embd=64, n_positions=64)
    model = create_scratch_model(arch, tiny_tokenizer, seed=1).eval()
    assert all(isinstance(layer, PreallocatedLayer) for layer in preallocated_cache(model, 40).layers)
    prompts = torch.randint(2, model.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(0))
    ours = generate(
        model, prompts.tolist(), eos_id=-1, pad_id=tiny_tokenizer.pad_token_id, max_new_tokens=24, temperature=0
    )
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=24,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
    assert ours.sequences == theirs[:, 7:].tolist()


def test_a_sliding_window_model_keeps_its_own_cache(tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from pipeline.sampling import generate, preallocated_cache

    config = MistralConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=4,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    assert preallocated_cache(model, 32) is None
    out = generate(model, [[5, 6, 7, 8, 9, 10]], eos_id=-1, pad_id=0, max_new_tokens=5, temperature=0)
    ids = [5, 6, 7, 8, 9, 10]
    with torch.no_grad():  # no cache at all: the whole sequence again at each step, the window applied
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.sequences[0] == ids[6:]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_samples_of_one_prompt_share_its_prefill_and_continue_it_as_alone(tiny_tokenizer, kind):
    from pipeline.config import ArchitectureConfig
    from pipeline.data.tokenize import TokenizedExample, collate
    from pipeline.logprobs import response_token_logps
    from pipeline.models import create_scratch_model
    from pipeline.sampling import generate

    arch = ArchitectureConfig(type=kind, n_layer=2, n_head=4, n_embd=64, n_positions=64)
    model = create_scratch_model(arch, tiny_tokenizer, seed=1).eval()
    rng = torch.Generator().manual_seed(0)
    distinct = [torch.randint(2, model.config.vocab_size, (n,), generator=rng).tolist() for n in (7, 3, 5)]
    prompts = [distinct[i] for i in (0, 1, 0, 2, 1, 0)]
    prefill_rows = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape) if not prefill_rows else None,
        with_kwargs=True,
    )
    pad = tiny_tokenizer.pad_token_id
    greedy = generate(model, prompts, eos_id=-1, pad_id=pad, max_new_tokens=12, temperature=0)
    hook.remove()
    assert prefill_rows == [torch.Size([3, 7])]  # each distinct prompt once
    for prompt, sequence in zip(prompts, greedy.sequences):
        alone = generate(model, [prompt], eos_id=-1, pad_id=pad, max_new_tokens=12, temperature=0)
        assert sequence == alone.sequences[0]
    sampled = generate(
        model, prompts, eos_id=-1, pad_id=pad, max_new_tokens=12, temperature=0.8,
        generator=torch.Generator().manual_seed(3), with_logps=True,
    )  # fmt: skip
    assert len({tuple(s) for s in sampled.sequences}) == len(prompts)  # samples of one prompt differ
    batch = collate([TokenizedExample(p + s, len(p)) for p, s in zip(prompts, sampled.sequences)], pad)
    with torch.no_grad():
        logps, mask = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], 0.8)
    torch.testing.assert_close(logps[mask], sampled.logps.flatten(), atol=1e-5, rtol=0)
