"""Strict config loading: every mistake is one line naming the file and the key."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    RATING_LEVELS,
    DPOConfig,
    PairsConfig,
    RewardConfig,
    RewardLossConfig,
    SFTConfig,
    load_config,
)
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    return path


def test_shipped_sft_config_loads_with_defaults_filled():
    cfg = load_config(SFTConfig, ROOT / "configs" / "sft.yaml")
    assert cfg.model.name_or_path == "scratch"
    assert cfg.optim.betas == [0.9, 0.95]  # Llama 2 default kept where the file is silent
    assert cfg.optim.weight_decay == 0.1
    assert cfg.data.train[0].path == "builtin:sentiment"


def test_unknown_key_names_file_path_and_closest_key(tmp_path):
    path = write(tmp_path, "optim:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    message = str(err.value)
    assert str(path) in message and "optim.learning_rat" in message
    assert "unknown key" in message
    path = write(tmp_path, "optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.weight_decy: unknown key; did you mean 'weight_decay'\?"):
        load_config(SFTConfig, path)


def test_unknown_key_inside_a_list_item(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    - {path: x.jsonl, fromat: text}\n")
    with pytest.raises(ConfigError, match=r"data\.train\.0\.fromat: unknown key; did you mean 'format'"):
        load_config(SFTConfig, path)


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer: unknown key; did you mean 'optim'"):
        load_config(SFTConfig, write(tmp_path, "optimizer: {lr: 1}\n"))


def test_wrong_type_names_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer, got str 'many'"):
        load_config(SFTConfig, write(tmp_path, "train: {batch_size: many}\n"))
    with pytest.raises(ConfigError, match=r"data\.strict: expected true or false"):
        load_config(SFTConfig, write(tmp_path, "data: {strict: 3}\n"))
    with pytest.raises(ConfigError, match=r"optim\.betas: expected a list"):
        load_config(SFTConfig, write(tmp_path, "optim: {betas: 0.9}\n"))


def test_literal_choice_suggests_closest(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"optim\.schedule: expected one of cosine, linear, constant, got 'cosin'; did you mean 'cosine'",
    ):
        load_config(SFTConfig, write(tmp_path, "optim: {schedule: cosin}\n"))


def test_impossible_values(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr: must be positive"):
        load_config(SFTConfig, write(tmp_path, "optim: {lr: -0.1}\n"))
    with pytest.raises(ConfigError, match=r"data\.max_length: must be at least 1"):
        load_config(SFTConfig, write(tmp_path, "data: {max_length: 0}\n"))
    with pytest.raises(ConfigError, match=r"max_prompt_length: 64 leaves no room"):
        load_config(SFTConfig, write(tmp_path, "data: {max_length: 64, max_prompt_length: 64}\n"))
    with pytest.raises(ConfigError, match=r"min_score_ratio: only used by format 'shp'"):
        load_config(SFTConfig, write(tmp_path, "data:\n  train: [{path: a.jsonl, format: text, min_score_ratio: 2}]\n"))
    with pytest.raises(ConfigError, match=r"batch_size: 30 does not split evenly over 4 processes"):
        load_config(SFTConfig, write(tmp_path, "train: {batch_size: 30}\nlaunch: {num_processes: 4}\n"))


def test_architecture_and_lora_values_are_checked(tmp_path):
    bad = {
        "model: {architecture: {type: llama, n_head: 4, n_embd: 132}}": r"n_head: RoPE needs an even head size",
        "model: {architecture: {n_kv_head: 2}}": r"n_kv_head: only used by type llama or qwen2, not gpt2",
        "model: {architecture: {tie_word_embeddings: false}}": r"GPT-2 always ties its output layer",
        "model: {architecture: {type: qwen2, rope_theta: 0}}": r"rope_theta: must be positive",
        "model: {name_or_path: gpt2, lora: {r: 0}}": r"model\.lora\.r: must be at least 1",
        "model: {name_or_path: gpt2, lora: {target_modules: []}}": r"target_modules: name at least one module",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(SFTConfig, write(tmp_path, text + "\n"))
    with pytest.raises(ConfigError, match=r"model\.lora: pairs only samples from the model"):
        load_config(PairsConfig, write(tmp_path, "model: {name_or_path: gpt2, lora: {r: 8}}\n"))


def test_missing_empty_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(SFTConfig, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(SFTConfig, write(tmp_path, ""))
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2, column 1: found character .\\t."):
        load_config(SFTConfig, write(tmp_path, "optim:\n\tlr: 1\n"))
    with pytest.raises(ConfigError, match="expected a mapping of config sections"):
        load_config(SFTConfig, write(tmp_path, "- a\n- b\n"))


def test_yaml_is_read_with_safe_load(tmp_path):
    path = write(tmp_path, "output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, path)


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    - {path: a.jsonl, format: text}\n")
    cfg = load_config(
        SFTConfig,
        path,
        ["optim.lr=3e-4", "train.max_steps=7", "data.train.0.path=b.jsonl", "model.architecture.n_layer=2"],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 7
    assert cfg.data.train[0].path == "b.jsonl"
    assert cfg.model.architecture.n_layer == 2


def test_override_errors(tmp_path):
    path = write(tmp_path, "train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number, got str 'abc'"):
        load_config(SFTConfig, path, ["optim.lr=abc"])
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean 'lr'"):
        load_config(SFTConfig, path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(SFTConfig, path, ["optim.lr"])


def test_resolved_config_round_trips(tmp_path):
    from pipeline.config import write_resolved

    cfg = load_config(SFTConfig, ROOT / "configs" / "sft.yaml", ["optim.lr=5e-4"])
    written = write_resolved(cfg, tmp_path)
    again = load_config(SFTConfig, written)
    assert again == cfg
    assert "weight_decay" in yaml.safe_load(written.read_text())["optim"]  # every default written


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "optim.lr=abc"], "optim.lr: expected a number"),
        (["--set", "optim.lerning_rate=1"], "did you mean"),
        (
            ["--set", "model.architecture={type: llama, n_head: 4, n_kv_head: 3}"],
            "model.architecture.n_kv_head: 3 does not divide n_head=4",
        ),
        (["--set", "model.lora={r: 8}"], "model.lora: a model created from scratch has nothing to adapt"),
    ],
)
def test_cli_reports_one_line_without_traceback(args, needle):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sft", str(ROOT / "configs" / "sft.yaml"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_misspelled_key_in_file(tmp_path):
    path = write(tmp_path, "trian: {epochs: 1}\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sft", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: trian: unknown key; did you mean 'train'?"


@pytest.mark.parametrize("name", ["sft", "pairs", "reward", "dpo", "ppo"])
def test_every_shipped_config_loads(name, tmp_path):
    from pipeline.config import STAGES

    fake_model = tmp_path / "model"  # the earlier stages' outputs do not exist in a fresh clone
    fake_model.mkdir()
    (fake_model / "config.json").write_text("{}")
    overrides = [] if name == "sft" else [f"model.name_or_path={fake_model}"]
    if name == "ppo":
        fake_reward = tmp_path / "reward"  # a reward model is a one-label sequence classifier
        fake_reward.mkdir()
        (fake_reward / "config.json").write_text(
            '{"architectures": ["GPT2ForSequenceClassification"], "id2label": {"0": "LABEL_0"}}'
        )
        overrides.append(f"reward.models.0={fake_reward}")
    cfg = load_config(STAGES[name], ROOT / "configs" / f"{name}.yaml", overrides)
    assert cfg.output_dir == f"runs/{name}"


def test_a_missing_model_folder_is_a_config_error(tmp_path):
    path = write(tmp_path, "model: {name_or_path: runs/never/model}\n")
    with pytest.raises(ConfigError, match=r"model\.name_or_path: no model folder at runs/never/model"):
        load_config(SFTConfig, path)
    cfg = load_config(SFTConfig, write(tmp_path, "model: {name_or_path: gpt2}\n"))  # a hub id is not checked here
    assert cfg.model.name_or_path == "gpt2"


def test_negative_periods_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.eval_every: must not be negative"):
        load_config(SFTConfig, write(tmp_path, "train: {eval_every: -1}\n"))


@pytest.mark.parametrize("name", ["experiment.yaml", "experiment-quick.yaml"])
def test_experiment_plans_load_and_name_only_earlier_steps(name):
    from pipeline.config import ExperimentConfig

    cfg = load_config(ExperimentConfig, ROOT / "configs" / name)
    assert cfg.steps[-1].stage == "compare"


def test_experiment_rejects_a_step_that_reads_a_later_one(tmp_path):
    from pipeline.config import ExperimentConfig

    path = tmp_path / "experiment.yaml"
    path.write_text(f"steps:\n  - {{name: dpo, stage: dpo, config: {ROOT / 'configs' / 'dpo.yaml'}, after: [sft]}}\n")
    with pytest.raises(ConfigError, match=r"steps\.0\.after: 'sft' is not an earlier step"):
        load_config(ExperimentConfig, path)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
def test_non_finite_numbers_are_config_errors(tmp_path, value):
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a finite number"):
        load_config(SFTConfig, write(tmp_path, f"optim: {{lr: {value}}}\n"))
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a finite number"):
        load_config(SFTConfig, write(tmp_path, "{}\n"), [f"optim.lr={value}"])


def test_a_malformed_set_value_is_one_line(tmp_path):
    path = write(tmp_path, "{}\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sft", str(path), "--set", "optim.lr=[1,"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --set optim.lr=[1,: the value is not valid YAML ("), lines
    assert lines[0].endswith("quote it or fix the brackets") and "Traceback" not in result.stderr


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_bytes("optim: {lr: 1.0e-3}  # \u00e9\n".encode("latin-1"))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sft", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not UTF-8 text" in lines[0] and str(path) in lines[0], result.stderr


def test_every_config_choice_is_exactly_a_dispatch_table(tmp_path):
    """A value the config accepts always has an implementation, and every implementation is reachable."""
    import typing

    from pipeline.advantages import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS
    from pipeline.config import DPOLossConfig, KLConfig, PPOAlgoConfig, SourceConfig, StepSpec
    from pipeline.data.adapters import FORMATS
    from pipeline.dpo import PREFERENCE_LOSSES

    def allowed(cls, name):
        return set(typing.get_args(typing.get_type_hints(cls)[name]))

    assert allowed(DPOLossConfig, "type") == set(PREFERENCE_LOSSES)
    assert allowed(SourceConfig, "format") == set(FORMATS)
    assert allowed(KLConfig, "estimator") == set(KL_ESTIMATORS)
    assert allowed(PPOAlgoConfig, "advantage") == set(ADVANTAGE_ESTIMATORS)
    # An experiment step names any stage that leaves an output folder (the stage table's entries).
    from pipeline.stages import STAGES as stage_table

    assert allowed(StepSpec, "stage") == {name for name, stage in stage_table.items() if stage.output}


def test_an_unknown_name_past_the_config_lists_the_valid_ones():
    import torch

    from pipeline.advantages import kl_penalty
    from pipeline.config import DPOLossConfig, SourceConfig
    from pipeline.data.adapters import pair_adapter
    from pipeline.data.records import DataError
    from pipeline.dpo import preference_loss

    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss 'robust'; valid: sigmoid, ipo, hinge"):
        preference_loss(DPOLossConfig(type="robust"), x, x, x, x, x)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="unknown format 'alpaca'; valid formats: text, "):
        pair_adapter(SourceConfig(path="x.jsonl", format="alpaca"), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'; known: k1, k3"):
        kl_penalty(x, x, "k2")


def test_a_reward_model_must_be_a_one_label_classifier(tmp_path):
    from pipeline.config import ConfigError, PPOConfig

    causal = tmp_path / "sft"
    causal.mkdir()
    (causal / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    path = tmp_path / "ppo.yaml"
    path.write_text(f"model: {{name_or_path: {causal}}}\nreward: {{models: [{causal}]}}\n")
    with pytest.raises(ConfigError, match=r"reward\.models\.0: .* is not a reward model \(GPT2LMHeadModel"):
        load_config(PPOConfig, path)


def test_unknown_rating_level_in_margin_map_is_rejected(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("model: {name_or_path: gpt2}\nloss:\n  rating_margins: {significantly beter: 1.0}\n")
    with pytest.raises(
        ConfigError,
        match=r"loss\.rating_margins\.significantly beter: unknown rating level; did you mean 'significantly better'",
    ):
        load_config(RewardConfig, path)


@pytest.mark.parametrize("variant", ["ipo", "hinge"])
def test_option_a_dpo_variant_does_not_use_is_rejected(tmp_path, variant):
    path = tmp_path / "dpo.yaml"
    path.write_text(f"model: {{name_or_path: gpt2}}\nloss: {{type: {variant}, label_smoothing: 0.1}}\n")
    with pytest.raises(ConfigError, match=rf"loss\.label_smoothing: only used by type 'sigmoid'.*not '{variant}'"):
        load_config(DPOConfig, path)


def test_rating_levels_are_llama2s_four():
    assert RATING_LEVELS == ("significantly better", "better", "slightly better", "negligibly better")
    assert math.isclose(RewardLossConfig().rating_margins["slightly better"], 1 / 3)


@pytest.mark.parametrize(
    "name",
    [
        "experiment.yaml",
        "experiment-quick.yaml",
        "gatt/experiment.yaml",
        "hh/experiment.yaml",
        "imdb/experiment.yaml",
        "imdb-sample/experiment.yaml",
    ],
)
def test_every_step_of_every_shipped_experiment_resolves_for_every_seed(name, monkeypatch):
    """Each step's config with its overrides (seed filled in) is a valid config: no key a stage does
    not know, no value it rejects. Model folders are made by earlier steps, so their checks are off."""
    import pipeline.config.schema as schema
    from pipeline.config import ExperimentConfig
    from pipeline.experiment import expand_seeds, step_output
    from pipeline.stages import STAGES

    monkeypatch.setattr(schema, "check_model_path", lambda *args, **kwargs: None)
    monkeypatch.setattr(schema, "check_reward_model_path", lambda *args, **kwargs: None)
    plan = load_config(ExperimentConfig, ROOT / "configs" / name)
    outputs = []
    for step, _ in expand_seeds(plan):
        cfg = load_config(STAGES[step.stage].config, ROOT / step.config, step.set)
        outputs.append(step_output(cfg))
    assert len(set(outputs)) == len(outputs)  # no two steps (or seeds) write to the same folder
