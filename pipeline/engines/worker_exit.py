"""End a finished worker process without the interpreter's teardown.

A worker process that imported TensorFlow spends ~1 s of CPU in Python's teardown
(TensorFlow's and gRPC's exit hooks, every module's objects) after its work is written.
On the local machine that second is paid per worker, on cores the run shares: the Beam
runner closes its SDK worker processes one after the other, and a Dask `LocalCluster`
waits for its workers to end. Worker processes that the engines start themselves
(`pipeline.engines.beam`: the local runner's SDK workers; `pipeline.engines.dask`: the
workers of a cluster `run_dask` starts) call `exit_fast` once their work is done: their
exit hooks then end the process with `os._exit` after flushing the logs and streams.

The exit status is kept: after an uncaught exception in the main script the hook does
nothing (the process ends as Python ends it), and `exit_fast` wraps `sys.exit` so the
hook ends the process with the status asked for. That covers `multiprocessing`'s spawned
children, Dask's worker processes among them: a failure in the process's target is
printed and ends in ``sys.exit(1)``.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

__all__ = ["exit_fast", "exit_now"]

_REAL_EXIT = sys.exit
_STATUS: list[object] = []  # the argument of the last `sys.exit` call, once wrapped


def _exit(status: object = None) -> None:
    """`sys.exit`, remembering `status` for `exit_now`."""
    _STATUS[:] = [status]
    _REAL_EXIT(status)


def exit_now() -> None:
    """The `atexit` hook: flush the logs and standard streams, then `os._exit` with the
    status of the last `sys.exit` (0 if none); nothing after an uncaught exception."""
    if getattr(sys, "last_value", None) is not None:
        return
    status = _STATUS[0] if _STATUS else None
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)  # as Python does with `sys.exit("message")`
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status or 0)


def exit_fast() -> None:
    """Make `exit_now` the first `atexit` hook to run (hooks run last-in first-out; call
    it again after an import that registers its own, TensorFlow's say), and have
    `sys.exit` tell it the status."""
    sys.exit = _exit
    atexit.unregister(exit_now)
    atexit.register(exit_now)
