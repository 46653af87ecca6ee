"""The Dask engine's public import path: `from pipeline import dask_transforms`.

The implementation lives in `pipeline.engines.dask`; this module re-exports its public names.
"""

from __future__ import annotations

from .engines.dask import FastExit as FastExit
from .engines.dask import WorkerMemoryMonitor as WorkerMemoryMonitor
from .engines.dask import run_dask as run_dask
from .engines.dask import run_job as run_job
from .engines.dask import start_local_cluster as start_local_cluster

__all__ = ["FastExit", "WorkerMemoryMonitor", "run_dask", "run_job", "start_local_cluster"]
