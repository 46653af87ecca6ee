"""Quiet start-up of the CLI's worker processes (Beam SDK workers, Dask workers).

`softmix beam|dask` (without ``--verbose``) puts this folder first on ``PYTHONPATH``,
so Python imports this module at start-up in every process the run spawns. Beam's SDK
worker otherwise prints the import-time "apitools not found" warning and, because that
warning installs a root handler, all its INFO start-up logs. Here a root handler that
shows errors only is installed first (so `logging.basicConfig` does nothing), then any
`sitecustomize` this one shadows is run.
"""

import logging
import os
import sys


class _Quiet(logging.Filter):
    """Beam's own logs are dropped (a worker's failure reaches the driver as the run's
    error); errors of other code still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("apache_beam") or record.name == "__main__":
            return record.levelno >= logging.CRITICAL
        return "apitools not found" not in record.getMessage()


_handler = logging.StreamHandler()
_handler.setLevel(logging.ERROR)
_handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
_handler.addFilter(_Quiet())
logging.getLogger().addHandler(_handler)

_here = os.path.dirname(os.path.abspath(__file__))


def _run_shadowed() -> None:
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_run_shadowed()
