"""Several machines: two `rlhfdpo` commands on loopback, one process each, act as one two-process job.

Each "machine" is a command of its own with its own `launch.machine_rank`, as a SLURM script starts
them (scripts/slurm/); they meet on 127.0.0.1 over gloo. Every process a test starts is killed when
it ends, whatever happened.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers import CLI_ENV, ROOT, read_metrics, run_ok, sets, tiny_sft_config, write_yaml
from pipeline import launch as launch_module
from pipeline.config import LaunchConfig, SFTConfig, config_from_dict
from pipeline.errors import ConfigError

RUN_LIMIT_S = 150  # one two-machine command; a healthy one takes about 20 s on 2 cores


# ------------------------------------------------------------------------------------ two machines


def free_port() -> int:
    """A port nothing listens on now: the kernel's pick for port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_tree(process: subprocess.Popen) -> None:
    """The command and everything under it: torch's launcher puts each rank in a session of its own."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)


class TwoMachines:
    """`rlhfdpo ARGS` as machines 0 and 1 of a two-machine job on loopback, started together."""

    def __init__(self, tmp_path: Path, name: str, *args: str):
        self.port = free_port()
        self.logs = [(tmp_path / f"{name}-machine-{r}.out", tmp_path / f"{name}-machine-{r}.err") for r in (0, 1)]
        self.processes = []
        for rank, (out, err) in enumerate(self.logs):
            layout = sets(
                "launch.num_machines=2",
                f"launch.machine_rank={rank}",
                "launch.main_process_ip=127.0.0.1",
                f"launch.main_process_port={self.port}",
            )
            command = [sys.executable, "-m", "pipeline.cli", *args, "--num-processes", "2", *layout]
            with out.open("w") as stdout, err.open("w") as stderr:
                self.processes.append(
                    subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=ROOT, env={**_env(), **CLI_ENV})
                )

    def wait(self, limit_s: float = RUN_LIMIT_S) -> list[subprocess.CompletedProcess]:
        """Both commands' results; a command still running after `limit_s` fails the test (all are killed)."""
        deadline = time.monotonic() + limit_s
        try:
            for process in self.processes:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the two machines still ran after {limit_s} s:\n{self.tails()}")
        return [
            subprocess.CompletedProcess(p.args, p.returncode, out.read_text(), err.read_text())
            for p, (out, err) in zip(self.processes, self.logs)
        ]

    def kill(self) -> None:
        for process in self.processes:
            kill_tree(process)

    def tails(self) -> str:
        return "\n".join(f"--- {err.name}\n{err.read_text()[-2000:]}" for _, err in self.logs)

    def __enter__(self) -> TwoMachines:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def _env() -> dict[str, str]:
    # The machine keys must come from the command line alone here, not from the test's environment.
    return {k: v for k, v in os.environ.items() if k not in LaunchConfig.MACHINE_ENVIRONMENT.values()}


