"""The command line: data inspect on the real HH-RLHF file, help, and stage errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import read_metrics, run_cli, sets, tiny_sft_config, write_yaml


def test_data_inspect_on_real_hh_prints_counts_drops_lengths_and_examples(shared_data, tmp_path):
    config = write_yaml(
        tmp_path / "dpo.yaml",
        {
            "model": {"name_or_path": "scratch", "architecture": {"vocab_size": 512}},
            "data": {
                "train": [{"path": str(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf"}],
                "max_length": 256,
                "max_prompt_length": 192,
            },
        },
    )
    result = run_cli("data", "inspect", str(config))
    assert result.returncode == 0, result.stderr
    out = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "kept 2303, dropped 9" in out
    assert "differing context: 5" in out and "empty response: 4" in out
    assert "token lengths" in out and "p50" in out
    assert out.count("⟦") >= 6  # three examples, chosen and rejected, with the masked prompt marked
    # A scratch tokenizer's chat template renders the dialogues: the masked prompt ends by opening
    # the assistant's turn, and the trained reply ends with the EOS that closes it.
    assert "<|im_start|>assistant ⟧" in out and "<|im_end|>" in out


def test_data_inspect_reports_a_missing_file_in_one_line(tmp_path):
    config = write_yaml(
        tmp_path / "sft.yaml", {"data": {"train": [{"path": str(tmp_path / "nope.jsonl"), "format": "text"}]}}
    )
    result = run_cli("data", "inspect", str(config))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no such file" in result.stderr


def test_every_stage_is_a_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("sft", "reward", "dpo", "ppo", "data", "compare", "adherence", "doctor", "experiment"):
        assert command in result.stdout
    result = run_cli("data", "--help")
    assert "inspect" in result.stdout and "pairs" in result.stdout and "gatt" in result.stdout


def test_a_stage_with_a_missing_model_fails_in_one_line(tmp_path):
    config = write_yaml(
        tmp_path / "dpo.yaml",
        {
            "model": {"name_or_path": str(tmp_path / "no-model")},
            "data": {"train": [{"path": str(tmp_path / "p.jsonl"), "format": "prompt_chosen_rejected"}]},
        },
    )
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n')
    result = run_cli("dpo", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ------------------------------------------------------------------- faults end to end (slow)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_divergence_stops_naming_the_step_and_saves_no_nan(tmp_path):
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(run_dir))
    result = run_cli(
        "sft", str(config), "--set", "optim.lr=1e3", "--set", "train.max_steps=30", "--set", "train.save_every=1"
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert last_line(result).startswith("error: step ") and "the run stopped before this step's update" in last_line(
        result
    )
    assert not (run_dir / "model").exists()
    kept = sorted((run_dir / "checkpoints").iterdir())
    assert kept  # the last good checkpoints are still there, and hold finite weights
    for checkpoint in kept:
        weights = load_file(checkpoint / "model" / "model.safetensors")
        assert all(bool(t.isfinite().all()) for t in weights.values()), checkpoint
    assert all(math.isfinite(m["loss"]) for m in read_metrics(run_dir) if "loss" in m)


@pytest.mark.slow
def test_a_fresh_run_never_overwrites_an_earlier_one(tmp_path):
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(run_dir, max_steps=3, save_every=2))
    assert run_cli("sft", str(config)).returncode == 0
    (run_dir / "checkpoints" / "notes.txt").write_text("mine")
    model = (run_dir / "model" / "model.safetensors").read_bytes()
    again = run_cli("sft", str(config))
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (run_dir / "model" / "model.safetensors").read_bytes() == model
    replaced = run_cli("sft", str(config), "--overwrite", "--set", "train.seed=1")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert (run_dir / "checkpoints" / "notes.txt").read_text() == "mine"
    assert (run_dir / "model" / "model.safetensors").read_bytes() != model


@pytest.mark.slow
def test_resume_refuses_a_changed_model_and_accepts_more_steps(tmp_path):
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(run_dir))
    assert run_cli("sft", str(config)).returncode == 0
    changed = run_cli("sft", str(config), "--resume", "--set", "model.architecture.n_layer=4")
    assert changed.returncode == 2
    assert "model.architecture.n_layer (2 -> 4)" in last_line(changed) and len(changed.stderr.strip().splitlines()) == 1
    longer = run_cli("sft", str(config), "--resume", "--set", "train.max_steps=8")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "train.max_steps (6 -> 8)" in " ".join(longer.stderr.split())
    assert max(m["step"] for m in read_metrics(run_dir)) == 8


@pytest.mark.slow
def test_errors_in_a_two_process_run_end_with_the_ranks_own_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "README.md").write_text("somebody's notes")
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(run_dir))
    result = run_cli("sft", str(config), "--num-processes", "2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result).startswith("error: rank 0: ") and "already holds README.md" in last_line(result)
    diverged = run_cli(
        "sft",
        str(config),
        "--num-processes",
        "2",
        *sets(f"output_dir={tmp_path / 'other'}", "optim.lr=1e3", "train.max_steps=30"),
    )
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    assert last_line(diverged).startswith("error: rank ") and "the gradient norm is" in last_line(diverged)


@pytest.mark.slow
def test_user_text_with_rich_markup_is_printed_as_it_is(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"[INST] review film {i} [/INST]", "completion": " a [bold] fine [/b] film."} for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_sft_config(tmp_path / "run", max_steps=2)
    source = {"path": str(data), "format": "prompt_completion"}
    config["data"] = {"train": [source], "eval": [source], "max_length": 64, "max_prompt_length": 24}
    result = run_cli("sft", str(write_yaml(tmp_path / "sft.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[INST] review film" in result.stderr and (tmp_path / "run" / "README.md").is_file()


def test_a_sample_table_with_markup_in_it_prints():
    from rich.console import Console

    from pipeline.ppo import _sample_table

    console = Console(record=True, width=200)
    console.print(_sample_table(1, [("[INST] hi [/INST]", "[/b] fine", 0.5, 0.1)]))
    assert "[INST] hi [/INST]" in console.export_text()


def small_dpo_config(tmp_path, policy, pairs, train: dict | None = None, **data) -> Path:
    """A DPO config on `policy` and a pairs file, 32-token sequences, its reference cache in tmp_path."""
    config = {
        "output_dir": str(tmp_path / "dpo"),
        "model": {"name_or_path": str(policy)},
        "data": {
            "train": [{"path": str(pairs), "format": "prompt_chosen_rejected"}],
            "max_length": 32,
            "max_prompt_length": 8,
            **data,
        },
        "reference": {"cache_dir": str(tmp_path / "cache")},
    }
    if train:
        config["train"] = train
    return write_yaml(tmp_path / "dpo.yaml", config)


@pytest.mark.slow
def test_damaged_model_files_are_named_in_one_line(tmp_path, tiny_folders):
    policy = tiny_folders("policy")
    weights = policy / "model.safetensors"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": "the film", "chosen": f" is good {i}.", "rejected": " is bad."}) + "\n"
            for i in range(40)
        )
    )
    config = small_dpo_config(tmp_path, policy, pairs, train={"batch_size": 8, "micro_batch_size": 8, "max_steps": 1})
    for damage in (lambda b: b[: len(b) // 2], lambda b: os.urandom(len(b))):
        weights.write_bytes(damage(weights.read_bytes()))
        result = run_cli("dpo", str(config), "--overwrite")
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()  # found by the config check, before any data or model loads
        assert len(lines) == 1 and str(weights) in lines[0] and "re-run the stage that wrote it" in lines[0], lines


@pytest.mark.slow
def test_every_pair_dropped_is_one_line_with_the_counts_and_writes_no_cache(tmp_path, tiny_folders):
    policy = tiny_folders("policy")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": "a very long prompt " * 10, "chosen": " good.", "rejected": " bad."}) + "\n"
            for _ in range(20)
        )
    )
    config = small_dpo_config(tmp_path, policy, pairs, long_prompts="drop")
    result = run_cli("dpo", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no training example is left" in last_line(result) and "prompt too long" in last_line(result)
    assert not (tmp_path / "cache").exists()


def test_data_inspect_checks_with_the_stages_own_schema(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(
        "# rlhfdpo sft mine.yaml\nmodel: {architecture: {n_positions: 64}}\n"
        "data: {max_length: 128, max_prompt_length: 16}\n"
    )
    result = run_cli("data", "inspect", str(config))
    assert result.returncode == 2
    assert "data.max_length" in result.stderr and "64 positions" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    unnamed = tmp_path / "mine2.yaml"
    unnamed.write_text("data: {max_length: 128, max_prompt_length: 16}\n")
    result = run_cli("data", "inspect", str(unnamed))
    assert result.returncode == 2 and "pass --stage" in result.stderr


def test_a_truncated_compressed_file_is_named_not_aborted(tmp_path):
    import gzip

    from pipeline.config import SourceConfig
    from pipeline.data.records import DataError
    from pipeline.data.sources import read_rows

    words = [f"w{i * 7919 % 10007}" for i in range(4000)]  # little repetition: the gzip stream is long
    for name, text in (
        ("rows.jsonl.gz", "".join(json.dumps({"text": w}) + "\n" for w in words)),
        ("rows.csv.gz", "text\n" + "".join(w + "\n" for w in words)),
    ):
        path = tmp_path / name
        compressed = gzip.compress(text.encode())
        path.write_bytes(compressed[: len(compressed) // 2])
        with pytest.raises(DataError, match="the compressed file ends early"):
            read_rows(SourceConfig(path=str(path), format="text"))
    # Through the command line it is one line, not click's bare "Aborted!".
    config = write_yaml(tmp_path / "sft.yaml", {"data": {"train": [{"path": str(path), "format": "text"}]}})
    result = run_cli("data", "inspect", str(config))
    assert result.returncode == 2 and "Aborted" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: the compressed file ends early (truncated); download or write it again"
    ]


def test_evaluate_names_an_unknown_policy_in_one_line_before_any_model_loads(tmp_path):
    config = write_yaml(tmp_path / "compare.yaml", {"policies": [{"name": "dpo-b0.1", "method": "dpo", "run": "x"}]})
    result = run_cli("evaluate", str(config), *sets("policy=dpo-b0.11"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "policy: 'dpo-b0.11' is not sft or one of policies ['dpo-b0.1'] (did you mean 'dpo-b0.1'?)" in result.stderr
