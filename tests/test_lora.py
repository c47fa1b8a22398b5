"""LoRA (model.lora): what trains, the reference with adapters off, the adapter folder and the merged save,
then every stage end to end with adapters, and two FSDP2 processes that leave the base untouched."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import read_metrics, run_cli, run_ok, sets, tiny_sft_config, write_yaml
from pipeline.config import (
    ArchitectureConfig,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    check_reward_model_path,
)
from pipeline.data.records import PreferencePair
from pipeline.data.tokenize import tokenize_pair
from pipeline.errors import InputError
from pipeline.launch import init_distributed, save_pretrained
from pipeline.lora import adapters_disabled, add_lora, merged_state, trainable_parameter_count
from pipeline.models import ScalarHead, create_scratch_model, from_pretrained
from pipeline.reference import cache_path, reference_logps
from pipeline.training import build_optimizer

LORA = {"r": 4, "alpha": 8.0}


def lora_model(path: Path, **lora) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), lora=LoraConfig(**{**LORA, **lora}))


def trained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adapters as after some training: B starts at zero (the adapted model is the base), so give it values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def causal_lm(path: Path) -> torch.nn.Module:
    return from_pretrained(AutoModelForCausalLM, path, dtype=torch.float32).eval()


def reward_model(path: Path) -> torch.nn.Module:
    return from_pretrained(AutoModelForSequenceClassification, path, num_labels=1, dtype=torch.float32)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture
def ids(tiny_tokenizer) -> torch.Tensor:
    texts = ["the film is a quiet triumph", "a dull and tired plot, badly acted"]
    rows = [tiny_tokenizer(t)["input_ids"][:6] for t in texts]
    return torch.tensor(rows)


# ------------------------------------------------------------------------------------ what trains


def test_only_the_adapters_train_and_a_reward_model_also_trains_its_head(tiny_folders):
    """GPT-2 block of width d = 32 with r = 4: each adapted layer adds r (in + out) parameters, so
    c_attn (32 -> 96) 512, attn c_proj (32 -> 32) 256, c_fc (32 -> 128) 640, mlp c_proj (128 -> 32) 640:
    2048 for the one block. The reward model adds its whole head (32 weights, no bias)."""
    policy = add_lora(causal_lm(tiny_folders("policy")), lora_model(tiny_folders("policy")))
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert trainable_parameter_count(policy) == 2048
    optimized = [p for group in build_optimizer(policy, _optim()).param_groups for p in group["params"]]
    assert sum(p.numel() for p in optimized) == 2048

    rm = add_lora(reward_model(tiny_folders("rm", reward=True)), lora_model(tiny_folders("rm")), head=True)
    names = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert [n for n in names if ".lora_" not in n] == ["score.modules_to_save.default.weight"]
    assert trainable_parameter_count(rm) == 2048 + 32


def test_a_scratch_model_or_an_unknown_module_is_refused_in_one_line(tiny_folders, tiny_tokenizer):
    scratch = create_scratch_model(ArchitectureConfig(n_layer=1, n_head=2, n_embd=32), tiny_tokenizer, 0)
    with pytest.raises(ConfigError, match="model.lora: a model created from scratch"):
        add_lora(scratch, ModelConfig(name_or_path="scratch", lora=LoraConfig()))
    folder = tiny_folders("policy")
    with pytest.raises(ConfigError, match="model.lora.target_modules: .*q_proj"):
        add_lora(causal_lm(folder), lora_model(folder, target_modules=["q_proj"]))


# --------------------------------------------------------------------------- the reference, adapters off


def test_adapters_off_are_the_base_model_and_give_the_cached_reference_log_probs(
    tiny_folders, tiny_tokenizer, tmp_path, ids
):
    """DPO under LoRA takes its reference log-probs from the policy with its adapters off; they must be
    the ones the loaded SFT model gives (and that a full fine-tuning run caches under the same key)."""
    folder = tiny_folders("policy")
    model_cfg = lora_model(folder)
    policy = trained(add_lora(causal_lm(folder), model_cfg)).eval()
    base = causal_lm(folder)
    with adapters_disabled(policy):
        assert torch.equal(logits(policy, ids), logits(base, ids))
    assert not torch.allclose(logits(policy, ids), logits(base, ids), atol=1e-3)  # the adapters are back on

    data = DataConfig(max_length=32, max_prompt_length=8)
    pairs = [
        tokenize_pair(tiny_tokenizer, PreferencePair("the film", f" is good {i}.", " is bad.", str(i)), data)
        for i in range(6)
    ]
    dist, pad = init_distributed(), tiny_tokenizer.pad_token_id
    loaded = reference_logps(model_cfg, pairs, str(tmp_path / "loaded"), 4, pad, dist)
    from_policy = reference_logps(model_cfg, pairs, str(tmp_path / "policy"), 4, pad, dist, policy=policy)
    assert not loaded[2] and not from_policy[2]
    assert torch.equal(loaded[0], from_policy[0]) and torch.equal(loaded[1], from_policy[1])
    assert cache_path(str(tmp_path), model_cfg, pairs) == cache_path(str(tmp_path), ModelConfig(str(folder)), pairs)
    assert all(p.requires_grad == (".lora_" in n) for n, p in policy.named_parameters())  # still what trains


# ------------------------------------------------------------------------------------------ on disk


def test_an_adapter_folder_loads_back_with_the_same_logits(tiny_folders, tiny_tokenizer, tmp_path, ids):
    from peft import PeftModel

    folder = tiny_folders("policy")
    policy = trained(add_lora(causal_lm(folder), lora_model(folder))).eval()
    save_pretrained(policy, tiny_tokenizer, tmp_path / "model", init_distributed())
    saved = tmp_path / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= {
        p.name for p in saved.iterdir()
    }
    assert not (saved / "model.safetensors").exists()
    assert all(".lora_" in k for k in load_file(saved / "adapter_model.safetensors"))  # adapters only
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)

    expected = logits(policy, ids)
    loaded = causal_lm(saved)  # base + adapters, merged
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    assert all(p.requires_grad for p in loaded.parameters())  # a next stage may train it in full
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)
    # peft's own format: peft reads it back, unmerged, to the last bit
    assert torch.equal(logits(PeftModel.from_pretrained(causal_lm(folder), saved).eval(), ids), expected)


def test_a_merged_save_gives_the_adapter_models_logits(tiny_folders, tiny_tokenizer, tmp_path, ids):
    folder = tiny_folders("policy")
    policy = trained(add_lora(causal_lm(folder), lora_model(folder, save_merged=True))).eval()
    save_pretrained(policy, tiny_tokenizer, tmp_path / "model", init_distributed(), merged=True)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    assert (tmp_path / "model-adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()  # a plain model: no peft needed
    torch.testing.assert_close(logits(merged, ids), logits(policy, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        logits(causal_lm(tmp_path / "model-adapter"), ids), logits(merged, ids), atol=1e-6, rtol=0
    )
    # the hand merge of the gathered weights is peft's own
    mine = merged_state(policy, policy.state_dict())
    from peft import PeftModel

    peft_merged = PeftModel.from_pretrained(causal_lm(folder), tmp_path / "model-adapter").merge_and_unload()
    for name, tensor in peft_merged.state_dict().items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-7, rtol=0)


def test_packed_sft_rows_through_the_adapters_give_the_padded_log_probs(tiny_folders):
    """peft's wrapper passes packed attention's layout on to the base model's layers."""
    from pipeline.data.tokenize import TokenizedExample, collate
    from pipeline.logprobs import response_token_logps
    from pipeline.packing import pack, packed_forward

    folder = tiny_folders("policy")
    policy = trained(add_lora(causal_lm(folder), lora_model(folder))).eval()
    examples = [TokenizedExample([5, 6, 7, 8, 9, 10], 2), TokenizedExample([11, 12, 13], 1)]
    padded = collate(examples, pad_id=0)
    expected = response_token_logps(policy, padded["input_ids"], padded["attention_mask"], padded["labels"])[0]
    packed = pack(examples, pad_id=0)
    with packed_forward(policy, packed) as layout:
        got = response_token_logps(policy, packed["input_ids"], None, packed["labels"], forward_kwargs=layout)[0]
    assert expected.sum() < -1.0
    torch.testing.assert_close(got.sum(), expected.sum(), atol=1e-5, rtol=0)


