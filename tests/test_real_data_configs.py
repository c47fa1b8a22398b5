"""configs/hh/ and configs/imdb-sample/, the real-data experiments of `make hh` and `make imdb-sample`.

configs/hh/ runs end to end on the real HH-RLHF dialogues, shrunk through --set alone: a llama model
and its tokenizer from scratch, multi-turn SFT through the built-in chat template, a reward model
and DPO scored on the held-out pairs with their intervals. configs/imdb-sample/ uses the stages
tests/test_imdb_configs.py runs on the same reviews; here every one of its configs must load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, read_metrics, run_ok, sets
from pipeline.config import STAGES, config_from_dict


@pytest.mark.slow
def test_hh_configs_run_end_to_end_on_real_dialogues(shared_data, tmp_path):
    sft, reward, dpo = (tmp_path / name for name in ("sft", "reward", "dpo"))
    shrink = ["data.train.0.max_rows=240", "train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=8"]
    run_ok(
        "sft",
        "configs/hh/sft.yaml",
        *sets(
            f"output_dir={sft}",
            "model.architecture={type: llama, n_layer: 1, n_head: 2, n_kv_head: 1, n_embd: 32, n_positions: 256, vocab_size: 600}",
            *shrink,
            "sample.max_new_tokens=8",
        ),
    )
    tokenizer_config = json.loads((sft / "model" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in json.dumps(tokenizer_config) or (sft / "model" / "chat_template.jinja").is_file()
    model = f"model.name_or_path={sft / 'model'}"
    run_ok("reward", "configs/hh/reward.yaml", *sets(f"output_dir={reward}", model, *shrink))
    run_ok(
        "dpo",
        "configs/hh/dpo.yaml",
        *sets(
            f"output_dir={dpo}", model, *shrink, f"reference.cache_dir={tmp_path / 'cache'}", "sample.max_new_tokens=8"
        ),
    )
    final_reward = [m for m in read_metrics(reward) if "eval/accuracy" in m][-1]
    assert final_reward["eval/accuracy_low"] <= final_reward["eval/accuracy"] <= final_reward["eval/accuracy_high"]
    assert final_reward["eval/pairs"] >= 10  # the held-out ~10% of 240 rows
    final_dpo = [m for m in read_metrics(dpo) if "eval/rewards/accuracies" in m][-1]
    assert final_dpo["eval/rewards/accuracies_low"] <= final_dpo["eval/rewards/accuracies"]
    assert final_dpo["eval/rewards/accuracies"] <= final_dpo["eval/rewards/accuracies_high"]


@pytest.mark.parametrize("folder", ["hh", "imdb-sample"])
def test_every_real_data_config_loads_and_the_experiment_names_them(folder):
    experiment = yaml.safe_load((ROOT / "configs" / folder / "experiment.yaml").read_text())
    named = {step["config"] for step in experiment["steps"]}
    files = {f"configs/{folder}/{p.name}" for p in (ROOT / "configs" / folder).glob("*.yaml")} - {
        f"configs/{folder}/experiment.yaml"
    }
    assert named == files
    for step in experiment["steps"]:
        raw = yaml.safe_load((ROOT / step["config"]).read_text())
        config_from_dict(STAGES[step["stage"]], raw, check=False)  # unknown keys and wrong types fail here
        for source in (raw.get("data") or raw.get("prompt_data") or {}).get("train", []):
            path = Path(source["path"])
            assert path.parts[:3] == ("..", "shared", "data") or path.parts[0] == "runs", path
