"""`pipeline.engines.worker_exit`: a finished worker process skips Python's teardown and
keeps its exit status (the Beam engine's local SDK workers, `FastExit` on Dask)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_SCRIPT = """
import atexit, sys
atexit.register(lambda: open(sys.argv[1], "w").write("teardown ran"))
from pipeline.engines.worker_exit import exit_fast
exit_fast()
print("work done", end="")
if sys.argv[2] == "fail":
    raise RuntimeError("the harness failed")
if sys.argv[2] == "exit":
    sys.exit(3)
if sys.argv[2] == "message":
    sys.exit("stopped: no slides")
"""


@pytest.mark.parametrize(("mode", "status", "teardown"), [
    ("ok", 0, False),       # done: the hooks and the teardown after it are skipped
    ("fail", 1, True),      # an uncaught exception: Python ends it, as always
    ("exit", 3, False),     # sys.exit(n): skipped, with status n
    ("message", 1, False),  # sys.exit("...") prints the message, status 1
])
def test_a_worker_skips_its_teardown_and_keeps_its_exit_status(mode, status, teardown,
                                                               tmp_path):
    marker = tmp_path / "teardown.txt"
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(marker), mode],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status
    assert done.stdout == "work done"  # flushed before the process ends
    assert marker.exists() is teardown
    assert ("the harness failed" in done.stderr) is (mode == "fail")
    assert ("stopped: no slides" in done.stderr) is (mode == "message")


def _fail_after_exit_fast() -> None:
    from pipeline.engines.worker_exit import exit_fast

    exit_fast()
    raise RuntimeError("the worker failed")


def test_a_spawned_worker_that_fails_keeps_status_1():
    # Dask's worker processes are spawned: multiprocessing prints a failure of the
    # process's target and ends the child with sys.exit(1), which the hook keeps.
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_fail_after_exit_fast)
    child.start()
    child.join(120)
    assert child.exitcode == 1


def test_local_pool_workers_import_the_op_without_keras():
    # `softmix local --workers N` spawns processes that only run the steps: they load
    # TensorFlow and the op as they start, and never Keras (~0.75 CPU s each).
    from pipeline.engines.local import _pool

    probe = "('softmix_tf' in __import__('sys').modules, 'keras' in __import__('sys').modules)"
    with _pool(2) as pool:
        assert list(pool.map(eval, [probe] * 4)) == [(True, False)] * 4
