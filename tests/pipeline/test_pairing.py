"""Tests of pipeline.steps.pair: determinism, policies, group rule, partitioning, scale."""

from __future__ import annotations

import collections
import functools
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import MixConfig
from pipeline.records import ExampleSpec, PairSpec, TileKey, TileRecord
from pipeline.steps.pair import (
    PairingTable,
    SlideCounts,
    balanced_class_weights,
    example_id,
    op_seed,
)

from .reference import pair_tiles


def make_tiles(n, num_classes=2, class_of=None, group_of=None, slides=5):
    """`n` tiles dealt round-robin over `slides` slides; label and group are per slide."""
    tiles = []
    for i in range(n):
        s = i % slides
        label = class_of(s) if class_of else s % num_classes
        group = group_of(s) if group_of else None
        tiles.append(TileRecord(TileKey(f"s{s}", 0, 256 * i, 0), label, group))
    return tiles


def make_run(sizes, labels, groups):
    """`(SlideCounts list, {slide_id: tiles sorted by key})` of a synthetic run."""
    counts, by_slide = [], {}
    for i, (size, label, group) in enumerate(zip(sizes, labels, groups, strict=True)):
        slide_id = f"slide{i:04d}"
        counts.append(SlideCounts(slide_id, label, group, size))
        by_slide[slide_id] = [TileRecord(TileKey(slide_id, 0, 256 * (j % 400), 256 * (j // 400)),
                                         label, group) for j in range(size)]
        by_slide[slide_id].sort()
    return counts, by_slide


def as_pairs(specs):
    return [(s.example_id, s.a.key, s.b.key, s.mix_index, s.seed) for s in specs]


def resolve(spec: PairSpec, by_slide) -> ExampleSpec:
    b = spec.a if spec.is_original else by_slide[spec.b_slide][spec.b_index]
    return ExampleSpec(spec.example_id, spec.a, b, spec.mix_index, spec.seed)


# --- determinism -------------------------------------------------------------------


@pytest.mark.parametrize("pairing", ["random", "cross-class", "balanced"])
def test_independent_of_input_order_and_partition(pairing):
    config = MixConfig(pairing=pairing, num_mixes=3, keep_originals=True, seed=7,
                       group_column="patient")
    tiles = make_tiles(400, 3, group_of=lambda s: None if s == 3 else f"p{s % 7}", slides=20)
    reference = pair_tiles(tiles, config, 3)
    assert len(reference) == 400 * 4
    shuffled = list(tiles)
    random.Random(1).shuffle(shuffled)
    assert as_pairs(pair_tiles(shuffled, config, 3)) == as_pairs(reference)
    # Duplicated identical records (a retried read) change nothing.
    assert as_pairs(pair_tiles(tiles + tiles[:10], config, 3)) == as_pairs(reference)
    # What an engine does: the table from per-slide counts (any order, duplicated),
    # then each partition's tiles, partitions and tiles in any order.
    by_slide = collections.defaultdict(list)
    for tile in sorted(tiles):
        by_slide[tile.key.slide_id].append(tile)
    counts = [SlideCounts(s, t[0].label, t[0].group, len(t)) for s, t in by_slide.items()]
    table = PairingTable(list(reversed(counts)) + counts[:3], config, 3)
    per_tile = [resolve(spec, by_slide)
                for slide_id in sorted(by_slide, reverse=True)
                for index in reversed(range(len(by_slide[slide_id])))
                for spec in table.examples_for(by_slide[slide_id][index], index)]
    assert as_pairs(sorted(per_tile)) == as_pairs(reference)
    # The table pickles (a Beam side input, a Dask argument) and draws the same.
    clone = pickle.loads(pickle.dumps(table))
    tile = by_slide["s0"][5]
    assert clone.examples_for(tile, 5) == table.examples_for(tile, 5)


def test_seed_changes_pairs_and_ids_are_stable():
    tiles = make_tiles(100)
    a = pair_tiles(tiles, MixConfig(seed=0), 2)
    b = pair_tiles(tiles, MixConfig(seed=1), 2)
    assert [s.example_id for s in a] == [s.example_id for s in b]
    assert [s.b.key for s in a] != [s.b.key for s in b]
    assert a[0].example_id == example_id(a[0].a.key, 0)


def test_ids_and_seeds_keep_their_values():
    key = TileKey("slide-7", 1, 512, 1024)
    assert example_id(key, 3) == "slide-7/L1/x512/y1024#m3"
    assert example_id(key, -1) == "slide-7/L1/x512/y1024#orig"
    # Values of the former PairingIndex.op_seed: output seeds must never change.
    assert op_seed(42, key, 3) == (1574000522094365835, 3294156050503713183)
    assert op_seed(42, key, -1) == (3828812272903563160, 1127073026344980716)
    tiles = [TileRecord(key, 0), TileRecord(TileKey("slide-7", 1, 0, 0), 0)]
    config = MixConfig(seed=42, num_mixes=4, keep_originals=True)
    specs = {s.example_id: s for s in pair_tiles(tiles, config, 1)}
    assert specs["slide-7/L1/x512/y1024#m3"].seed == op_seed(42, key, 3)
    assert specs["slide-7/L1/x512/y1024#orig"].seed == op_seed(42, key, -1)


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


def test_pair_spec_of_an_original_points_at_the_anchor():
    counts = [SlideCounts("a", 0, None, 3), SlideCounts("b", 0, None, 2)]
    table = PairingTable(counts, MixConfig(num_mixes=2, keep_originals=True), 1)
    anchor = TileRecord(TileKey("a", 0, 0, 0), 0)
    specs = table.examples_for(anchor, 1)
    assert [s.mix_index for s in specs] == [0, 1, -1]  # "#m0" < "#m1" < "#orig"
    (original,) = [s for s in specs if s.is_original]
    assert (original.b_slide, original.b_index, original.a_index) == ("a", 1, 1)
    assert all(s.a_index == 1 for s in specs)


# --- invariants on small random runs ------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=8),
       num_groups=st.integers(1, 4), seed=st.integers(0, 2**32),
       pairing=st.sampled_from(["random", "cross-class", "balanced"]),
       use_groups=st.booleans())
def test_never_self_and_group_rule(sizes, num_groups, seed, pairing, use_groups):
    labels = [i % 2 for i in range(len(sizes))]
    groups = [None if i % 5 == 4 else f"g{i % num_groups}" for i in range(len(sizes))]
    counts, by_slide = make_run(sizes, labels, groups)
    tiles = [t for slide in by_slide.values() for t in slide]
    classes = {t.label for t in tiles}
    if pairing == "cross-class" and len(classes) < 2:
        return
    config = MixConfig(pairing=pairing, seed=seed, num_mixes=2,
                       group_column="patient" if use_groups else None)
    table = PairingTable(counts, config, 2)
    for slide_tiles in by_slide.values():
        for index, tile in enumerate(slide_tiles):
            specs = table.examples_for(tile, index)

            def eligible(t, tile=tile):
                if t.key == tile.key:
                    return False
                if use_groups and tile.group is not None and t.group == tile.group:
                    return False
                return pairing != "cross-class" or t.label != tile.label

            assert len(specs) == (2 if any(eligible(t) for t in tiles) else 0)
            for spec in specs:
                b = by_slide[spec.b_slide][spec.b_index]
                assert eligible(b)
                assert (spec.a, spec.a_index) == (tile, index)


# --- 10^5 tile records over many slides, classes and groups -------------------------

NUM_CLASSES = 4
NUM_SLIDES = 250
NUM_TILES = 100_000


@functools.lru_cache(maxsize=1)
def big_run():
    """250 slides (1..~800 tiles, 10^5 in all), 4 imbalanced classes, patients of 1-3
    slides and some slides without a group."""
    rng = random.Random(0)
    sizes = [rng.randint(1, 799) for _ in range(NUM_SLIDES - 1)]
    sizes.append(NUM_TILES - sum(sizes))
    assert sizes[-1] > 0
    labels = rng.choices(range(NUM_CLASSES), weights=[0.4, 0.3, 0.2, 0.1], k=NUM_SLIDES)
    groups, patient = [], 0
    while len(groups) < NUM_SLIDES:
        if rng.random() < 0.1:
            groups.append(None)
            continue
        patient += 1
        groups.extend([f"p{patient}"] * rng.randint(1, 3))
    return make_run(sizes, labels, groups[:NUM_SLIDES])


@functools.lru_cache(maxsize=3)
def big_examples(pairing):
    counts, by_slide = big_run()
    config = MixConfig(pairing=pairing, seed=11, group_column="patient")
    table = PairingTable(counts, config, NUM_CLASSES)
    specs = [spec for slide_tiles in by_slide.values()
             for index, tile in enumerate(slide_tiles)
             for spec in table.examples_for(tile, index)]
    return counts, by_slide, specs


def check_invariants(counts, by_slide, specs, num_mixes=1):
    assert sum(c.num_tiles for c in counts) == NUM_TILES
    per_anchor = collections.Counter(s.a.key for s in specs)
    # Every tile is `a` of exactly num_mixes examples (all have eligible partners here).
    assert len(per_anchor) == NUM_TILES
    assert set(per_anchor.values()) == {num_mixes}
    for spec in specs:
        b = by_slide[spec.b_slide][spec.b_index]
        assert by_slide[spec.a.key.slide_id][spec.a_index] == spec.a
        assert b.key != spec.a.key  # never self-paired
        assert spec.a.group is None or b.group != spec.a.group  # the group rule


def test_big_random_invariants_and_uniform_over_eligible_tiles():
    counts, by_slide, specs = big_examples("random")
    check_invariants(counts, by_slide, specs)
    # Expected partner count of each slide: sum over anchors of P(partner in slide).
    group_tiles = collections.Counter()
    for c in counts:
        if c.group is not None:
            group_tiles[c.group] += c.num_tiles
    expected = collections.Counter()
    for anchor_slide in counts:
        for c in counts:
            if anchor_slide.group is not None:
                if c.group == anchor_slide.group:
                    continue
                m = NUM_TILES - group_tiles[anchor_slide.group]
                expected[c.slide_id] += anchor_slide.num_tiles * c.num_tiles / m
            else:
                own = c.num_tiles - (c.slide_id == anchor_slide.slide_id)
                expected[c.slide_id] += anchor_slide.num_tiles * own / (NUM_TILES - 1)
    observed = collections.Counter(s.b_slide for s in specs)
    chi2 = sum((observed[s] - e) ** 2 / e for s, e in expected.items() if e > 0)
    assert set(observed) <= {s for s, e in expected.items() if e > 0}
    # ~249 degrees of freedom: mean 249, sd ~22; 360 is ~5 sd.
    assert chi2 < 360
    # Uniform within a slide: the partner's relative position in its slide, in deciles.
    deciles = collections.Counter(10 * s.b_index // len(by_slide[s.b_slide]) for s in specs)
    assert all(abs(deciles[d] / NUM_TILES - 0.1) < 0.005 for d in range(10))


def test_big_cross_class_always_crosses():
    counts, by_slide, specs = big_examples("cross-class")
    check_invariants(counts, by_slide, specs)
    assert all(s.a.label != by_slide[s.b_slide][s.b_index].label for s in specs)
    # The partner class is drawn with weight = its eligible tiles among other classes.
    class_tiles = collections.Counter()
    for c in counts:
        class_tiles[c.label] += c.num_tiles
    for anchor_class in range(NUM_CLASSES):
        partners = collections.Counter(by_slide[s.b_slide][s.b_index].label
                                       for s in specs if s.a.label == anchor_class)
        others = NUM_TILES - class_tiles[anchor_class]
        total = sum(partners.values())
        for c, n in partners.items():
            assert abs(n / total - class_tiles[c] / others) < 0.03


def test_big_balanced_label_mass_is_even():
    counts, by_slide, specs = big_examples("balanced")
    check_invariants(counts, by_slide, specs)
    # Expected mixed-label mass with E[lam] = 1/2: 0.5 onehot(a) + 0.5 onehot(b).
    mass = [0.0] * NUM_CLASSES
    for s in specs:
        mass[s.a.label] += 0.5
        mass[by_slide[s.b_slide][s.b_index].label] += 0.5
    shares = [m / len(specs) for m in mass]
    anchors = [sum(c.num_tiles for c in counts if c.label == k) / NUM_TILES
               for k in range(NUM_CLASSES)]
    assert max(anchors) - min(anchors) > 0.1  # the run really is imbalanced
    # Stated tolerance: every class within 2 % (relative) of 1/K.
    assert all(abs(share * NUM_CLASSES - 1) < 0.02 for share in shares), shares


def test_big_num_mixes_and_originals():
    counts, by_slide = big_run()
    config = MixConfig(seed=3, num_mixes=3, keep_originals=True, group_column="patient")
    table = PairingTable(counts, config, NUM_CLASSES)
    for slide_tiles in list(by_slide.values())[:20]:
        for index, tile in enumerate(slide_tiles):
            specs = table.examples_for(tile, index)
            assert [s.mix_index for s in specs] == [0, 1, 2, -1]


# --- policies on small runs ---------------------------------------------------------


def test_cross_class_is_always_cross_and_uniform_over_other_classes():
    tiles = make_tiles(3000, 3, class_of=lambda s: 0 if s < 4 else 1 + s % 2, slides=6)
    specs = pair_tiles(tiles, MixConfig(pairing="cross-class", num_mixes=2), 3)
    assert all(s.a.label != s.b.label for s in specs)
    partners = collections.Counter(s.b.label for s in specs if s.a.label == 0)
    # 500 tiles in each of classes 1 and 2: an even split of the 4000 draws.
    assert abs(partners[1] / 4000 - 0.5) < 0.04


def test_cross_class_needs_two_classes():
    with pytest.raises(ValueError, match="cross-class.*--pairing random"):
        PairingTable([SlideCounts("s", 0, None, 10), SlideCounts("t", 0, None, 3),
                      SlideCounts("u", 1, None, 0)], MixConfig(pairing="cross-class"), 2)
    with pytest.raises(ValueError, match="cross-class.*--pairing random"):
        pair_tiles(make_tiles(10, 1), MixConfig(pairing="cross-class"), 2)


def test_balanced_evens_the_histogram_on_an_imbalanced_set():
    tiles = make_tiles(5000, 2, class_of=lambda s: int(s == 0), slides=10)  # 90 % / 10 %
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
    config = MixConfig(num_mixes=64)  # the most MixConfig allows
    counts = collections.Counter(s.b.key for s in pair_tiles(tiles, config, 2))
    assert len(counts) == 50
    expected = 50 * 64 / 50
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 100  # 49 degrees of freedom; p < 1e-5 above ~100


# --- no partner, bad input, memory --------------------------------------------------


@pytest.mark.parametrize("pairing", ["random", "cross-class", "balanced"])
def test_unusable_partners_are_drawn_again(pairing):
    config = MixConfig(pairing=pairing, num_mixes=4, seed=3)
    counts, by_slide = make_run([30, 20, 25, 15], [0, 1, 0, 1], [None] * 4)
    table = PairingTable(counts, config, 2)
    unusable = {(s, i) for s, tiles in by_slide.items() for i in range(len(tiles)) if i % 3 == 0}

    def usable(slide_id, index):
        return (slide_id, index) not in unusable

    first_draws = kept = 0
    for tiles in by_slide.values():
        for index, tile in enumerate(tiles):
            plain = table.examples_for(tile, index)
            assert table.pair(tile, index, lambda s, i: True) == (plain, 0)
            specs, dropped = table.pair(tile, index, usable)
            assert dropped == 0 and len(specs) == len(plain) == 4
            for before, after in zip(plain, specs, strict=True):
                assert (after.b_slide, after.b_index) not in unusable
                assert (after.example_id, after.seed) == (before.example_id, before.seed)
                if (before.b_slide, before.b_index) not in unusable:  # first draw kept
                    assert after == before
                    kept += 1
            first_draws += len(plain)
    assert 0 < kept < first_draws  # some draws were redrawn, most were not


def test_a_mix_with_no_usable_partner_is_dropped():
    counts = [SlideCounts("a", 0, None, 1), SlideCounts("b", 1, None, 3)]
    tile = TileRecord(TileKey("a", 0, 0, 0), 0)
    config = MixConfig(num_mixes=2, keep_originals=True)
    table = PairingTable(counts, config, 2)
    specs, dropped = table.pair(tile, 0, lambda slide_id, index: slide_id == "a")
    assert dropped == 2 and [s.mix_index for s in specs] == [-1]
    specs, dropped = table.pair(tile, 0, lambda slide_id, index: index == 2)
    assert dropped == 0 and {(s.b_slide, s.b_index) for s in specs if s.mix_index >= 0} == {
        ("b", 2)}


def test_no_partner_yields_no_mixes_but_keeps_original():
    (tile,) = make_tiles(1)
    counts = [SlideCounts("s0", tile.label, None, 1), SlideCounts("empty", 1, None, 0)]
    assert PairingTable(counts, MixConfig(), 2).examples_for(tile, 0) == []
    (original,) = PairingTable(counts, MixConfig(keep_originals=True), 2).examples_for(tile, 0)
    assert original.is_original
    assert pair_tiles([tile], MixConfig(), 2) == []


def test_single_group_with_group_rule_has_no_partner():
    tiles = make_tiles(40, 2, group_of=lambda s: "patient-1")
    rule = MixConfig(group_column="patient", num_mixes=2, keep_originals=True)
    specs = pair_tiles(tiles, rule, 2)
    assert len(specs) == 40 and all(s.is_original for s in specs)
    # Without the rule the same tiles pair normally.
    assert len(pair_tiles(tiles, MixConfig(num_mixes=2), 2)) == 80
    # A slide without a group is eligible for everyone and may pair with anyone else.
    loner = TileRecord(TileKey("loner", 0, 0, 0), 1)
    specs = pair_tiles([*tiles, loner], MixConfig(group_column="patient", num_mixes=2), 2)
    assert len(specs) == 41 * 2
    assert all(s.b == loner for s in specs if s.a != loner)


def test_bad_input():
    tiles = make_tiles(3)
    with pytest.raises(ValueError, match="label"):
        pair_tiles(tiles, MixConfig(), 1)
    with pytest.raises(ValueError, match="label"):
        PairingTable([SlideCounts("s", 2, None, 1)], MixConfig(), 2)
    clash = TileRecord(tiles[0].key, 1)
    with pytest.raises(ValueError, match="one record"):
        pair_tiles([*tiles, clash], MixConfig(), 2)
    with pytest.raises(ValueError, match="one record"):
        PairingTable([SlideCounts("s", 0, None, 1), SlideCounts("s", 0, None, 2)],
                     MixConfig(), 2)
    with pytest.raises(ValueError, match="num_tiles"):
        PairingTable([SlideCounts("s", 0, None, -1)], MixConfig(), 2)
    mixed = [TileRecord(TileKey("s", 0, 0, 0), 0, "p1"), TileRecord(TileKey("s", 0, 1, 0), 0)]
    with pytest.raises(ValueError, match="slide's label and group"):
        pair_tiles(mixed, MixConfig(), 2)
    table = PairingTable([SlideCounts("s", 0, "p1", 2), SlideCounts("t", 1, None, 2)],
                         MixConfig(), 2)
    with pytest.raises(ValueError, match="not in the pairing table"):
        table.examples_for(TileRecord(TileKey("u", 0, 0, 0), 0), 0)
    with pytest.raises(ValueError, match="anchor_index"):
        table.examples_for(TileRecord(TileKey("s", 0, 0, 0), 0, "p1"), 2)
    with pytest.raises(ValueError, match="slide's label and group"):
        table.examples_for(TileRecord(TileKey("s", 0, 0, 0), 1, "p1"), 0)


def test_table_size_depends_on_slides_not_tiles():
    def table(tiles_per_slide):
        counts = [SlideCounts(f"slide{i:04d}", i % 3, f"p{i // 2}", tiles_per_slide)
                  for i in range(1000)]
        return PairingTable(counts, MixConfig(pairing="balanced", group_column="p"), 3)

    small, large = table(10), table(100_000)
    assert len(large) == 10**8
    assert len(pickle.dumps(large)) < 1.1 * len(pickle.dumps(small))
