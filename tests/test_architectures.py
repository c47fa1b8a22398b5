"""Llama- and Qwen2-style models from scratch: transformers' own classes, the sampler's KV cache and
left padding under RoPE, FSDP2 wrapping of their decoder layers, and the whole quick pipeline."""

from __future__ import annotations

import pytest
import torch

from helpers import read_metrics, run_ok, write_yaml
from pipeline.config import ArchitectureConfig
from pipeline.models import create_scratch_model, from_pretrained
from pipeline.sampling import generate


@pytest.mark.parametrize(
    "kind, classes", [("llama", ("LlamaForCausalLM", "LlamaRMSNorm")), ("qwen2", ("Qwen2ForCausalLM", "Qwen2RMSNorm"))]
)
def test_modern_scratch_models_have_rope_rmsnorm_gqa_and_swiglu(tiny_tokenizer, kind, classes):
    arch = ArchitectureConfig(type=kind, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_positions=64)
    model = create_scratch_model(arch, tiny_tokenizer, seed=0)
    names = {type(module).__name__ for module in model.modules()}
    assert type(model).__name__ == classes[0] and classes[1] in names
    attention = model.model.layers[0].self_attn
    head = 64 // 4
    assert attention.q_proj.out_features == 4 * head and attention.k_proj.out_features == 2 * head  # GQA
    assert (attention.q_proj.bias is not None) == (kind == "qwen2")  # Qwen2's query/key/value biases
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == 192  # 8/3 * 64 rounded up to 32
    assert model.lm_head.weight is model.get_input_embeddings().weight
    untied = create_scratch_model(
        ArchitectureConfig(type=kind, n_layer=1, n_head=2, n_embd=32, tie_word_embeddings=False), tiny_tokenizer, 0
    )
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    # FSDP2 wraps the layer class the model names, not a hard-coded GPT2Block.
    assert model._no_split_modules == {f"{'Llama' if kind == 'llama' else 'Qwen2'}DecoderLayer"}
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cached_left_padded_sampling_equals_one_prompt_at_a_time_without_a_cache(tiny_tokenizer, kind):
    """RoPE turns a wrong position id into a different token: left padding must not shift them."""
    arch = ArchitectureConfig(type=kind, n_layer=2, n_head=4, n_kv_head=1, n_embd=64, n_positions=64)
    model = create_scratch_model(arch, tiny_tokenizer, seed=3).eval()
    prompts = [tiny_tokenizer(text)["input_ids"] for text in ("a", "the film was long and the cast", "dull plot")]
    out = generate(model, prompts, eos_id=-1, pad_id=tiny_tokenizer.pad_token_id, max_new_tokens=6, temperature=0.0)
    for prompt, sequence in zip(prompts, out.sequences):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert sequence == ids[len(prompt) :]


@pytest.mark.slow
def test_two_processes_shard_a_llama_model_and_follow_the_one_process_loss_curve(tmp_path):
    """Padded and packed (`train.packing`, whose attention FSDP2's sharded layers run too)."""
    from helpers import tiny_sft_config

    losses = {}
    for processes, packing in ((1, False), (2, False), (2, True)):
        name = f"{processes}-{'packed' if packing else 'padded'}"
        config = tiny_sft_config(tmp_path / name, max_steps=3, eval_every=0, save_every=0)
        config["model"]["architecture"] |= {"type": "llama", "n_kv_head": 1}
        config["train"]["packing"] = packing
        run_ok("sft", str(write_yaml(tmp_path / f"{name}.yaml", config)), "--num-processes", str(processes))
        metrics = read_metrics(tmp_path / name)
        losses[name] = [m["loss"] for m in metrics if "loss" in m]
        per_rank = next(m for m in metrics if "params/per_rank" in m)["params/per_rank"]
        assert len(per_rank) == processes
    assert losses["2-padded"] == pytest.approx(losses["1-padded"], abs=2e-4)
    assert losses["2-packed"] == pytest.approx(losses["1-padded"], abs=2e-4)


def test_gpt2s_written_out_gelu_is_swapped_for_torchs_fused_one_with_the_same_logits(tmp_path, tiny_tokenizer):
    """A GPT-2 saved with activation gelu_new (the hub's) loads with torch's one-kernel tanh GELU: the
    same logits to float rounding, and a config that says so, so that its saved copy loads the same."""
    from transformers import AutoModelForCausalLM, GPT2Config
    from transformers.activations import GELUTanh, NewGELUActivation

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tiny_tokenizer), bos_token_id=0, eos_token_id=0)
    assert config.activation_function == "gelu_new"
    hub_like = AutoModelForCausalLM.from_config(config).eval()
    assert isinstance(hub_like.transformer.h[0].mlp.act, NewGELUActivation)
    hub_like.save_pretrained(tmp_path / "gpt2")
    loaded = from_pretrained(AutoModelForCausalLM, tmp_path / "gpt2", dtype=torch.float32).eval()
    assert all(type(block.mlp.act) is GELUTanh for block in loaded.transformer.h)
    assert loaded.config.activation_function == "gelu_pytorch_tanh"
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    expected, got = hub_like(ids).logits, loaded(ids).logits
    assert not torch.equal(expected, torch.zeros_like(expected))
    assert torch.allclose(got, expected, atol=1e-5)
    scratch = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=32), tiny_tokenizer, seed=0)
    assert type(scratch.transformer.h[0].mlp.act) is GELUTanh
