"""The command line: data inspect on the real HH-RLHF file, help, and stage errors."""

from __future__ import annotations

from conftest import run_cli, write_yaml


def test_data_inspect_on_real_hh_prints_counts_drops_lengths_and_examples(shared_data, tmp_path):
    config = write_yaml(tmp_path / "dpo.yaml", {
        "model": {"name_or_path": "scratch", "architecture": {"vocab_size": 512}},
        "data": {"train": [{"path": str(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"), "format": "hh_rlhf"}],
                 "max_length": 256, "max_prompt_length": 192},
    })
    result = run_cli("data", "inspect", str(config))
    assert result.returncode == 0, result.stderr
    out = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "kept 2303, dropped 9" in out
    assert "differing context: 5" in out and "empty response: 4" in out
    assert "token lengths" in out and "p50" in out
    assert out.count("⟦") >= 6  # three examples, chosen and rejected, with the masked prompt marked
    assert "Assistant:⟧" in out  # the prompt ends at the assistant marker, the response follows


def test_data_inspect_reports_a_missing_file_in_one_line(tmp_path):
    config = write_yaml(tmp_path / "sft.yaml", {"data": {"train": [{"path": str(tmp_path / "nope.jsonl"), "format": "text"}]}})
    result = run_cli("data", "inspect", str(config))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no such file" in result.stderr


def test_every_stage_is_a_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("sft", "reward", "dpo", "ppo", "data"):
        assert command in result.stdout
    result = run_cli("data", "--help")
    assert "inspect" in result.stdout and "pairs" in result.stdout


def test_a_stage_with_a_missing_model_fails_in_one_line(tmp_path):
    config = write_yaml(tmp_path / "dpo.yaml", {"model": {"name_or_path": str(tmp_path / "no-model")},
                                                "data": {"train": [{"path": str(tmp_path / "p.jsonl"), "format": "prompt_chosen_rejected"}]}})
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n')
    result = run_cli("dpo", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
