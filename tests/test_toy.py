"""The toy world: exact parser, valid and unambiguous tasks, determinism, disjoint splits, teacher traces."""
import random
import re
from collections import Counter

import numpy as np
import pytest

from tasks.toy import (CATEGORIES, EDIT_CATEGORIES, PRESETS, ToyObject, ToyTask, describe, images_match,
                       parse_description, parse_image, render, sample_tasks, text_correct, text_image_agreement,
                       trace_result, write_trace)
from tasks.toy.render import distinct_patches, glyph_tiles
from tasks.toy.scene import WARM_COLOURS, glyph_phrase, make_scene, random_scene
from tasks.toy.tasks import _slide, split_of

TINY, STANDARD = PRESETS["tiny"], PRESETS["standard"]
BOTH = [TINY, STANDARD]


def _full_scene(preset, rng):
    return make_scene(ToyObject(r, c, rng.choice(preset.shapes), rng.choice(preset.colours), rng.choice(preset.sizes))
                      for r in range(preset.grid) for c in range(preset.grid))


# --- scenes, rendering, parsing ---------------------------------------------------------------------
def test_preset_numbers():
    assert (TINY.image_size, TINY.tokens, TINY.cell_px, TINY.n_glyphs) == (32, 4, 8, 12)
    assert (STANDARD.image_size, STANDARD.tokens, STANDARD.cell_px, STANDARD.n_glyphs) == (64, 8, 16, 48)
    # tiny: one token per cell -> background + 12 glyphs; standard: 2x2 tokens per glyph -> 1 + 48 * 4
    assert distinct_patches(glyph_tiles(TINY)[1], TINY.token_px) == 13
    assert distinct_patches(glyph_tiles(STANDARD)[1], STANDARD.token_px) == 193


@pytest.mark.parametrize("preset", BOTH, ids=lambda p: p.name)
def test_parser_inverts_renderer(preset):
    rng = random.Random(0)
    scenes = [random_scene(rng, preset) for _ in range(2000)] + [(), _full_scene(preset, rng)]
    for scene in scenes:
        image = render(scene, preset)
        assert image.shape == (preset.image_size, preset.image_size, 3) and image.dtype == np.uint8
        assert parse_image(image, preset) == scene


def test_parser_rejects_off_render_pixels_unless_tolerated():
    scene = make_scene([ToyObject(1, 2, "circle", "red")])
    image = render(scene, TINY).copy()
    image[0, 0, 0] -= 1  # background pixel off by one
    assert parse_image(image, TINY) is None
    assert parse_image(image, TINY, tolerance=1.0) == scene
    assert not images_match(image, render(scene, TINY), TINY)
    assert images_match(render(scene, TINY), render(scene, TINY), TINY)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*got uint8 \(64, 64, 3\)"):
        parse_image(np.zeros((64, 64, 3), np.uint8), TINY)


@pytest.mark.parametrize("preset", BOTH, ids=lambda p: p.name)
def test_describe_round_trip(preset):
    rng = random.Random(1)
    for scene in [random_scene(rng, preset) for _ in range(500)] + [()]:
        assert parse_description(describe(scene), preset) == scene
        assert parse_description(describe(scene).upper() + ".") == scene
    assert describe(()) == "empty"


def test_parse_description_rejects_what_describe_cannot_write():
    assert parse_description("red circle a1, blue square c2") == (ToyObject(0, 0, "circle", "red"),
                                                                   ToyObject(1, 2, "square", "blue"))
    for bad in ["", "red circle", "blue blob a1", "red circle a0", "red circle a1, blue square a1", "red circle 1a"]:
        assert parse_description(bad) is None, bad
    assert parse_description("red circle e1", TINY) is None           # outside the 4x4 grid
    assert parse_description("small red circle a1", TINY) is None     # tiny has no sizes
    assert parse_description("red circle a1", STANDARD) is None       # standard objects need a size
    assert parse_description("orange circle a1", TINY) is None        # not a tiny colour


# --- tasks --------------------------------------------------------------------------------------------
def _glyphs(scene):
    return Counter(o.glyph for o in scene)


