"""Errors raised by the SoftMix pipeline.

Every error subclasses `PipelineError`, itself a `ValueError`, so callers can catch
either. Errors that belong to one slide or tile carry a short machine-readable
`reason` string: the same string the run reports under `slides_failed` or
`tiles_skipped` when it is told to skip bad input instead of failing.
"""

from __future__ import annotations

__all__ = [
    "ManifestError",
    "OutputExistsError",
    "PipelineError",
    "SlideError",
    "TileReadError",
]


class PipelineError(ValueError):
    """Base class of every error the pipeline raises on bad input."""


class ManifestError(PipelineError):
    """The slide manifest is missing, empty or malformed."""


class SlideError(PipelineError):
    """One slide cannot be used (missing, not OME-Zarr, bad metadata, too small...).

    Attributes:
        slide_id: the manifest's id of the slide (or its path when unknown).
        reason: short skip reason, e.g. ``"missing"``, ``"bad_metadata"``.
    """

    def __init__(self, slide_id: str, reason: str, message: str):
        super().__init__(f"slide {slide_id!r}: {message}")
        self.slide_id = slide_id
        self.reason = reason

    def __reduce__(self):  # keep pickling (Beam, Dask) faithful to the arguments
        return (type(self), (self.slide_id, self.reason, self.args[0].split(": ", 1)[-1]))


class TileReadError(PipelineError):
    """One tile cannot be read (corrupt chunk, NaN pixels...).

    Attributes:
        tile: the `TileKey` (or its string form).
        reason: short skip reason, e.g. ``"read_error"``, ``"nan_pixels"``.
    """

    def __init__(self, tile: object, reason: str, message: str):
        super().__init__(f"tile {tile}: {message}")
        self.tile = tile
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.tile, self.reason, self.args[0].split(": ", 1)[-1]))


class OutputExistsError(PipelineError):
    """The output directory already holds a dataset and overwrite was not asked for."""
