"""Experiment steps started as forks of one process that has imported torch, transformers and the stages.

A fresh `python -m pipeline.cli` spends about 5 s (on a busy machine 10) importing before a step
does any work, and `make compare` starts about 80 steps. The runner cannot fork itself: it may have
run torch operations, so it may hold OpenMP's or a test runner's threads, and the fork of a process
with threads can hang forever on a lock that a vanished thread held. So the runner starts this
server as a fresh process with one OpenMP thread (no thread pool) that imports the libraries, runs
no torch operation, and forks a child per step. The child takes the step's working directory,
environment, thread count and log, runs the command line as `rlhfdpo` would, and exits with its
status, as a fresh process would have.

The protocol is JSON lines. The runner writes {"start": id, "argv", "env", "cwd", "log"} and
{"stop": id} on the server's stdin; the server writes {"exited": id, "code"} to the reply pipe
(a code below 0 is the signal that ended the step, as subprocess reports it). The server ends when
its stdin closes, stopping the steps still running.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

# What every stage imports (pipeline.cli imports the stages' modules only once a config is good).
PRELOAD = (
    "torch",
    "transformers",
    "pipeline.cli",
    "pipeline.sft",
    "pipeline.pairs",
    "pipeline.reward",
    "pipeline.dpo",
    "pipeline.ppo",
    "pipeline.compare",
    "pipeline.evaluate",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama",
)


def forks_safely() -> bool:
    """Whether steps may be forks: Linux. macOS's system libraries may abort a forked child (Python's
    own multiprocessing spawns there), and Windows has no fork: there each step is a fresh process."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class StepServer:
    """The runner's end: start the server, start and stop steps, collect their exit codes."""

    def __init__(self, environ: dict[str, str]):
        replies_read, replies_write = os.pipe()
        env = dict(environ, OMP_NUM_THREADS="1", RLHFDPO_STEP_SERVER_REPLIES=str(replies_write))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.step_server"], stdin=subprocess.PIPE, env=env, pass_fds=(replies_write,)
        )
        os.close(replies_write)
        self._replies = os.fdopen(replies_read, "rb", buffering=0)
        self._pending = b""
        self._started: set[str] = set()
        self.exit_codes: dict[str, int] = {}

    def start(self, step_id: str, argv: list[str], env: dict[str, str], log: Path | None) -> ForkedStep:
        request = {"start": step_id, "argv": argv, "env": env, "cwd": os.getcwd(), "log": str(log) if log else None}
        self._send(request)
        return ForkedStep(self, step_id)

    def stop(self, step_id: str) -> None:
        self._send({"stop": step_id})

    def collect(self, wait: float = 0.0) -> None:
        """Read the exit codes the server has written (waiting up to `wait` seconds for one)."""
        while select.select([self._replies], [], [], wait)[0]:
            chunk = self._replies.read(65536)
            if not chunk:  # the server is gone: every step it ran ends with its status
                code = self.process.wait()
                for step_id in self._started:
                    self.exit_codes.setdefault(step_id, code if code else 1)
                return
            self._pending += chunk
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                reply = json.loads(line)
                self.exit_codes[reply["exited"]] = reply["code"]
            wait = 0.0

    def close(self) -> None:
        """Stop the server; it stops the steps still running and waits for them."""
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait()
        self._replies.close()

    def _send(self, message: dict) -> None:
        if "start" in message:
            self._started.add(message["start"])
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:  # the server died; collect() reports its steps as failed
            pass


class ForkedStep:
    """A step run by the server, with the part of subprocess.Popen's interface the runner uses."""

    def __init__(self, server: StepServer, step_id: str):
        self.server, self.step_id = server, step_id

    @property
    def returncode(self) -> int | None:
        return self.server.exit_codes.get(self.step_id)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server.collect()
        return self.returncode

    def terminate(self) -> None:
        if self.returncode is None:
            self.server.stop(self.step_id)

    def wait(self) -> int:
        while self.returncode is None:
            self.server.collect(wait=0.5)
        return self.returncode


# ---- the server's end


def serve(replies_fd: int) -> None:
    children: dict[int, str] = {}  # pid -> step id
    pending = b""
    stdin_open = True
    while stdin_open or children:
        if stdin_open and select.select([0], [], [], 0.1)[0]:
            chunk = os.read(0, 65536)
            if not chunk:
                stdin_open = False
                for pid in children:  # the runner is done or gone: nothing goes on unwatched
                    _signal(pid, signal.SIGTERM)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                if "start" in request:
                    children[_fork_step(request, replies_fd)] = request["start"]
                elif "stop" in request:
                    for pid, step_id in children.items():
                        if step_id == request["stop"]:
                            _signal(pid, signal.SIGTERM)
        elif not stdin_open:
            select.select([], [], [], 0.1)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            step_id = children.pop(pid, None)
            if step_id is not None:
                reply = {"exited": step_id, "code": os.waitstatus_to_exitcode(status)}
                os.write(replies_fd, (json.dumps(reply) + "\n").encode())


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _fork_step(request: dict, replies_fd: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = _run_step(request, replies_fd)
    finally:
        os._exit(code)


def _run_step(request: dict, replies_fd: int) -> int:
    """In the child: become the step's process, run its command line, return its exit status."""
    import atexit
    import random
    import traceback

    os.close(replies_fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a step as it stops a fresh process
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["log"]:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    code = 0
    try:
        import torch

        from pipeline.cli import main
        from pipeline.console import console

        torch.set_num_threads(_threads(request["env"]))
        random.seed()  # a fresh process's unseeded state, not the server's copy
        torch.seed()
        console.__init__(stderr=True)  # colours and width for where stderr now goes, as a fresh process picks
        sys.argv = ["rlhfdpo", *request["argv"]]
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    except BaseException:  # noqa: BLE001 - a bug: its traceback in the step's log, status 1
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # what the step registered (trackers' flush), as a process's exit runs them
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code


def _threads(env: dict[str, str]) -> int:
    """The OpenMP threads a fresh process with this environment would use."""
    try:
        return max(1, int(env["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0))


def main() -> None:
    # Ctrl-C in the terminal reaches the runner, the server and the steps alike: the steps stop, the
    # runner reports it, and the server ends when the runner closes its stdin, not with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies_fd = int(os.environ.pop("RLHFDPO_STEP_SERVER_REPLIES"))
    from pipeline.cli import _quiet_libraries

    _quiet_libraries()
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    serve(replies_fd)


if __name__ == "__main__":
    main()