def _check_category(task, preset):
    src, out, text = task.input_scene, task.output_scene, task.instruction
    cells_in, cells_out = {o.cell for o in src}, {o.cell for o in out}
    if task.category == "add":
        assert len(out) == len(src) + 1 and set(src) < set(out)
    elif task.category == "remove":
        assert len(out) == len(src) - 1 and set(out) < set(src)
    elif task.category in ("replace", "recolour"):
        assert cells_in == cells_out and len(set(src) - set(out)) == 1
        if task.category == "recolour":
            assert [(o.cell, o.shape, o.size) for o in src] == [(o.cell, o.shape, o.size) for o in out]
    elif task.category in ("move", "spatial"):
        assert _glyphs(src) == _glyphs(out) and cells_in != cells_out
        if "everything falls down" in text:  # every column is packed at the bottom
            assert all((r, o.col) in cells_out for o in out for r in range(o.row, preset.grid))
    elif task.category == "swap":
        assert cells_in == cells_out and _glyphs(src) == _glyphs(out) and len(set(src) - set(out)) == 2
    elif task.category == "counting":
        if "most common" in text:
            attr = text.split()[-1]
            gone = {getattr(o, attr) for o in set(src) - set(out)}
            assert len(gone) == 1 and not {getattr(o, attr) for o in out} & gone and set(out) < set(src)
        else:
            few, many = re.search(r"until the (\w+)s are as many as the (\w+)s", text).groups()
            counts = Counter(o.shape for o in out)
            assert counts[few] == counts[many] and set(src) < set(out)
            assert all(o.row == preset.grid - 1 for o in set(out) - set(src))
    elif task.category == "relational":
        assert len(set(src) - set(out)) == 1 and len(set(out) - set(src)) <= 1
    elif task.category == "attribute":
        if "warm-coloured" in text and text.startswith("remove"):
            assert not any(o.colour in WARM_COLOURS for o in out)
        if "round" in text:
            assert not any(o.shape == "circle" for o in out) and len(out) < len(src)
    else:
        raise AssertionError(f"no check for {task.category}")


@pytest.mark.parametrize("preset", BOTH, ids=lambda p: p.name)
@pytest.mark.parametrize("category", CATEGORIES)
def test_each_category_gives_exact_unambiguous_tasks(preset, category):
    tasks = sample_tasks(preset, 60, "train", seed=3, categories=[category])
    assert len(tasks) == 60 and {t.category for t in tasks} == {category}
    for t in tasks:
        assert parse_image(render(t.output_scene, preset), preset) == t.output_scene
        assert len(t.output_scene) <= preset.max_objects
        if category == "generate":
            assert t.input_scene is None and len(t.output_scene) >= 1
            continue
        assert t.output_scene != t.input_scene
        _check_category(t, preset)
        counts = _glyphs(t.input_scene)  # every "the <object>" names exactly one object of the input
        for glyph in counts:
            if re.search(rf"\bthe {glyph_phrase(glyph)}\b", t.instruction):
                assert counts[glyph] == 1, (t.instruction, describe(t.input_scene))


def test_slide_hand_example():
    a, b, c = ToyObject(0, 0, "circle", "red"), ToyObject(2, 0, "square", "blue"), ToyObject(1, 2, "triangle", "green")
    scene = make_scene([a, b, c])
    fallen = _slide(scene, list(scene), "down", TINY)
    assert describe(fallen) == "red circle a3, blue square a4, green triangle c4"
    assert describe(_slide(scene, [a], "right", TINY)) == "red circle d1, green triangle c2, blue square a3"
    assert describe(_slide(scene, [b, c], "left", TINY)) == "red circle a1, green triangle a2, blue square a3"


def test_sampling_is_deterministic_and_seeded():
    first = sample_tasks(TINY, 200, "train", seed=7)
    assert first == sample_tasks(TINY, 200, "train", seed=7)
    assert [t.sample_id for t in first] != [t.sample_id for t in sample_tasks(TINY, 200, "train", seed=8)]
    assert [write_trace(t, TINY, seed=1).text for t in first] == [write_trace(t, TINY, seed=1).text for t in first]
    assert len({t.sample_id for t in first}) == 200
    assert Counter(t.category for t in first) == {c: 200 // len(CATEGORIES) + (i < 200 % len(CATEGORIES))
                                                  for i, c in enumerate(CATEGORIES)}


