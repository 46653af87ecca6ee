"""Deterministic, partitioned pairing of tiles: which tile is mixed with which, and with what seed.

Pairing needs no tile records except the anchor's own. Every tile of a slide carries
the slide's label and the slide's group, so the whole run is described, for pairing,
by one small `SlideCounts` per slide (id, label, group, number of usable tiles). A
slide's usable tiles are numbered ``0..num_tiles-1`` in `TileKey` order, and a partner
is named by position: ``(slide_id, index)``. `PairingTable` holds only these counts
(memory grows with the number of slides, never with the number of tiles), so any
worker can draw the partners of the tiles of its own partition (a slide, a strip) and
emit `PairSpec`s; the reader later turns ``(b_slide, b_index)`` into pixels.

Everything here is a pure function of `(config.seed, the slide counts, the anchor's key
and index)`. The order in which tiles arrive, how they are partitioned, and how many
workers run do not change the result, so Beam, Dask and reruns all produce the same
examples. Randomness comes only from `stable_hash` of `(seed, purpose, anchor key,
mix_index)`; neither Python's salted `hash()` nor any global RNG is used.

How a partner is drawn
----------------------

*Eligible* tiles. For an anchor tile `a`, every usable tile of the run is eligible
except:

- `a` itself (never self-paired);
- with the group rule (``config.group_column`` set) and ``a.group`` not None: every
  tile of every slide whose group equals ``a.group`` (the anchor's own slide
  included). Slides with group None are never excluded by the rule, and an anchor with
  group None excludes only itself.

Policies (each mix ``mix_index`` of each anchor is one independent draw):

- ``random``: uniform over all eligible tiles of the run: each eligible tile has
  probability ``1 / m``, `m` the number of eligible tiles.
- ``cross-class``: the partner class `c` (any class other than ``a.label``) is drawn
  with probability proportional to ``e_c``, its number of eligible tiles; then a tile
  uniformly among class `c`'s eligible tiles. Overall: uniform over the eligible tiles
  of the *other* classes.
- ``balanced``: the partner class `c` is drawn with probability proportional to
  ``w_c = balanced_class_weights(class_counts)[c]`` (the anchor's class included),
  restricted to classes with ``e_c > 0``; if every such class has weight 0, with
  probability proportional to ``e_c`` instead. Then a tile uniformly among class `c`'s
  eligible tiles. ``class_counts`` are the run's usable tiles per class.

These distributions are the same as those of the former all-tiles index; the concrete
partner drawn for a given seed is not (tiles are now enumerated per slide).

Mechanics (O(K log S) per anchor, K classes, S slides). A *bucket* (one over all slides,
one per class) lists its slides sorted by ``(block, slide_id)``, where a slide's block
is its group when the group rule is on and the slide has a group, else the slide alone,
with prefix sums of their tile counts; tile position ``p`` of a bucket is tile
``p - prefix[s]`` of slide ``s``. The tiles an anchor excludes are one contiguous run
``[lo, hi)`` of positions: the prefix range of its group's slides (found by bisection
on the blocks), or the single position of the anchor. A draw takes
``u64 = stable_hash(("softmix.pairing", seed, "tile", <anchor key>, mix_index))``,
``r = (u64 * m) >> 64`` in ``[0, m)`` with ``m = n - (hi - lo)``, maps it around the
run (``r if r < lo else r + (hi - lo)``), finds the slide by bisection on the prefix
sums and returns ``(slide_id, r - prefix[s])``. Class draws use a second hash
(purpose ``"class"``) as a uniform float in ``[0, 1)`` against the cumulative weights.

Tiles that fail when packed. Pairing counts the *planned* tiles of every slide (so
the stream can pair right after planning, before any pixel is read); a tile that
packing then finds unusable (``read_error``, ``missing_chunk``, ``nonfinite_pixels``)
is never an anchor, and a draw that lands on one is drawn again with the next
*attempt* (the hashes above take the attempt number as one more part, attempt 0
none), up to `MAX_DRAWS` draws; a mix whose every draw lands on an unusable tile is
dropped and counted under ``examples_dropped: partner_failed`` (a tile left with no
example is skipped as ``partner_failed``). So a run without such tiles pairs exactly
as before, and one with them loses no example unless a class or cohort is nearly all
unusable. Redrawing conditions each draw on a usable partner: for ``random``, uniform
over the eligible usable tiles; for the class policies, class weights stay those of
the planned counts.

Tiles with no eligible partner (a single tile, or every other tile in the anchor's
group) get no mixed examples; with `keep_originals` they still get their original.
A tile that ends up with no example at all is counted by the accounting as skipped
with reason ``"no_partner"`` (see `pipeline.accounting.Accounting`).

Example ids are ``"<slide>/L<level>/x<x>/y<y>#m<mix_index>"`` for mixed examples and
``"...#orig"`` for originals; they are unique and sort the records inside a shard.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..config import MixConfig
from ..records import PairSpec, TileKey, TileRecord, stable_hash

__all__ = [
    "MAX_DRAWS",
    "PairingTable",
    "SlideCounts",
    "balanced_class_weights",
    "example_id",
    "op_seed",
]

_SEED_BITS_SHIFT = 2  # 64-bit hash >> 2 < 2**62: safe as a non-negative int64
MAX_DRAWS = 16  # draws of one partner before the mix is dropped as partner_failed


@dataclasses.dataclass(frozen=True, order=True)
class SlideCounts:
    """What pairing needs to know about one slide.

    Attributes:
        slide_id: the slide.
        label: class index of the slide (every tile of the slide has it).
        group: value of the group column (e.g. a patient id), or None.
        num_tiles: usable tiles of the slide (>= 0), numbered 0..num_tiles-1 in
            `TileKey` order.
    """

    slide_id: str
    label: int
    group: str | None
    num_tiles: int


def example_id(key: TileKey, mix_index: int) -> str:
    """The stable id of the example whose source `a` is `key`.

    >>> example_id(TileKey("s1", 0, 256, 512), 0)
    's1/L0/x256/y512#m0'
    >>> example_id(TileKey("s1", 0, 256, 512), -1)
    's1/L0/x256/y512#orig'
    """
    return f"{key}#orig" if mix_index < 0 else f"{key}#m{mix_index}"


def op_seed(seed: int, key: TileKey, mix_index: int) -> tuple[int, int]:
    """The stateless seed of an example (anchor `key`, `mix_index`): two ints in `[0, 2**62)`.

    >>> s = op_seed(0, TileKey("s1", 0, 0, 0), 0)
    >>> s == op_seed(0, TileKey("s1", 0, 0, 0), 0) and all(0 <= v < 2**62 for v in s)
    True
    """
    parts = ("softmix.seed", seed, key.slide_id, key.level, key.x, key.y, mix_index)
    return (stable_hash(*parts, 0) >> _SEED_BITS_SHIFT,
            stable_hash(*parts, 1) >> _SEED_BITS_SHIFT)


def balanced_class_weights(class_counts: Sequence[int]) -> list[float]:
    """Partner-class weights that make the mixed labels' class histogram even.

    Every used tile is source `a` of the same number of examples, so class `c` is the
    anchor class of a share `p_c = n_c / N` of the examples. With `lam` the weight of
    source `b` (Beta(alpha, alpha) is symmetric, so E[lam] = 1/2), the expected mass
    of class `c` in the mixed labels is

        h_c = (1 - E[lam]) p_c + E[lam] q_c = (p_c + q_c) / 2,

    where `q_c` is the probability that the partner comes from class `c`. An even
    histogram `h_c = 1/K` needs `q_c = 2/K - p_c`. That is a valid distribution
    unless some class already exceeds `2/K` of the anchors; then the best we can do
    is `q_c ∝ max(0, 2/K - p_c)`, i.e. never draw partners from such a class and
    share the rest as prescribed. If every weight is 0 (only possible when K = 1),
    fall back to `q_c ∝ n_c`, which is plain random pairing.

    Args:
        class_counts: number of usable tiles per class, length K.

    Returns:
        K non-negative weights summing to 1 (all 0 when there are no tiles).

    >>> balanced_class_weights([90, 10])
    [0.1, 0.9]
    >>> balanced_class_weights([50, 50])
    [0.5, 0.5]
    """
    total = sum(class_counts)
    num_classes = len(class_counts)
    if total == 0 or num_classes == 0:
        return [0.0] * num_classes
    raw = [max(0.0, 2.0 / num_classes - n / total) for n in class_counts]
    if sum(raw) <= 0.0:
        raw = [float(n) for n in class_counts]
    norm = sum(raw)
    return [round(w / norm, 15) for w in raw]


def _block_id(slide_id: str, group: str | None, use_groups: bool) -> tuple[int, str]:
    # (0, group) and (1, slide_id): a group block sorts apart from single-slide blocks.
    if use_groups and group is not None:
        return (0, group)
    return (1, slide_id)


def _draw_u64(seed: int, purpose: str, key: TileKey, mix_index: int, attempt: int = 0) -> int:
    return stable_hash("softmix.pairing", seed, purpose, key.slide_id, key.level, key.x,
                       key.y, mix_index, *((attempt,) if attempt else ()))


class _Bucket:
    """Slides sorted by (block, slide_id), with prefix sums of their tile counts."""

    __slots__ = ("blocks", "prefix", "slide_ids")

    def __init__(self, entries: Iterable[tuple[tuple[int, str], SlideCounts]]):
        entries = sorted(entries, key=lambda entry: (entry[0], entry[1].slide_id))
        self.blocks = [block for block, _ in entries]
        self.slide_ids = [slide.slide_id for _, slide in entries]
        self.prefix = [0]
        for _, slide in entries:
            self.prefix.append(self.prefix[-1] + slide.num_tiles)

    def __len__(self) -> int:
        return self.prefix[-1]

    def excluded(self, block: tuple[int, str], anchor_index: int) -> tuple[int, int]:
        """Tile positions `[lo, hi)` an anchor of `block` must not be paired with."""
        lo = bisect.bisect_left(self.blocks, block)
        if block[0] == 0:  # a group: all its slides
            hi = bisect.bisect_right(self.blocks, block, lo)
            return self.prefix[lo], self.prefix[hi]
        if lo < len(self.blocks) and self.blocks[lo] == block:  # the anchor alone
            position = self.prefix[lo] + anchor_index
            return position, position + 1
        return 0, 0  # the anchor's slide is not in this bucket

    def draw(self, excluded: tuple[int, int], u64: int) -> tuple[str, int] | None:
        lo, hi = excluded
        eligible = self.prefix[-1] - (hi - lo)
        if eligible <= 0:
            return None
        r = (u64 * eligible) >> 64
        if r >= lo:
            r += hi - lo
        s = bisect.bisect_right(self.prefix, r) - 1
        return self.slide_ids[s], r - self.prefix[s]


class PairingTable:
    """Per-slide tile counts of a run, indexed for deterministic partner draws.

    Build it once from the `SlideCounts` of every slide (a small side input: memory is
    O(S) for S slides, whatever the number of tiles), then call
    `examples_for(tile, index)` for the tiles of any partition, on any worker, in any
    order. The input order of `slides` and duplicates of identical records do not matter.

    Args:
        slides: one `SlideCounts` per slide of the run (slides with 0 tiles allowed).
        config: the run's `MixConfig` (`seed`, `pairing`, `group_column`,
            `num_mixes`, `keep_originals` are used).
        num_classes: K, the number of class names of the run.

    Raises:
        ValueError: a label outside `[0, num_classes)`, a negative tile count, two
            different records with the same slide id, or `cross-class` pairing when
            all usable tiles share one class.
    """

    def __init__(self, slides: Iterable[SlideCounts], config: MixConfig, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
        self.config = config
        self.num_classes = num_classes
        self._use_groups = config.group_column is not None
        self._slides: dict[str, SlideCounts] = {}
        for slide in slides:
            known = self._slides.get(slide.slide_id)
            if known is not None and known != slide:
                raise ValueError(
                    "Each slide must appear in one record only. Received two records "
                    f"for slide_id={slide.slide_id!r}: {known!r} and {slide!r}."
                )
            if not 0 <= slide.label < num_classes:
                raise ValueError(
                    f"Slide label must be a class index in [0, {num_classes}). "
                    f"Received: label={slide.label} for slide {slide.slide_id!r}."
                )
            if slide.num_tiles < 0:
                raise ValueError(
                    f"`num_tiles` must be >= 0. Received: num_tiles={slide.num_tiles} "
                    f"for slide {slide.slide_id!r}."
                )
            self._slides[slide.slide_id] = slide
        entries = [(self._block(s), s) for s in self._slides.values() if s.num_tiles > 0]
        self._all = _Bucket(entries)
        self._by_class = [_Bucket(e for e in entries if e[1].label == c)
                          for c in range(num_classes)]
        self.class_counts = [len(b) for b in self._by_class]
        self.partner_class_weights = balanced_class_weights(self.class_counts)
        if config.pairing == "cross-class" and config.num_mixes > 0 and len(self._all):
            present = [c for c, n in enumerate(self.class_counts) if n > 0]
            if len(present) < 2:
                raise ValueError(
                    "`pairing='cross-class'` needs usable tiles of at least two classes. "
                    f"Received: tiles of class index {present} only "
                    f"(class_counts={self.class_counts}). Add slides of another class or "
                    "use --pairing random."
                )

    def __len__(self) -> int:
        """Usable tiles of the run."""
        return len(self._all)

    @property
    def num_slides(self) -> int:
        return len(self._slides)

    def _block(self, slide: SlideCounts) -> tuple[int, str]:
        return _block_id(slide.slide_id, slide.group, self._use_groups)

    def _check_anchor(self, anchor: TileRecord, anchor_index: int) -> tuple[int, str]:
        slide = self._slides.get(anchor.key.slide_id)
        if slide is None:
            raise ValueError(
                f"Tile {anchor.key} belongs to slide {anchor.key.slide_id!r}, which is not "
                "in the pairing table. Build the table from the SlideCounts of every slide."
            )
        if not 0 <= anchor_index < slide.num_tiles:
            raise ValueError(
                f"`anchor_index` must be in [0, {slide.num_tiles}) for slide "
                f"{slide.slide_id!r}. Received: anchor_index={anchor_index} for tile {anchor.key}."
            )
        if anchor.label != slide.label or anchor.group != slide.group:
            raise ValueError(
                f"Tile {anchor.key} has label={anchor.label}, group={anchor.group!r} but its "
                f"slide has label={slide.label}, group={slide.group!r}; every tile of a slide "
                "must carry the slide's label and group."
            )
        return self._block(slide)

    def _exclusions(self, block: tuple[int, str], anchor_index: int) -> Any:
        if self.config.pairing == "random":
            return self._all.excluded(block, anchor_index)
        return [b.excluded(block, anchor_index) for b in self._by_class]

    def _draw(self, anchor: TileRecord, mix_index: int, excluded: Any, attempt: int = 0
              ) -> tuple[str, int] | None:
        seed = self.config.seed
        policy = self.config.pairing
        if policy == "random":
            return self._all.draw(excluded,
                                  _draw_u64(seed, "tile", anchor.key, mix_index, attempt))
        eligible = [len(b) - (hi - lo) for b, (lo, hi) in zip(self._by_class, excluded,
                                                               strict=True)]
        if policy == "cross-class":
            weights = [float(n) if c != anchor.label else 0.0 for c, n in enumerate(eligible)]
        else:  # balanced
            weights = [w if n > 0 else 0.0
                       for w, n in zip(self.partner_class_weights, eligible, strict=True)]
            if sum(weights) <= 0.0:
                weights = [float(n) for n in eligible]
        total = sum(weights)
        if total <= 0.0:
            return None
        u = (_draw_u64(seed, "class", anchor.key, mix_index, attempt) >> 11
             ) / float(1 << 53) * total
        chosen = max(c for c, w in enumerate(weights) if w > 0)  # guards float round-off
        cumulative = 0.0
        for c, w in enumerate(weights):
            cumulative += w
            if w > 0 and u < cumulative:
                chosen = c
                break
        return self._by_class[chosen].draw(
            excluded[chosen], _draw_u64(seed, "tile", anchor.key, mix_index, attempt)
        )

    def op_seed(self, anchor: TileRecord, mix_index: int) -> tuple[int, int]:
        """The stateless seed of an example: two ints in `[0, 2**62)` (see `op_seed`)."""
        return op_seed(self.config.seed, anchor.key, mix_index)

    def examples_for(self, anchor: TileRecord, anchor_index: int,
                     usable: Callable[[str, int], bool] | None = None) -> list[PairSpec]:
        """Every example whose source `a` is `anchor`, sorted by example id.

        Returns `num_mixes` mixed examples (`mix_index` 0..n-1, skipping draws with no
        eligible partner) plus, with `keep_originals`, the original (`mix_index` -1,
        `b` = the anchor itself). An empty list means the tile has no eligible partner
        and originals are off: count it as skipped with reason ``"no_partner"``.
        With `usable`, see `pair`.
        """
        return self.pair(anchor, anchor_index, usable)[0]

    def pair(self, anchor: TileRecord, anchor_index: int,
             usable: Callable[[str, int], bool] | None = None
             ) -> tuple[list[PairSpec], int]:
        """`(examples_for(anchor, anchor_index), mixes dropped)`.

        Args:
            anchor: the tile (a usable one: it is source `a`).
            anchor_index: its index among its slide's planned tiles.
            usable: ``usable(slide_id, index)``: whether a planned tile can be a
                partner (None: every tile). A draw on an unusable tile is drawn again,
                up to `MAX_DRAWS` times; then the mix is dropped and counted in the
                second value (module docstring, "Tiles that fail when packed").
        """
        block = self._check_anchor(anchor, anchor_index)
        seed = self.config.seed
        key = anchor.key
        specs = []
        dropped = 0
        if self.config.keep_originals:
            specs.append(PairSpec(example_id(key, -1), anchor, anchor_index, key.slide_id,
                                  anchor_index, -1, op_seed(seed, key, -1)))
        if self.config.num_mixes > 0:
            excluded = self._exclusions(block, anchor_index)
            for mix_index in range(self.config.num_mixes):
                for attempt in range(MAX_DRAWS if usable is not None else 1):
                    partner = self._draw(anchor, mix_index, excluded, attempt)
                    if partner is None or usable is None or usable(*partner):
                        break
                else:  # every draw landed on an unusable tile
                    dropped += 1
                    continue
                if partner is not None:
                    specs.append(PairSpec(example_id(key, mix_index), anchor, anchor_index,
                                          partner[0], partner[1], mix_index,
                                          op_seed(seed, key, mix_index)))
        specs.sort()
        return specs, dropped
