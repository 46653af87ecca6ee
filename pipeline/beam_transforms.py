"""The Apache Beam engine's public import path: `from pipeline import beam_transforms`.

The implementation lives in `pipeline.engines.beam`; this module re-exports its public names.
"""

from __future__ import annotations

from .engines.beam import MixBuckets as MixBuckets
from .engines.beam import PairStrips as PairStrips
from .engines.beam import PlansToStrips as PlansToStrips
from .engines.beam import SlidesToPlans as SlidesToPlans
from .engines.beam import WriteShards as WriteShards
from .engines.beam import build_pipeline as build_pipeline
from .engines.beam import local_pipeline_options as local_pipeline_options
from .engines.beam import run_beam as run_beam

__all__ = [
    "MixBuckets",
    "PairStrips",
    "PlansToStrips",
    "SlidesToPlans",
    "WriteShards",
    "build_pipeline",
    "local_pipeline_options",
    "run_beam",
]