def test_splits_never_overlap():
    by_split = {s: sample_tasks(TINY, n, s, seed=0) for s, n in (("train", 3000), ("val", 400), ("test", 400))}
    keys = {s: {(t.input_scene, t.output_scene) for t in ts} for s, ts in by_split.items()}
    ids = {s: {t.sample_id for t in ts} for s, ts in by_split.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not keys[a] & keys[b] and not ids[a] & ids[b]
    for s, ts in by_split.items():
        assert all(t.split == s == split_of(t.preset, t.input_scene, t.output_scene) for t in ts)
    same_seed_other_split = {t.sample_id for t in sample_tasks(STANDARD, 300, "val", 0)}
    assert not same_seed_other_split & {t.sample_id for t in sample_tasks(STANDARD, 300, "test", 0)}


def test_task_dict_round_trip_and_errors():
    for t in sample_tasks(STANDARD, 50, "train", seed=2):
        assert ToyTask.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="unknown categories \\['paint'\\]"):
        sample_tasks(TINY, 1, "train", 0, categories=["paint"])
    with pytest.raises(ValueError, match="split='dev'"):
        sample_tasks(TINY, 1, "dev", 0)


# --- teacher and scoring ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", BOTH, ids=lambda p: p.name)
def test_traces_state_the_output_scene(preset):
    tasks = sample_tasks(preset, 550, "val", seed=4)
    for compact in (True, False):
        for t in tasks:
            trace = write_trace(t, preset, seed=5, compact=compact)
            assert not trace.error_injected and trace.error == "" and trace.stated_scene == t.output_scene
            assert text_correct(trace.text, t.output_scene, preset)
            assert text_image_agreement(trace.text, render(t.output_scene, preset), preset)
            if t.input_scene is not None:
                assert not text_image_agreement(trace.text, render(t.input_scene, preset), preset)
    texts = {write_trace(tasks[0], preset, seed=s).text for s in range(8)}
    assert len(texts) >= 2  # phrasing varies with the seed


def test_tiny_compact_traces_are_short():
    words = [len(write_trace(t, TINY, seed=0, compact=True).text.split()) for t in sample_tasks(TINY, 1100, "train", 9)]
    assert np.mean(words) <= 18 and max(words) <= 28


def test_error_injection_rate_and_consistency():
    tasks = sample_tasks(TINY, 2000, "train", seed=6)
    clean = [write_trace(t, TINY, seed=1) for t in tasks]
    noisy = [write_trace(t, TINY, seed=1, error_rate=0.25) for t in tasks]
    rate = np.mean([tr.error_injected for tr in noisy])
    assert abs(rate - 0.25) < 0.04  # 4 standard deviations of a binomial(2000, 0.25) fraction
    for t, c, n in zip(tasks, clean, noisy):
        assert text_correct(n.text, t.output_scene, TINY) == (not n.error_injected)
        assert trace_result(n.text, TINY) == n.stated_scene and bool(n.error) == n.error_injected
        if not n.error_injected:
            assert n.text == c.text  # error_rate only changes the traces it corrupts
    assert all(write_trace(t, TINY, error_rate=1.0).error_injected for t in tasks[:50])


def test_trace_scoring_helpers():
    out = make_scene([ToyObject(3, 1, "square", "blue")])
    assert trace_result("think. result: blue square b4.") == out
    assert text_correct("a. result: red circle a1. result: blue square b4.", out)  # the last result counts
    assert not text_correct("no result here", out) and not text_correct("result: blue squar b4", out)
    assert text_image_agreement("result: blue square b4", render(out, TINY), TINY)
    assert not text_image_agreement("result: empty", render(out, TINY), TINY)
    with pytest.raises(ValueError, match="preset 'standard', not 'tiny'"):
        write_trace(sample_tasks(STANDARD, 1, "train", 0)[0], TINY)
    assert set(EDIT_CATEGORIES) < set(CATEGORIES)
