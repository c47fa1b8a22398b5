"""The real-experiment configs (configs/imdb/) run on the real IMDb reviews in ../shared/data with a
tiny from-scratch model, through --set overrides alone: hub ids swapped for local files, no network.
The model is a small llama (the suite's whole-pipeline run with a modern architecture). The hub
sentiment classifier cannot load offline, so the gold reward falls back to VADER, and says so."""

from __future__ import annotations

import json

import pytest

from helpers import run_ok

pytestmark = pytest.mark.slow


def test_imdb_configs_run_end_to_end_on_real_reviews(shared_data, tmp_path):
    csv = str(shared_data / "imdb" / "imdb-reviews-sample.csv.gz")
    out = {name: tmp_path / name for name in ("sft", "pairs", "reward", "dpo", "ppo", "compare")}
    local = lambda section, rows: [f"{section}.path={csv}", f"{section}.columns={{}}", f"{section}.max_rows={rows}"]  # noqa: E731
    sets = lambda items: [a for item in items for a in ("--set", item)]  # noqa: E731
    model = [f"model.name_or_path={out['sft'] / 'model'}"]
    pair_files = [
        f"data.train.0.path={out['pairs'] / 'train.jsonl'}",
        f"data.eval.0.path={out['pairs'] / 'test.jsonl'}",
    ]

    run_ok(
        "sft",
        "configs/imdb/sft.yaml",
        *sets(
            [
                f"output_dir={out['sft']}",
                "model.name_or_path=scratch",
                # A llama model: the whole pipeline, compare included, with RoPE, RMSNorm, SwiGLU and GQA.
                "model.architecture={type: llama, n_layer: 2, n_head: 4, n_kv_head: 2, n_embd: 32, n_positions: 128, vocab_size: 512}",
                *local("data.train.0", 600),
                *local("data.eval.0", 40),
                "data.max_length=128",
                "data.max_prompt_length=32",
                "optim.lr=3e-3",
                "train.max_steps=8",
                "train.batch_size=16",
                "train.micro_batch_size=16",
                "sample.max_new_tokens=8",
            ]
        ),
    )
    pairs = run_ok(
        "data",
        "pairs",
        "configs/imdb/pairs.yaml",
        *sets(
            [
                f"output_dir={out['pairs']}",
                *model,
                *local("data.train.0", 200),
                *local("data.eval.0", 60),
                "num_train_prompts=60",
                "num_eval_prompts=20",
                "sample.max_new_tokens=16",
            ]
        ),
    )
    assert "using vader instead" in pairs.stderr  # the configured classifier needs the hub
    summary = json.loads((out["pairs"] / "summary.json").read_text())
    assert summary["train"]["prompts"] == 60 and summary["train"]["pairs"] > 0

    run_ok(
        "reward",
        "configs/imdb/reward.yaml",
        *sets(
            [
                f"output_dir={out['reward']}",
                *model,
                *pair_files,
                "train.max_steps=3",
                "train.batch_size=16",
                "train.micro_batch_size=16",
            ]
        ),
    )
    run_ok(
        "dpo",
        "configs/imdb/dpo.yaml",
        *sets(
            [
                f"output_dir={out['dpo']}",
                *model,
                *pair_files,
                f"reference.cache_dir={tmp_path / 'cache'}",
                "train.max_steps=3",
                "train.batch_size=16",
                "train.micro_batch_size=8",
                "optim.min_warmup_steps=1",
            ]
        ),
    )
    run_ok(
        "ppo",
        "configs/imdb/ppo.yaml",
        *sets(
            [
                f"output_dir={out['ppo']}",
                *model,
                f"reward.models=[{out['reward'] / 'model'}]",
                *local("data.train.0", 200),
                "ppo.rollout_batch_size=16",
                "ppo.mini_batch_size=8",
                "ppo.micro_batch_size=8",
                "train.max_steps=2",
                "rollout.max_new_tokens=16",
                "train.save_every=0",
            ]
        ),
    )
    run_ok(
        "compare",
        "configs/imdb/compare.yaml",
        *sets(
            [
                f"output_dir={out['compare']}",
                f"sft={out['sft']}",
                f"reward={out['reward']}",
                *local("prompt_data.train.0", 1),
                *local("prompt_data.eval.0", 100),
                f"policies=[{{name: dpo, method: dpo, run: {out['dpo']}}}, {{name: ppo, method: ppo, run: {out['ppo']}}}]",
                "best_of_n=[2]",
                "num_prompts=20",
                "temperatures=[1.0]",
                "frontier_temperature=1.0",
                "max_new_tokens=16",
            ]
        ),
    )
    results = json.loads((out["compare"] / "results.json").read_text())
    assert results["gold"] == "vader" and results["prompts"]["count"] == 20
    assert {m["name"] for m in results["methods"]} == {"sft", "best-of-2", "dpo", "ppo"}
    for stage in ("sft", "reward", "dpo", "ppo"):
        config = json.loads((out[stage] / "model" / "config.json").read_text())
        assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2, stage
