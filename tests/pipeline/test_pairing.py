"""Tests of pipeline._pairing: determinism, policies, group rule, speed."""

from __future__ import annotations

import collections
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline._keys import TileKey, TileRecord
from pipeline._pairing import PairingIndex, balanced_class_weights, example_id, pair_tiles
from pipeline.config import MixConfig


def make_tiles(n, num_classes=2, class_of=None, group_of=None, slides=5):
    tiles = []
    for i in range(n):
        label = class_of(i) if class_of else i % num_classes
        group = group_of(i) if group_of else None
        tiles.append(TileRecord(TileKey(f"s{i % slides}", 0, 256 * i, 0), label, group))
    return tiles


def as_pairs(specs):
    return [(s.example_id, s.a.key, s.b.key, s.mix_index, s.seed) for s in specs]


@pytest.mark.parametrize("pairing", ["random", "cross-class", "balanced"])
def test_independent_of_input_order_and_chunking(pairing):
    config = MixConfig(pairing=pairing, num_mixes=3, keep_originals=True, seed=7,
                       group_column="patient")
    tiles = make_tiles(200, 3, group_of=lambda i: f"p{i % 13}")
    reference = pair_tiles(tiles, config, 3)
    shuffled = list(tiles)
    random.Random(1).shuffle(shuffled)
    assert as_pairs(pair_tiles(shuffled, config, 3)) == as_pairs(reference)
    # Chunked building and per-tile calls in any order (what a Beam DoFn does).
    index = PairingIndex.from_chunks([shuffled[:50], shuffled[50:120], shuffled[120:]],
                                     config, 3)
    per_tile = [spec for tile in reversed(shuffled) for spec in index.examples_for(tile)]
    assert as_pairs(sorted(per_tile)) == as_pairs(reference)
    # Duplicated identical records (a retried read) change nothing.
    assert as_pairs(pair_tiles(tiles + tiles[:10], config, 3)) == as_pairs(reference)


def test_seed_changes_pairs_and_ids_are_stable():
    tiles = make_tiles(100)
    a = pair_tiles(tiles, MixConfig(seed=0), 2)
    b = pair_tiles(tiles, MixConfig(seed=1), 2)
    assert [s.example_id for s in a] == [s.example_id for s in b]
    assert [s.b.key for s in a] != [s.b.key for s in b]
    assert a[0].example_id == example_id(a[0].a.key, 0)


def test_counts_originals_and_seeds():
    tiles = make_tiles(30)
    specs = pair_tiles(tiles, MixConfig(num_mixes=2, keep_originals=True), 2)
    assert len(specs) == 90
    assert [s.example_id for s in specs] == sorted(s.example_id for s in specs)
    originals = [s for s in specs if s.is_original]
    assert len(originals) == 30
    assert all(s.a == s.b and s.example_id.endswith("#orig") for s in originals)
    seeds = [s.seed for s in specs]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= v < 2**62 for seed in seeds for v in seed)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), num_groups=st.integers(1, 6), seed=st.integers(0, 2**32),
       pairing=st.sampled_from(["random", "balanced"]))
def test_never_self_and_group_rule(n, num_groups, seed, pairing):
    tiles = make_tiles(n, 2, group_of=lambda i: f"g{i % num_groups}")
    config = MixConfig(pairing=pairing, seed=seed, num_mixes=2, group_column="patient")
    index = PairingIndex(tiles, config, 2)
    for tile in tiles:
        specs = index.examples_for(tile)
        others = [t for t in tiles if t.group != tile.group]
        assert len(specs) == (2 if others else 0)
        for spec in specs:
            assert spec.b.key != spec.a.key
            assert spec.b.group != spec.a.group
    # Without the group rule, only the tile itself is excluded.
    index = PairingIndex(tiles, MixConfig(pairing=pairing, seed=seed), 2)
    for tile in tiles:
        (spec,) = index.examples_for(tile)
        assert spec.b.key != tile.key


def test_cross_class_is_always_cross_and_uniform_over_other_classes():
    tiles = make_tiles(3000, 3, class_of=lambda i: 0 if i < 2000 else 1 + i % 2)
    specs = pair_tiles(tiles, MixConfig(pairing="cross-class", num_mixes=2), 3)
    assert all(s.a.label != s.b.label for s in specs)
    partners = collections.Counter(s.b.label for s in specs if s.a.label == 0)
    # 500 tiles in each of classes 1 and 2: an even split of the 4000 draws.
    assert abs(partners[1] / 4000 - 0.5) < 0.04


def test_cross_class_needs_two_classes():
    with pytest.raises(ValueError, match="cross-class.*--pairing random"):
        PairingIndex(make_tiles(10, 1), MixConfig(pairing="cross-class"), 2)


def test_balanced_evens_the_histogram_on_an_imbalanced_set():
    tiles = make_tiles(5000, 2, class_of=lambda i: int(i % 10 == 0))  # 90 % / 10 %
    specs = pair_tiles(tiles, MixConfig(pairing="balanced"), 2)
    partner_share = sum(s.b.label == 1 for s in specs) / len(specs)
    assert abs(partner_share - 0.9) < 0.02
    anchor_share = sum(s.a.label == 1 for s in specs) / len(specs)
    # Expected mixed-label mass of class 1 with E[lam] = 1/2.
    assert abs((anchor_share + partner_share) / 2 - 0.5) < 0.02


def test_balanced_class_weights_maths():
    assert balanced_class_weights([90, 10]) == [0.1, 0.9]
    assert balanced_class_weights([1, 1, 1]) == pytest.approx([1 / 3] * 3)
    # A class above 2/K of the anchors never gets partners.
    weights = balanced_class_weights([80, 10, 10])
    assert weights[0] == 0 and weights[1] == pytest.approx(0.5)
    assert balanced_class_weights([5]) == [1.0]
    assert balanced_class_weights([0, 0]) == [0.0, 0.0]


def test_random_is_roughly_uniform():
    tiles = make_tiles(50)
    config = MixConfig(num_mixes=400)
    counts = collections.Counter(s.b.key for s in pair_tiles(tiles, config, 2))
    assert len(counts) == 50
    expected = 50 * 400 / 50
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 100  # 49 degrees of freedom; p < 1e-5 above ~100


def test_no_partner_yields_no_mixes_but_keeps_original():
    (tile,) = make_tiles(1)
    assert PairingIndex([tile], MixConfig(), 2).examples_for(tile) == []
    (original,) = PairingIndex([tile], MixConfig(keep_originals=True), 2).examples_for(tile)
    assert original.is_original


def test_bad_input():
    tiles = make_tiles(3)
    with pytest.raises(ValueError, match="label"):
        PairingIndex(tiles, MixConfig(), 1)
    clash = TileRecord(tiles[0].key, 1)
    with pytest.raises(ValueError, match="one record"):
        PairingIndex([*tiles, clash], MixConfig(), 2)


def test_scales_n_log_n():
    tiles = make_tiles(100_000, 2, slides=100)
    start = time.perf_counter()
    index = PairingIndex(tiles, MixConfig(), 2)
    for tile in tiles[:20_000]:
        index.examples_for(tile)
    assert time.perf_counter() - start < 10
