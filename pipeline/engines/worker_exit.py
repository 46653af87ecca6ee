"""End a finished worker process without the interpreter's teardown.

A worker process that imported TensorFlow spends ~1 s of CPU in Python's teardown
(TensorFlow's and gRPC's exit hooks, every module's objects) after its work is written.
On the local machine that second is paid per worker, on cores the run shares: the Beam
runner closes its SDK worker processes one after the other, and a Dask `LocalCluster`
waits for its workers to end. Worker processes that the engines start themselves
(`pipeline.engines.beam`: the local runner's SDK workers; `pipeline.engines.dask`: the
workers of a cluster `run_dask` starts) call `exit_fast` once their work is done: their
exit hooks then end the process with `os._exit` after flushing the logs and streams.

After an uncaught exception it does nothing: the process ends as Python ends it, status
included. A `sys.exit(n)` leaves no trace an exit hook can see and would end with status
0; neither Beam's worker main (`sdk_worker_main.main`) nor a Dask worker process
(`distributed.nanny.WorkerProcess`) calls it: they return, or raise.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

__all__ = ["exit_fast", "exit_now"]


def exit_now() -> None:
    """The `atexit` hook: flush the logs and standard streams, then `os._exit(0)`;
    nothing after an uncaught exception."""
    if getattr(sys, "last_value", None) is not None:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def exit_fast() -> None:
    """Make `exit_now` the first `atexit` hook to run (hooks run last-in first-out; call
    it again after an import that registers its own, TensorFlow's say)."""
    atexit.unregister(exit_now)
    atexit.register(exit_now)
