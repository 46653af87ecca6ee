"""SoftMix offline pipeline: OME-Zarr slides -> tiles -> SoftMix -> sharded TFRecords.

`import pipeline` loads only the configs and errors; engines are imported explicitly
(`from pipeline import beam_transforms`, `from pipeline import dask_transforms`) so
Dask users never pay for Beam and vice versa.
"""

from __future__ import annotations

from .config import MixConfig as MixConfig
from .config import OutputConfig as OutputConfig
from .config import TileConfig as TileConfig
from .errors import ManifestError as ManifestError
from .errors import OutputExistsError as OutputExistsError
from .errors import PipelineError as PipelineError
from .errors import SlideError as SlideError
from .errors import TileReadError as TileReadError

__all__ = [
    "ManifestError",
    "MixConfig",
    "OutputConfig",
    "OutputExistsError",
    "PipelineError",
    "SlideError",
    "TileConfig",
    "TileReadError",
    "dataset_stats",
    "read_dataset",
    "stream_dataset",
]


def read_dataset(*args, **kwargs):  # noqa: ANN002, ANN003 - lazy: TensorFlow is heavy
    """Read a SoftMix output directory as a `tf.data.Dataset`; see `pipeline.dataset.reader`."""
    from .dataset.reader import read_dataset as _read_dataset

    return _read_dataset(*args, **kwargs)


def stream_dataset(*args, **kwargs):  # noqa: ANN002, ANN003 - lazy: TensorFlow is heavy
    """Stream mixed tiles from slides into a `tf.data.Dataset`; see `pipeline.engines.stream`."""
    from .engines.stream import stream_dataset as _stream_dataset

    return _stream_dataset(*args, **kwargs)


def dataset_stats(dataset):  # noqa: ANN001, ANN201 - lazy, like stream_dataset
    """The live `StreamStats` of a `stream_dataset` (or of a dataset made from one)."""
    from .engines.stream import dataset_stats as _dataset_stats

    return _dataset_stats(dataset)
