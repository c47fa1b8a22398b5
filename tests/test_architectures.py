"""Llama- and Qwen2-style models from scratch: transformers' own classes, the sampler's KV cache and
left padding under RoPE, FSDP2 wrapping of their decoder layers, and the whole quick pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import read_metrics, run_ok, sets, write_yaml
from pipeline.config import ArchitectureConfig
from pipeline.models import create_scratch_model
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
def test_the_quick_pipeline_runs_with_a_llama_model(tmp_path):
    """configs/quick/, shrunk through --set: SFT, pairs, reward, DPO, PPO and compare with a llama model."""
    out = {name: tmp_path / name for name in ("sft", "pairs", "reward", "dpo", "ppo", "compare")}
    model = f"model.name_or_path={out['sft'] / 'model'}"
    pair_files = [
        f"data.train.0.path={out['pairs'] / 'train.jsonl'}",
        f"data.eval.0.path={out['pairs'] / 'test.jsonl'}",
    ]
    arch = "{type: llama, n_layer: 2, n_head: 4, n_kv_head: 2, n_embd: 32, n_positions: 96, vocab_size: 400}"
    run_ok(
        "sft",
        "configs/quick/sft.yaml",
        *sets(
            f"output_dir={out['sft']}",
            f"model.architecture={arch}",
            "data.train.0.max_rows=1200",
            "data.eval.0.max_rows=16",
        ),
    )
    run_ok(
        "data",
        "pairs",
        "configs/quick/pairs.yaml",
        *sets(
            f"output_dir={out['pairs']}",
            model,
            "num_train_prompts=64",
            "num_eval_prompts=32",
            "sample.max_new_tokens=24",
        ),
    )
    run_ok("reward", "configs/quick/reward.yaml", *sets(f"output_dir={out['reward']}", model, *pair_files))
    run_ok(
        "dpo",
        "configs/quick/dpo.yaml",
        *sets(
            f"output_dir={out['dpo']}",
            model,
            *pair_files,
            "train.max_steps=6",
            f"reference.cache_dir={tmp_path / 'cache'}",
        ),
    )
    run_ok(
        "ppo",
        "configs/quick/ppo.yaml",
        *sets(
            f"output_dir={out['ppo']}",
            model,
            f"reward.models=[{out['reward'] / 'model'}]",
            "train.max_steps=2",
            "ppo.rollout_batch_size=16",
            "ppo.mini_batch_size=8",
            "ppo.micro_batch_size=8",
            "rollout.max_new_tokens=16",
        ),
    )
    compare = {
        "output_dir": str(out["compare"]),
        "sft": str(out["sft"]),
        "reward": str(out["reward"]),
        "policies": [
            {"name": "dpo", "method": "dpo", "run": str(out["dpo"])},
            {"name": "ppo", "method": "ppo", "run": str(out["ppo"])},
        ],
        "best_of_n": [2],
        "num_prompts": 16,
        "temperatures": [1.0],
        "max_new_tokens": 16,
        "bootstrap_resamples": 100,
        "checkpoints": False,
    }
    run_ok("compare", str(write_yaml(tmp_path / "compare.yaml", compare)))
    config = json.loads((out["sft"] / "model" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    for stage in ("reward", "dpo", "ppo"):
        assert json.loads((out[stage] / "model" / "config.json").read_text())["model_type"] == "llama"
    assert any("eval/accuracy_low" in m for m in read_metrics(out["reward"]))
    results = json.loads((out["compare"] / "results.json").read_text())
    assert {m["name"] for m in results["methods"]} == {"sft", "best-of-2", "dpo", "ppo"}


@pytest.mark.slow
def test_two_processes_shard_a_llama_model_and_follow_the_one_process_loss_curve(tmp_path):
    from helpers import tiny_sft_config

    losses = {}
    for processes in (1, 2):
        config = tiny_sft_config(tmp_path / str(processes), max_steps=3, eval_every=0, save_every=0)
        config["model"]["architecture"] |= {"type": "llama", "n_kv_head": 1}
        run_ok("sft", str(write_yaml(tmp_path / f"{processes}.yaml", config)), "--num-processes", str(processes))
        metrics = read_metrics(tmp_path / str(processes))
        losses[processes] = [m["loss"] for m in metrics if "loss" in m]
        per_rank = next(m for m in metrics if "params/per_rank" in m)["params/per_rank"]
        assert len(per_rank) == processes
    assert losses[2] == pytest.approx(losses[1], abs=2e-4)
