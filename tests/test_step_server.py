"""The experiment runner's fork server: steps forked from a fresh process that imported torch once,
each with its own working directory, environment, log and exit status, stoppable, and the server
itself without threads to lose in a fork."""

from __future__ import annotations

import json
import os
import time

import pytest

from helpers import ROOT, tiny_sft_config, write_yaml
from pipeline.step_server import StepServer, _threads, forks_safely


@pytest.fixture(scope="module")
def server():
    # This pytest process has run torch operations (OpenMP threads): the server must not inherit them.
    import torch

    torch.ones(256, 256) @ torch.ones(256, 256)
    started = StepServer(dict(os.environ))
    yield started
    started.close()


def write_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_a_step_runs_the_command_line_in_its_directory_with_its_log_and_exit_status(server, tmp_path, monkeypatch):
    write_run(tmp_path / "healthy", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}])
    write_run(tmp_path / "broken", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}])
    monkeypatch.chdir(tmp_path)  # the step resolves relative paths where the runner stands
    env = dict(os.environ, COLUMNS="300")
    ok = server.start("ok", ["doctor", "healthy"], env, tmp_path / "ok.log")
    bad = server.start("bad", ["doctor", "--strict", "broken"], env, tmp_path / "bad.log")
    assert ok.wait() == 0 and bad.wait() == 1
    assert "healthy: no known failure mode" in (tmp_path / "ok.log").read_text()
    assert "non-finite values" in (tmp_path / "bad.log").read_text()


def test_a_failing_stage_leaves_its_one_line_in_the_log(server, tmp_path):
    log = tmp_path / "step.log"
    step = server.start("bad-config", ["sft", str(tmp_path / "missing.yaml")], dict(os.environ), log)
    assert step.wait() == 2
    text = log.read_text()
    assert "missing.yaml: no such config file" in text and "Traceback" not in text


def test_the_console_is_set_up_for_the_steps_own_log_and_environment(server, tmp_path):
    """The server's console was made for the server's stderr and environment; each step's is made
    again for its own, as a fresh process's would be: plain in a log, coloured where FORCE_COLOR asks."""
    inspect = ["data", "inspect", str(ROOT / "configs" / "quick" / "sft.yaml")]
    plain_step = server.start("plain", inspect, dict(os.environ), tmp_path / "plain.log")
    coloured = server.start("coloured", inspect, dict(os.environ, FORCE_COLOR="1"), tmp_path / "coloured.log")
    assert plain_step.wait() == 0 and coloured.wait() == 0
    plain, colour = (tmp_path / "plain.log").read_text(), (tmp_path / "coloured.log").read_text()
    assert "SFT examples" in plain and "\x1b[" not in plain
    assert "\x1b[" in colour


def test_a_stopped_step_ends_by_its_signal_and_the_server_has_no_thread_to_lose(server, tmp_path):
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(tmp_path / "run", max_steps=100000))
    step = server.start("long", ["sft", str(config)], dict(os.environ, OMP_NUM_THREADS="1"), tmp_path / "long.log")
    time.sleep(1.0)
    assert step.poll() is None  # still training
    # Forked from a process with one thread: no OpenMP pool, no lock held by a thread the fork drops.
    assert len(os.listdir(f"/proc/{server.process.pid}/task")) == 1
    step.terminate()
    assert step.wait() == -15  # SIGTERM, reported as subprocess reports a signal
    assert not (tmp_path / "run" / "model").exists()


def test_a_step_without_a_thread_count_gets_the_cores_a_fresh_process_would():
    assert _threads({"OMP_NUM_THREADS": "3"}) == 3
    assert _threads({}) == len(os.sched_getaffinity(0))
    assert _threads({"OMP_NUM_THREADS": "junk"}) == len(os.sched_getaffinity(0))


def test_steps_are_forks_on_linux_only(monkeypatch):
    import sys

    assert forks_safely() == sys.platform.startswith("linux")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not forks_safely()
