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


class _DropApitools(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


_handler = logging.StreamHandler()
_handler.setLevel(logging.ERROR)
_handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
logging.getLogger().addHandler(_handler)
logging.getLogger().addFilter(_DropApitools())

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