def test_a_reward_model_keeps_its_head_and_statistics_through_its_adapter_folder(
    tiny_folders, tiny_tokenizer, tmp_path, ids
):
    folder = tiny_folders("sft")
    hf = reward_model(folder)
    hf = trained(add_lora(hf, lora_model(folder), head=True))
    hf.config.reward_mean, hf.config.reward_std = 0.25, 2.0
    head = ScalarHead(hf).eval()
    save_pretrained(head, tiny_tokenizer, tmp_path / "rm", init_distributed(), hf_model=hf, prefix="model.")
    check_reward_model_path("reward.models.0", str(tmp_path / "rm"))  # a one-label classifier, as PPO checks
    loaded = from_pretrained(AutoModelForSequenceClassification, tmp_path / "rm", dtype=torch.float32)
    assert (loaded.config.num_labels, loaded.config.reward_mean, loaded.config.reward_std) == (1, 0.25, 2.0)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(ScalarHead(loaded.eval())(ids, mask), head(ids, mask), atol=1e-5, rtol=0)


def test_an_adapter_folder_without_its_base_or_with_foreign_adapters_is_one_line(
    tiny_folders, tiny_tokenizer, tmp_path
):
    folder = tiny_folders("policy")
    policy = trained(add_lora(causal_lm(folder), lora_model(folder)))
    save_pretrained(policy, tiny_tokenizer, tmp_path / "model", init_distributed())
    config_file = tmp_path / "model" / "adapter_config.json"
    config = json.loads(config_file.read_text())

    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(InputError, match="which is not there"):
        causal_lm(tmp_path / "model")

    other = tiny_folders("wide", n_embd=64)  # same module names, other shapes
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    with pytest.raises(InputError, match="wide: cannot load the model"):
        causal_lm(tmp_path / "model")

    config_file.write_text(json.dumps(config))
    weights = load_file(tmp_path / "model" / "adapter_model.safetensors")
    dropped = next(k for k in weights if "lora_B" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model" / "adapter_model.safetensors")
    with pytest.raises(InputError, match="adapters do not fit .*missing .*lora_B"):  # never fresh zeros in silence
        causal_lm(tmp_path / "model")


def _optim():
    from pipeline.config import OptimConfig

    return OptimConfig()


# ------------------------------------------------------------------------- every stage, end to end


@pytest.fixture(scope="module")
def lora_pipeline(small_pipeline, tmp_path_factory) -> dict[str, Path]:
    """The small pipeline's SFT model as a "pretrained" base (trained, so its samples make pairs)."""
    return build_lora_pipeline(small_pipeline["root"] / "sft" / "model", tmp_path_factory.mktemp("lora"))


def build_lora_pipeline(base: Path, root: Path) -> dict[str, Path]:
    """sft -> pairs -> reward -> dpo -> ppo through the CLI, every stage with adapters, each a few steps."""
    lora = dict(LORA)  # no dropout: the two-process run must follow the one-process loss curve
    sft = tiny_sft_config(root / "sft", max_steps=4, eval_every=0, save_every=0)
    sft["model"] = {"name_or_path": str(base), "lora": lora}
    sft["optim"]["lr"] = 1e-3
    pairs_data = {
        "train": [{"path": str(root / "pairs" / "train.jsonl"), "format": "prompt_chosen_rejected"}],
        "eval": [{"path": str(root / "pairs" / "test.jsonl"), "format": "prompt_chosen_rejected"}],
        "max_length": 48,
        "max_prompt_length": 16,
    }
    sft_model = str(root / "sft" / "model")
    short = {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "log_every": 1, "eval_every": 0}
    prompts = {
        "train": [{"path": "builtin:sentiment", "format": "reviews", "split": "train", "max_rows": 100}],
        "eval": [{"path": "builtin:sentiment", "format": "reviews", "split": "test", "max_rows": 20}],
        "max_length": 48,
        "max_prompt_length": 16,
    }
    configs = {
        "sft": sft,
        "pairs": {
            "output_dir": str(root / "pairs"),
            "model": {"name_or_path": sft_model},
            "data": prompts,
            "num_train_prompts": 24,
            "num_eval_prompts": 6,
            "pairing": {"samples_per_prompt": 3},
            "sample": {"max_new_tokens": 12},
        },
        "reward": {
            "output_dir": str(root / "reward"),
            "model": {"name_or_path": sft_model, "lora": {**lora, "save_merged": True}},
            "data": pairs_data,
            "optim": {"lr": 1e-3, "min_warmup_steps": 1},
            "train": {**short, "max_steps": 2, "save_every": 0},
        },
        "dpo": {
            "output_dir": str(root / "dpo"),
            "model": {"name_or_path": sft_model, "lora": lora},
            "data": pairs_data,
            "optim": {"lr": 1e-3, "min_warmup_steps": 1},
            "reference": {"cache_dir": str(root / "cache")},
            "train": {**short, "save_every": 2},
            "sample": {"num_prompts": 1, "max_new_tokens": 4},
        },
        "ppo": {
            "output_dir": str(root / "ppo"),
            "model": {"name_or_path": sft_model, "lora": lora},
            # the reward model's adapters (and so the value model's base): a chain of adapter folders
            "reward": {"kind": "model", "models": [str(root / "reward" / "model-adapter")]},
            "data": {**prompts, "eval": []},
            "rollout": {"max_new_tokens": 8},
            "ppo": {"rollout_batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 8, "epochs": 1},
            "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
            "train": {"max_steps": 2, "log_every": 1, "save_every": 1},
            "sample_table_every": 0,
        },
    }
    paths = {name: write_yaml(root / f"{name}.yaml", config) for name, config in configs.items()}
    run_ok("sft", str(paths["sft"]))
    run_ok("data", "pairs", str(paths["pairs"]))
    for stage in ("reward", "dpo", "ppo"):
        run_ok(stage, str(paths[stage]))
    return {"root": root, **paths}


@pytest.mark.slow
def test_every_stage_trains_adapters_and_the_next_stage_loads_them(lora_pipeline):
    root = lora_pipeline["root"]
    for run in ("sft", "dpo", "ppo"):
        assert (root / run / "model" / "adapter_config.json").is_file(), run
        assert not (root / run / "model" / "model.safetensors").exists(), run
        params = next(m for m in read_metrics(root / run) if "params/trainable" in m)
        assert 0 < params["params/trainable"] < params["params/total"] / 10, (run, params)
    assert (root / "ppo" / "value" / "adapter_config.json").is_file()  # the value model keeps its own head
    assert "base_model.model.score.weight" in load_file(root / "ppo" / "value" / "adapter_model.safetensors")
    # reward: save_merged writes model/ as a plain model, the adapters beside it
    assert (root / "reward" / "model" / "model.safetensors").is_file()
    assert (root / "reward" / "model-adapter" / "adapter_config.json").is_file()
    # checkpoints hold adapters only
    assert (root / "dpo" / "checkpoints" / "step-2" / "model" / "adapter_model.safetensors").is_file()

    dpo = read_metrics(root / "dpo")
    assert dpo[0]["reference_cache_hit"] is False
    first = next(m for m in dpo if m.get("step") == 1 and "loss" in m)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference before the first update
    assert "reference" not in json.loads((root / "dpo" / "cost.json").read_text())["forward_passes"]
    ppo = [m for m in read_metrics(root / "ppo") if "objective/kl" in m]
    # The reference is the policy, adapters off: 0 up to the rounding between the sampler's one-token
    # steps (the old log-probs) and the reference's whole-sequence pass, summed over a response.
    assert ppo[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_a_shared_value_head_trains_beside_the_adapters_and_resumes(lora_pipeline):
    """value_model: shared under LoRA: the head trains in full beside the policy's adapters, and a
    run resumed from its step-1 checkpoint ends with the uninterrupted run's adapters and head."""
    root = lora_pipeline["root"]
    out = root / "ppo-shared"
    args = ["ppo", str(lora_pipeline["ppo"]), *sets(f"output_dir={out}", "value_model=shared")]
    run_ok(*args)
    assert (out / "model" / "adapter_config.json").is_file() and not (out / "value").exists()
    params = next(m for m in read_metrics(out) if "params/trainable" in m)
    assert 0 < params["params/trainable"] < params["params/total"] / 10
    metrics = [m for m in read_metrics(out) if "objective/kl" in m]
    assert metrics[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(m["loss/value"] > 0 for m in metrics)
    files = {"model": "adapter_model.safetensors", "value-head": "value_head.safetensors"}
    whole = {name: load_file(out / name / file) for name, file in files.items()}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]  # the final step is the model
    run_ok(*args, "--resume")
    for name, file in files.items():
        resumed = load_file(out / name / file)
        assert all(torch.equal(resumed[k], whole[name][k]) for k in whole[name]), name


@pytest.mark.slow
def test_compare_reads_adapter_folders_merged_models_and_adapter_checkpoints(lora_pipeline):
    root = lora_pipeline["root"]
    config = write_yaml(
        root / "compare.yaml",
        {
            "output_dir": str(root / "compare"),
            "sft": str(root / "sft"),
            "reward": str(root / "reward"),
            "policies": [
                {"name": "dpo", "method": "dpo", "run": str(root / "dpo")},
                {"name": "ppo", "method": "ppo", "run": str(root / "ppo")},
            ],
            "best_of_n": [2],
            "num_prompts": 8,
            "temperatures": [1.0],
            "max_new_tokens": 6,
            "bootstrap_resamples": 50,
            "batch_size": 8,
        },
    )
    run_ok("compare", str(config))
    results = json.loads((root / "compare" / "results.json").read_text())
    assert {m["name"] for m in results["methods"]} == {"sft", "best-of-2", "dpo", "ppo"}
    points = {(p["name"], str(p["step"])) for p in results["frontier"]}
    assert {("dpo", "2"), ("ppo", "1"), ("dpo", "final")} <= points, points


@pytest.mark.slow
def test_a_resumed_lora_run_continues_from_its_adapters(lora_pipeline):
    """The DPO run saved adapters at step 2; resuming replays steps 3-4 on the base plus those adapters."""
    root = lora_pipeline["root"]
    before = {m["step"]: m["loss"] for m in read_metrics(root / "dpo") if "loss" in m}
    adapters = load_file(root / "dpo" / "model" / "adapter_model.safetensors")
    result = run_cli("dpo", str(lora_pipeline["dpo"]), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    after = {m["step"]: m["loss"] for m in read_metrics(root / "dpo") if "loss" in m}
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], abs=1e-5)
    resumed = load_file(root / "dpo" / "model" / "adapter_model.safetensors")
    for name, tensor in adapters.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------- two FSDP2 processes


@pytest.mark.slow
def test_two_processes_train_only_the_adapters_and_leave_the_base_bit_identical(lora_pipeline, tmp_path):
    """DPO with LoRA sharded over two processes, saved merged: every weight LoRA does not adapt is the base's
    to the bit, and each adapted one is exactly base + the saved adapters' delta (the same hand merge,
    redone here from the untouched base), so the frozen base was never updated, while the adapters moved."""
    root = lora_pipeline["root"]
    out = tmp_path / "dpo-2"
    run_ok(
        "dpo",
        str(lora_pipeline["dpo"]),
        "--num-processes",
        "2",
        "--set",
        f"output_dir={out}",
        "--set",
        "model.lora.save_merged=true",
        "--set",
        f"reference.cache_dir={tmp_path / 'cache'}",  # computed by the sharded policy, adapters off
    )
    sft = causal_lm(root / "sft" / "model")  # the policy's base: the SFT adapters merged into the scratch base
    adapter_folder = out / "model-adapter"
    adapters = load_file(adapter_folder / "adapter_model.safetensors")
    assert all(tensor.abs().max() > 0 for name, tensor in adapters.items() if "lora_B" in name)  # they moved

    rebuilt = add_lora(sft, ModelConfig(name_or_path=str(root / "sft" / "model"), lora=LoraConfig(**LORA)))
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(rebuilt, {k.removeprefix("base_model.model."): v for k, v in adapters.items()})
    expected = merged_state(rebuilt, rebuilt.state_dict())
    saved = load_file(out / "model" / "model.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name]), name

    # the optimizer holds the adapters only, and a checkpoint is the adapters and their optimizer state
    state = torch.load(out / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True)
    optimized = list(state["optimizers"]["model"]["state"])
    assert len(optimized) == len(adapters) and all(".lora_" in name for name in optimized), optimized[:3]
    assert {p.name for p in (out / "checkpoints" / "step-2" / "model").iterdir()} >= {"adapter_model.safetensors"}
    assert not (out / "checkpoints" / "step-2" / "model" / "model.safetensors").exists()

    losses = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
    one = {m["step"]: m["loss"] for m in read_metrics(root / "dpo") if "loss" in m}
    for step in losses:
        assert losses[step] == pytest.approx(one[step], abs=2e-4), (losses, one)
