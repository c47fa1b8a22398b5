"""Sharded runs: two processes follow the one-process loss curve; one launched process matches a plain one."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import read_metrics, run_cli, run_ok, tiny_sft_config, write_yaml


# ------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_two_processes_follow_the_one_process_loss_curve(small_pipeline, stage, tmp_path):
    short = ["--set", "train.max_steps=4", "--set", "train.log_every=1", "--set", "data.train.0.max_rows=600"]
    if stage == "dpo":
        short += ["--set", f"reference.cache_dir={tmp_path / 'cache'}"]
    losses = {}
    for n in (1, 2):
        out = tmp_path / f"{stage}-{n}"
        run_ok(stage, str(small_pipeline[stage]), *short, "--set", f"output_dir={out}", "--num-processes", str(n))
        losses[n] = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
        assert (out / "model" / "model.safetensors").is_file()
    assert sorted(losses[1]) == sorted(losses[2]) == [1, 2, 3, 4]
    for step in losses[1]:
        assert losses[2][step] == pytest.approx(losses[1][step], abs=2e-4), (losses[1], losses[2])


# ------------------------------------------------------------------------------------ a world of one
@pytest.mark.slow
def test_one_launched_process_wraps_with_fsdp_and_trains_as_one_plain_process(tmp_path):
    """`launch.always_launch` runs one process under `accelerate launch`: FSDP2 wraps, shards over a
    world of one and gathers to save, and the result is the plain one-process run's."""
    from safetensors.torch import load_file

    models, losses = {}, {}
    for name, extra in (("plain", []), ("launched", ["--set", "launch.always_launch=true"])):
        out = tmp_path / name
        config = write_yaml(tmp_path / f"{name}.yaml", tiny_sft_config(out))
        run_ok("sft", str(config), *extra)
        losses[name] = [m["loss"] for m in read_metrics(out) if "loss" in m]
        models[name] = load_file(out / "model" / "model.safetensors")
        card = (out / "README.md").read_text()
        assert ("FSDP2-sharded" in card) == (name == "launched"), card
    assert losses["launched"] == pytest.approx(losses["plain"], abs=1e-4)
    assert models["launched"].keys() == models["plain"].keys()
    for key, weight in models["plain"].items():
        assert torch.allclose(models["launched"][key], weight, atol=1e-4), key


def test_more_processes_than_gpus_is_one_line_before_anything_launches(tmp_path, monkeypatch):
    """One process per GPU: on a one-GPU machine `--num-processes 2` would fail deep inside NCCL."""
    if os.environ.get("RLHFDPO_TEST_SUBPROCESS") == "1":
        pytest.skip("the GPU count is faked in this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(tmp_path / "run"))
    result = run_cli("sft", str(config), "--num-processes", "2")
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "launch.num_processes" in message and "has 1" in message and "always_launch" in message, message
    assert not (tmp_path / "run").exists()
