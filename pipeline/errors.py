"""Failures that end a command with one line and a non-zero exit, never a traceback.

`ConfigError` and `DataError` are bad input found before any model loads (exit 2). Two more are
found later:

- `InputError`: a file or folder the user named cannot be used (a corrupt model, an output folder
  that holds another run, a checkpoint whose config differs). Exit 2, like a bad config.
- `RunFailed`: the run itself cannot go on (a non-finite loss, a full disk). Exit 1. What was
  saved before stays as it was.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# Set by `launch.relaunch` for the processes it starts: where a failing rank leaves its message.
ERROR_DIR_ENV = "RLHFDPO_ERROR_DIR"


class ConfigError(ValueError):
    """A bad config. The message is one line: `file: key.path: what is wrong`."""


class DataError(ValueError):
    """Bad input data; the message names the source and the row."""


class InputError(ValueError):
    """A named file or folder cannot be used; the message says which and what to do."""


class RunFailed(RuntimeError):
    """The run stopped; the message names the step and what was kept."""


def report_failure(code: int, message: str) -> None:
    """Inside a launched process: leave this rank's failure for the launching process to print last."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        return
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    report = {"rank": rank, "code": code, "message": message, "time": time.time()}
    (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(report))