def run_two_machines(tmp_path: Path, name: str, *args: str) -> list[subprocess.CompletedProcess]:
    """Both machines to the end. A port taken between choosing and using it is chosen again (twice at most)."""
    for _ in range(3):
        with TwoMachines(tmp_path, name, *args) as machines:
            results = machines.wait()
        if not (results[0].returncode == 2 and "is in use on this machine" in results[0].stderr):
            return results
    return results


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def tiny_dpo_config(tmp_path: Path, policy: Path, name: str) -> Path:
    """DPO on 64 hand-made pairs, a checkpoint every 2 steps, its reference cache in tmp_path/cache-NAME."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"the film {i}", "chosen": f" is good {i}.", "rejected": " is bad."} for i in range(64)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "output_dir": str(tmp_path / name),
        "model": {"name_or_path": str(policy)},
        "data": {
            "train": [{"path": str(pairs), "format": "prompt_chosen_rejected"}],
            "max_length": 32,
            "max_prompt_length": 8,
        },
        "reference": {"cache_dir": str(tmp_path / f"cache-{name}")},
        "optim": {"lr": 1e-2, "min_warmup_steps": 1},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 6, "log_every": 1, "save_every": 2},
        "sample": {"num_prompts": 0},
    }
    return write_yaml(tmp_path / f"{name}.yaml", config)


@pytest.mark.slow
def test_two_machines_follow_the_one_process_loss_curve_and_resume(tmp_path, tiny_folders):
    """Two machines of one process each train as one process does (FSDP2 over both machines' ranks);
    only global rank 0 prints and writes the reference cache and checkpoints; --resume continues
    the same two-machine job from its checkpoint."""
    policy = tiny_folders("policy")
    one = tiny_dpo_config(tmp_path, policy, "one")
    run_ok("dpo", str(one))
    expected = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "one") if "loss" in m}

    two = tiny_dpo_config(tmp_path, policy, "two")
    first = run_two_machines(tmp_path, "first", "dpo", str(two), "--set", "train.max_steps=3")
    assert [r.returncode for r in first] == [0, 0], "\n".join(r.stderr[-2000:] for r in first)
    run = tmp_path / "two"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-2"]
    assert len(list((tmp_path / "cache-two").iterdir())) == 1
    # Rank 0 is global: machine 1's process (local rank 0 there) says nothing of the run.
    assert "cached in" in first[0].stdout + first[0].stderr
    assert "reference log-probs" not in first[1].stdout + first[1].stderr
    assert "dpo (sigmoid" not in first[1].stdout + first[1].stderr

    resumed = run_two_machines(tmp_path, "resumed", "dpo", str(two), "--resume")
    assert [r.returncode for r in resumed] == [0, 0], "\n".join(r.stderr[-2000:] for r in resumed)
    assert "resum" in resumed[0].stderr and "from the cache" in resumed[0].stderr, resumed[0].stderr[-2000:]
    losses = {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}
    assert sorted(losses) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], abs=2e-4), (expected, losses)
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_rank_ends_both_machines_within_seconds_each_naming_its_failure(tmp_path):
    """Rank 1 dies without a word (as the out-of-memory killer leaves it): machine 0's rank loses its
    connection at the next collective, and both commands end, non-zero, with one line that says so."""
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(tmp_path / "run"))
    endless = sets("train.max_steps=100000", "train.eval_every=0", "train.save_every=0")
    with TwoMachines(tmp_path, "fault", "sft", str(config), *endless) as machines:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + RUN_LIMIT_S
        while not (metrics.is_file() and '"loss"' in metrics.read_text()):
            if time.monotonic() > deadline or any(p.poll() is not None for p in machines.processes):
                machines.kill()
                pytest.fail(f"the two machines never trained:\n{machines.tails()}")
            time.sleep(0.2)
        machine_1 = psutil.Process(machines.processes[1].pid).children(recursive=True)
        ranks = [p for p in machine_1 if p.cmdline()[1:4] == ["-u", "-m", "pipeline.cli"]]
        assert len(ranks) == 1, [p.cmdline() for p in machine_1]
        killed_at = time.monotonic()
        ranks[0].kill()
        results = machines.wait(limit_s=60)
        took = time.monotonic() - killed_at
    assert took < 30, f"the job took {took:.0f} s to end after rank 1 was killed"
    assert results[1].returncode != 0 and results[0].returncode != 0, (results[0].returncode, results[1].returncode)
    assert last_line(results[1].stderr).startswith("error: rank 1: stopped without a message of its own")
    lost = last_line(results[0].stderr)
    assert lost.startswith("error: rank 0: lost its connection") and "another machine" in lost, lost


FAKE_SRUN = """#!/usr/bin/env bash
# srun's stand-in: each of SLURM_NNODES tasks on this machine, with its SLURM_NODEID; the first failure is the exit.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_the_slurm_script_runs_one_command_per_node_and_they_meet_as_one_job(tmp_path):
    """scripts/slurm/rlhfdpo.sbatch with srun and scontrol stood in for: 2 nodes of 1 "GPU" on loopback,
    the machine keys from the environment the script sets (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    # A long host list, as a big job's: a script that reads only its first line must not fail on SIGPIPE.
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\nyes localhost | head -n 20000\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(tmp_path / "run", max_steps=2, eval_every=0))
    env = {
        **_env(),
        **CLI_ENV,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "GPUS_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "RLHFDPO": str(Path(sys.executable).parent / "rlhfdpo"),
    }
    script = ROOT / "scripts" / "slurm" / "rlhfdpo.sbatch"
    job = subprocess.Popen(
        ["bash", str(script), "sft", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = job.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        kill_tree(job)
        pytest.fail(f"the SLURM script still ran after {RUN_LIMIT_S} s")
    finally:
        kill_tree(job)
    assert job.returncode == 0, output[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m] == [1, 2]
    assert "ran on: 2 process(es)" in (tmp_path / "run" / "README.md").read_text()


# ------------------------------------------------------------------------------------ the layout


def test_machine_keys_come_from_the_config_then_the_environment_then_the_accelerate_file(tmp_path):
    accelerate = tmp_path / "accelerate.yaml"
    accelerate.write_text("num_machines: 4\nmachine_rank: 3\nmain_process_ip: 10.0.0.9\nmain_process_port: 1234\n")
    file_only = LaunchConfig(num_processes=8, accelerate_config=str(accelerate)).on_machines(environ={})
    assert (file_only.num_machines, file_only.machine_rank, file_only.main_process_ip) == (4, 3, "10.0.0.9")
    assert file_only.main_process_port == 1234
    environ = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "29400"}
    from_env = LaunchConfig(num_processes=8, accelerate_config=str(accelerate)).on_machines(environ=environ)
    assert (from_env.num_machines, from_env.machine_rank, from_env.main_process_ip) == (2, 1, "node-a")
    assert from_env.main_process_port == 29400
    keys = LaunchConfig(num_processes=8, num_machines=4, machine_rank=0, main_process_ip="node-b")
    from_keys = keys.on_machines(environ=environ)
    assert (from_keys.num_machines, from_keys.machine_rank, from_keys.main_process_ip) == (4, 0, "node-b")
    assert from_keys.main_process_port == 29400  # the one key left null still comes from the environment
    alone = LaunchConfig(num_processes=2).on_machines(environ={})
    assert (alone.num_machines, alone.machine_rank, alone.main_process_ip, alone.main_process_port) == (
        1,
        0,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("launch", "environ", "message"),
    [
        (
            {"num_processes": 2, "num_machines": 2, "machine_rank": 2, "main_process_ip": "a"},
            {},
            r"launch\.machine_rank: 2 is not a machine: launch\.num_machines is 2, so machines are numbered 0 to 1",
        ),
        (
            {"num_processes": 2},
            {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"},
            r"launch\.machine_rank \(NODE_RANK\): 2 is not a machine",
        ),
        (
            {"num_processes": 3, "num_machines": 2, "main_process_ip": "a"},
            {},
            r"launch\.num_processes: 3 does not split evenly over 2 machines",
        ),
        (
            {"num_processes": 1},
            {"NNODES": "2", "MASTER_ADDR": "a"},
            r"launch\.num_processes: 1 does not split evenly over 2 machines \(launch\.num_machines \(NNODES\)\)",
        ),
        (
            {"num_processes": 2, "num_machines": 2},
            {},
            r"launch\.main_process_ip: 2 machines need the address of machine 0",
        ),
        (
            {"num_processes": 2, "num_machines": 2, "main_process_ip": "a", "main_process_port": 0},
            {},
            r"works on one machine only",
        ),
        (
            {"num_processes": 2},
            {"NNODES": "two"},
            r"launch\.num_machines \(NNODES\): expected a whole number, got 'two'",
        ),
        (
            {"num_processes": 2},
            {"MASTER_PORT": "70000"},
            r"launch\.main_process_port \(MASTER_PORT\): 70000 is not a port",
        ),
        ({"num_processes": 2, "num_machines": 0}, {}, r"launch\.num_machines: must be at least 1, got 0"),
    ],
)
def test_a_machine_layout_that_cannot_run_is_one_line_naming_where_the_value_came_from(launch, environ, message):
    with pytest.raises(ConfigError, match=message) as err:
        LaunchConfig(**launch).on_machines(environ=environ)
    assert "\n" not in str(err.value)


def test_a_bad_machine_rank_fails_the_config_before_anything_runs(tmp_path):
    config = {**tiny_sft_config(tmp_path / "run"), "launch": {"num_processes": 2, "num_machines": 2, "machine_rank": 5}}
    with pytest.raises(ConfigError, match=r"launch\.machine_rank: 5 is not a machine"):
        config_from_dict(SFTConfig, config)


def test_each_machine_launches_the_whole_layout_and_counts_only_its_own_gpus(monkeypatch):
    """On 2 machines of 1 GPU, 2 processes fit (one each); 4 do not, and the message says per machine."""
    launched = []
    monkeypatch.setattr(launch_module.subprocess, "run", lambda command, **_: launched.append(command) or _done())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for variable in LaunchConfig.MACHINE_ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    layout = {"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.1.2.3", "main_process_port": 29400}
    assert launch_module.relaunch(LaunchConfig(num_processes=2, **layout), ["sft", "x.yaml"]) == (0, None)
    command = " ".join(launched[0])
    assert "--num_processes 2 --num_machines 2 --machine_rank 1" in command, command
    assert "--main_process_ip 10.1.2.3 --main_process_port 29400 -m pipeline.cli sft x.yaml" in command, command
    with pytest.raises(
        ConfigError, match=r"4 processes on 2 machines are 2 per machine, one GPU each, and this machine has 1"
    ):
        launch_module.relaunch(LaunchConfig(num_processes=4, **layout), ["sft", "x.yaml"])


def _done() -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], 0)


def test_the_launcher_names_the_cause_before_the_ranks_that_lost_their_connection(tmp_path):
    """What each machine's launcher prints last, from what its ranks left: a rank's own message, else
    a rank that started and vanished, else a lost connection whose cause is on another machine."""

    def left(folder: Path, started: list[int], reports: dict[int, tuple[float, str]]) -> Path:
        folder.mkdir()
        for rank in started:
            (folder / f"started-{rank}").touch()
        for rank, (when, message) in reports.items():
            report = {"rank": str(rank), "code": 1, "message": message, "time": when}
            (folder / f"rank-{rank}.json").write_text(json.dumps(report))
        return folder

    lost = "RuntimeError: [pair.cc:537] Read error [127.0.0.1]:945: Connection reset by peer. This is typically ..."
    cause = left(tmp_path / "cause", [0, 1], {0: (1.0, lost), 1: (2.0, "RunFailed: step 3: the loss is nan")})
    assert launch_module.failure(cause, 1) == (1, "rank 1: RunFailed: step 3: the loss is nan")
    silent = left(tmp_path / "silent", [0, 1, 2], {0: (1.0, lost), 2: (1.1, lost)})
    code, message = launch_module.failure(silent, 1)
    assert message.startswith("rank 1: stopped without a message of its own"), message
    elsewhere = left(tmp_path / "elsewhere", [0], {0: (1.0, lost)})
    code, message = launch_module.failure(elsewhere, 1, num_machines=2)
    assert message == (
        "rank 0: lost its connection to a process that stopped first; it ran on another machine, whose output "
        "says why (RuntimeError: [pair.cc:537] Read error [127.0.0.1]:945: Connection reset by peer)"
    )
    assert launch_module.failure(left(tmp_path / "nothing", [], {}), 7) == (7, None)
