"""Sharded runs: two processes follow the one-process loss curve."""

from __future__ import annotations

import pytest

from helpers import read_metrics, run_ok


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
