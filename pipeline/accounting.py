"""The accounting of a run: what happened to every tile, what was read, what was reused.

Accounting rule (what the manifest's ``accounting`` reports):

- Every tile the tiling step looked at counts once in `tiles_total`.
- Tiles rejected by tiling (e.g. ``background``) count under their reason, from the
  `SlidePlan` (`Accounting.from_plan`). A failed slide counts in `slides_failed`.
- A tile kept by tiling is *pending* until its outcome is reported: unusable when its
  chunks are read (``missing_chunk``, ``read_error``, ``nonfinite_pixels``), used when it
  is source `a` of at least one example, else ``no_partner``.
- Hence ``tiles_total == tiles_used + sum(tiles_skipped.values()) + tiles_pending``
  holds for every partial accumulator, and a finished run must have
  ``tiles_pending == 0`` (`check`), so nothing is dropped silently.

`Accounting` is a commutative monoid (`merge`, `+`, `Accounting()` is the identity): use
it as a Beam `CombineFn` accumulator or a Dask tree reduction. Pure Python: importing it
does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .records import MixedExample, SlidePlan

__all__ = ["NO_PARTNER", "PARTNER_FAILED", "Accounting"]

PARTNER_FAILED = "partner_failed"
NO_PARTNER = "no_partner"
_UNIT = float(1 << 32)


def _add_counts(x: Mapping[str, int], y: Mapping[str, int]) -> dict[str, int]:
    out = dict(x)
    for key, value in y.items():
        out[key] = out.get(key, 0) + value
    return {k: v for k, v in sorted(out.items()) if v != 0}


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Counts of a run (or of part of it); merge partial counts with `+`.

    Attributes:
        tiles_total: tiles looked at by tiling.
        tiles_used: tiles that are source `a` of at least one written example.
        tiles_skipped: reason -> tiles not used.
        tiles_pending: tiles planned but whose outcome was not reported yet.
        slides_failed: slide_id -> failure reason.
        slides_failed_messages: slide_id -> the failure's full message (what is wrong
            and the fix), as `--on-error fail` would have raised it.
        class_mass: per-class sum of the written examples' soft labels, in fixed point
            units of 2**-32 so that merging is exactly associative (see
            `class_histogram` for floats).
        examples_written: examples handed to the shard writer.
        examples_dropped: reason -> examples not written (e.g. ``partner_failed``).
        chunks_read: chunk fetches from the slide stores (planning and packing).
        bytes_read: compressed bytes fetched from the slide stores (all levels,
            metadata and tissue detection included).
        bytes_needed: compressed bytes of the distinct chunks that hold a kept tile
            (the denominator of `read_amplification`).
        requests: every request sent to the slide stores (metadata, chunks, misses).
        pack_bytes: bytes of the tile packs (the compressed tiles staged for mixing).
        output_requests: requests the steps sent to a remote staging/output store
            (tile packs, buckets, sidecars, shards: reads, writes, HEAD-like look-ups,
            listings, deletes; 0 on a local disk), see `pipeline.io.storage`.
        bytes_written: bytes the steps uploaded to a remote store (0 on a local disk).
        resumed: step -> work units an interrupted run had finished and verified and
            this run reused (``plans``, ``strips``, ``buckets``, ``shards``).
    """

    tiles_total: int = 0
    tiles_used: int = 0
    tiles_skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    tiles_pending: int = 0
    slides_failed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    slides_failed_messages: Mapping[str, str] = dataclasses.field(default_factory=dict)
    class_mass: tuple[int, ...] = ()
    examples_written: int = 0
    examples_dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    chunks_read: int = 0
    bytes_read: int = 0
    bytes_needed: int = 0
    requests: int = 0
    pack_bytes: int = 0
    resumed: Mapping[str, int] = dataclasses.field(default_factory=dict)
    output_requests: int = 0
    bytes_written: int = 0

    @classmethod
    def from_plan(cls, plan: SlidePlan) -> Accounting:
        """Counts of one slide's tiling: its rejected tiles, its failure, its pending tiles."""
        skipped = {k: v for k, v in sorted(plan.skipped_dict.items()) if v}
        failed = {plan.slide_id: plan.failure} if plan.failure is not None else {}
        messages = ({plan.slide_id: plan.message or plan.failure}
                    if plan.failure is not None else {})
        return cls(tiles_total=plan.num_tiles_total, tiles_skipped=skipped,
                   tiles_pending=len(plan.tiles), slides_failed=failed,
                   slides_failed_messages=messages,
                   chunks_read=plan.chunks_read, bytes_read=plan.bytes_read,
                   requests=plan.requests, resumed={"plans": int(plan.reused),
                                                     "slides_changed": int(plan.changed)})

    @classmethod
    def from_written(cls, written: Iterable[MixedExample]) -> Accounting:
        """Examples handed to the writer: their count and their labels' class mass."""
        mass: tuple[int, ...] = ()
        count = 0
        for example in written:
            mass = _add_hist(mass, tuple(round(float(v) * _UNIT) for v in _flat(example.label)))
            count += 1
        return cls(class_mass=mass, examples_written=count)

    def merge(self, *others: Accounting) -> Accounting:
        """The sum of `self` and `others` (commutative and associative)."""
        out = self
        for other in others:
            out = Accounting(
                tiles_total=out.tiles_total + other.tiles_total,
                tiles_used=out.tiles_used + other.tiles_used,
                tiles_skipped=_add_counts(out.tiles_skipped, other.tiles_skipped),
                tiles_pending=out.tiles_pending + other.tiles_pending,
                slides_failed=_merge_failures(out.slides_failed, other.slides_failed),
                slides_failed_messages=_merge_failures(out.slides_failed_messages,
                                                       other.slides_failed_messages),
                class_mass=_add_hist(out.class_mass, other.class_mass),
                examples_written=out.examples_written + other.examples_written,
                examples_dropped=_add_counts(out.examples_dropped, other.examples_dropped),
                chunks_read=out.chunks_read + other.chunks_read,
                bytes_read=out.bytes_read + other.bytes_read,
                bytes_needed=out.bytes_needed + other.bytes_needed,
                requests=out.requests + other.requests,
                pack_bytes=out.pack_bytes + other.pack_bytes,
                resumed=_add_counts(out.resumed, other.resumed),
                output_requests=out.output_requests + other.output_requests,
                bytes_written=out.bytes_written + other.bytes_written,
            )
        return out

    def __add__(self, other: Accounting) -> Accounting:
        if not isinstance(other, Accounting):
            return NotImplemented
        return self.merge(other)

    @classmethod
    def merge_all(cls, parts: Iterable[Accounting]) -> Accounting:
        """Merge any iterable of accountings (empty -> the identity `Accounting()`)."""
        return cls().merge(*parts)

    @property
    def class_histogram(self) -> tuple[float, ...]:
        """Per-class sum of the written examples' soft labels."""
        return tuple(v / _UNIT for v in self.class_mass)

    def check(self) -> None:
        """Raise `RuntimeError` unless the counts of a finished run are consistent."""
        skipped = sum(self.tiles_skipped.values())
        if self.tiles_pending != 0 or self.tiles_total != self.tiles_used + skipped:
            raise RuntimeError(
                "Inconsistent accounting: tiles_total must equal tiles_used + "
                f"sum(tiles_skipped) with no tile pending. Received: tiles_total="
                f"{self.tiles_total}, tiles_used={self.tiles_used}, skipped={skipped}, "
                f"tiles_pending={self.tiles_pending}. An engine lost or double-counted tiles."
            )

    def to_dict(self, num_classes: int | None = None) -> dict[str, Any]:
        """The manifest's ``accounting`` object."""
        histogram = list(self.class_histogram)
        if num_classes is not None:
            histogram = (histogram + [0.0] * num_classes)[:max(num_classes, len(histogram))]
        return {
            "tiles_total": self.tiles_total,
            "tiles_used": self.tiles_used,
            "tiles_skipped": dict(sorted(self.tiles_skipped.items())),
            "slides_failed": dict(sorted(self.slides_failed.items())),
            "slides_failed_messages": dict(sorted(self.slides_failed_messages.items())),
            "class_histogram": [round(v, 6) for v in histogram],
            "examples_written": self.examples_written,
            "examples_dropped": dict(sorted(self.examples_dropped.items())),
            "chunks_read": self.chunks_read,
            "bytes_read": self.bytes_read,
            "bytes_needed": self.bytes_needed,
            "read_amplification": self.read_amplification,
            "store_requests": self.requests,
            "output_requests": self.output_requests,
            "bytes_written": self.bytes_written,
            "pack_bytes": self.pack_bytes,
            "resumed": {key: self.resumed.get(key, 0)
                        for key in ("plans", "strips", "buckets", "shards",
                                    "slides_changed")},
        }

    def with_resumed(self, reused: Mapping[str, int], *, resumed_run: bool) -> Accounting:
        """Add `reused` counts; a fresh run reports none (a retried task that found its
        own finished output is not a resumed run)."""
        counts = _add_counts(self.resumed, reused) if resumed_run else {}
        return dataclasses.replace(self, resumed=counts)

    @property
    def read_amplification(self) -> float | None:
        """`bytes_read` / compressed bytes of the distinct chunks holding a kept tile."""
        if self.bytes_needed <= 0:
            return None
        return round(self.bytes_read / self.bytes_needed, 4)


def _flat(label: Any) -> list[float]:
    if hasattr(label, "reshape"):
        return list(label.reshape(-1).tolist())
    return [float(v) for v in label]


def _add_hist(x: tuple[int, ...], y: tuple[int, ...]) -> tuple[int, ...]:
    if len(x) < len(y):
        x, y = y, x
    return tuple(a + (y[i] if i < len(y) else 0) for i, a in enumerate(x))


def _merge_failures(x: Mapping[str, str], y: Mapping[str, str]) -> dict[str, str]:
    out = dict(x)
    for slide_id, reason in y.items():
        # A slide reported twice (a retried task): keep one reason, independent of order.
        out[slide_id] = min(reason, out.get(slide_id, reason))
    return dict(sorted(out.items()))
