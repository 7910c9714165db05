"""The exact toy judge: handcrafted right, wrong and half-right outputs for every metric, with hand-computed scores."""
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from rl.reward import toy_agreement
from tasks.evaluate.judge_exact import ExactToyJudge, png_bytes, toy_item
from tasks.evaluate.judges import METRICS, EvalOutput, overall
from tasks.toy import PRESETS, describe, render, sample_tasks, write_trace
from tasks.toy.scene import ToyObject, free_cells, make_scene

TINY = PRESETS["tiny"]
CELLS = TINY.grid ** 2  # 16
POOL = sample_tasks(TINY, 220, "test", seed=0)  # 20 tasks of each of the 11 categories
JUDGE = ExactToyJudge("tiny")
TEXT = ("text_quality", "text_alignment")
IMAGE = ("image_alignment", "image_quality", "image_consistency")


def _pick(category, n_out, n_in=None):
    """The first pool task of a category with n_out output (and n_in input) objects."""
    return next(t for t in POOL if t.category == category and len(t.output_scene) == n_out
                and (n_in is None or len(t.input_scene) == n_in))


def _judge(task, text=None, image=None):
    """Judgment of one output; text defaults to the teacher trace, image to the rendered true output."""
    item = toy_item(task)
    image = render(task.output_scene, TINY) if image is None else image
    out = EvalOutput(item.item_id, item.reference_text if text is None else text, png_bytes(image))
    j = JUDGE.judge([item], [out])[0]
    assert not j.failed, j.reason
    return j.scores


def _recoloured(obj, colour=None):
    colour = colour or next(c for c in TINY.colours if c != obj.colour)
    return replace(obj, colour=colour)


def _swap_in(scene, old, new):
    return make_scene([new if o == old else o for o in scene])


def _full(scores, metrics):
    return all(scores[m] == 100.0 for m in metrics)


# --- the ground truth ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset_name", ["tiny", "standard"])
def test_ground_truth_scores_100_on_every_metric_and_category(preset_name):
    preset = PRESETS[preset_name]
    tasks = sample_tasks(preset, 44, "val", seed=1)
    judge = ExactToyJudge(preset_name)
    for compact in (True, False):
        items = [toy_item(t, seed=i, compact=compact) for i, t in enumerate(tasks)]
        outputs = [EvalOutput(i.item_id, i.reference_text, i.target_image) for i in items]
        for task, j in zip(tasks, judge.judge(items, outputs)):
            assert not j.failed and j.judge == "exact-toy" and j.version == "1" and j.item_id == task.sample_id
            assert (j.scores["image_consistency"] is None) == (task.category == "generate")
            assert all(j.scores[m] == 100.0 for m in METRICS if j.scores[m] is not None), (task, j)
            assert overall(j.scores) == 100.0
    assert {t.category for t in tasks} == {t.category for t in POOL}  # all 10 edit categories + generate


def test_every_teacher_trace_is_well_formed_and_a_wrong_result_lowers_only_text_alignment():
    for i, task in enumerate(POOL):
        trace = write_trace(task, TINY, seed=i, error_rate=1.0, compact=i % 2 == 0)  # always a wrong result
        s = _judge(task, text=trace.text)
        assert s["text_quality"] == 100.0, trace.text  # every word a teacher writes is toy vocabulary
        assert s["text_alignment"] < 100.0 and s["output_alignment"] < 100.0
        assert _full(s, ("image_alignment", "image_quality")) and s["image_consistency"] in (None, 100.0)


def test_empty_true_output_scene():
    task = _pick("remove", 0)
    assert describe(task.output_scene) == "empty"
    assert _full(_judge(task), METRICS)
    stray = render((ToyObject(0, 0, "circle", "red"),), TINY)
    s = _judge(task, image=stray)
    assert s["image_alignment"] == 0.0 and s["output_alignment"] == 0.0  # "empty" stated and true, one object shown
    noisy = render((), TINY)
    noisy[:TINY.cell_px, :TINY.cell_px] = 0  # a1 is black: unreadable, and no side names an object
    s = _judge(task, image=noisy)
    assert s["image_alignment"] == pytest.approx(100 * 15 / 16) and s["image_quality"] == pytest.approx(100 * 15 / 16)
    assert s["output_alignment"] == pytest.approx(100 * 15 / 16)  # toy_agreement's convention, followed by both


# --- wrong, half-right and unedited images -----------------------------------------------------------

def test_wrong_colour_image_lowers_image_metrics_to_hand_computed_values():
    task = _pick("recolour", 3)  # 3 objects; the edit changes 1 cell, so 15 cells must stay as they were
    kept = next(o for o in task.input_scene if o in task.output_scene)
    image = render(_swap_in(task.output_scene, kept, _recoloured(kept)), TINY)
    s = _judge(task, image=image)
    assert s["image_alignment"] == pytest.approx(100 * 2 * 2 / (3 + 3))  # tp 2 of 3 shown, 3 true
    assert s["image_consistency"] == pytest.approx(100 * 14 / 15)
    assert s["output_alignment"] == pytest.approx(100 * 2 * 2 / (3 + 3))
    assert _full(s, TEXT + ("image_quality",))


def test_input_image_as_output_is_consistent_but_misaligned():
    recolour = _pick("recolour", 3)
    s = _judge(recolour, image=render(recolour.input_scene, TINY))
    assert s["image_consistency"] == 100.0 and _full(s, TEXT + ("image_quality",))
    assert s["image_alignment"] == pytest.approx(100 * 4 / 6)  # 3 shown, 3 true, 2 shared
    add = _pick("add", 3)
    s = _judge(add, image=render(add.input_scene, TINY))
    assert s["image_consistency"] == 100.0
    assert s["image_alignment"] == pytest.approx(100 * 4 / 5)  # 2 shown, 3 true, 2 shared
    assert s["output_alignment"] == pytest.approx(100 * 4 / 5)


def test_half_the_objects_wrong_gives_f1_of_one_half():
    task = _pick("attribute", 4)
    a, b = task.output_scene[:2]
    half = _swap_in(_swap_in(task.output_scene, a, _recoloured(a)), b, _recoloured(b))
    s = _judge(task, image=render(half, TINY))
    assert s["image_alignment"] == pytest.approx(50.0) and s["output_alignment"] == pytest.approx(50.0)
    s = _judge(task, text=f"result: {describe(half)}.")  # the text is half wrong, the image right
    assert s["text_alignment"] == pytest.approx(50.0) and s["output_alignment"] == pytest.approx(50.0)
    assert s["text_quality"] == 100.0 and _full(s, ("image_alignment", "image_quality"))
    s = _judge(task, text=f"result: {describe(half)}.", image=render(half, TINY))  # both wrong, the same way
    assert s["text_alignment"] == pytest.approx(50.0) and s["image_alignment"] == pytest.approx(50.0)
    assert s["output_alignment"] == 100.0
    cells = free_cells(task.output_scene, TINY)[:2]  # half the objects drawn in the wrong cells
    moved = make_scene(list(task.output_scene[2:]) + [ToyObject(*c, *o.glyph) for c, o in zip(cells, (a, b))])
    assert _judge(task, image=render(moved, TINY))["image_alignment"] == pytest.approx(50.0)


# --- garbage text ------------------------------------------------------------------------------------

def test_garbage_text_lowers_text_metrics_only():
    task = _pick("generate", 2)
    s = _judge(task, text="qwe rty !! ##")
    assert s["text_quality"] == 0.0 and s["text_alignment"] == 0.0 and s["output_alignment"] == 0.0
    assert _full(s, ("image_alignment", "image_quality")) and s["image_consistency"] is None
    no_result = write_trace(task, TINY).text.split("result:")[0]  # toy words, but no result phrase
    assert _judge(task, text=no_result)["text_quality"] == 0.0


def test_garbage_words_and_malformed_items_give_hand_computed_text_scores():
    task = _pick("generate", 1)
    clean = f"result: {describe(task.output_scene)}."  # tokens: result : colour shape cell . = 6
    s = _judge(task, text="xyzzy " + clean)
    assert s["text_quality"] == pytest.approx(100 * 6 / 7)
    assert _full(s, ("text_alignment", "output_alignment"))
    task = _pick("generate", 2)
    first = describe(task.output_scene[:1])
    s = _judge(task, text=f"result: {first}, purple blob z9.")  # purple is no tiny colour, z9 no tiny cell
    assert s["text_quality"] == pytest.approx(100 * (1 / 2) * (7 / 10))  # 1 of 2 items parses; 7 of 10 tokens known
    assert s["text_alignment"] == pytest.approx(100 * 2 * 1 / (1 + 1 + 2))  # 1 fact + 1 malformed vs 2 true
    assert s["output_alignment"] == pytest.approx(100 * 2 * 1 / (1 + 1 + 2))
    o = task.output_scene[0]
    clash = f"result: {first}, {describe((replace(o, colour=_recoloured(o).colour),))}."  # two facts, one cell
    assert _judge(task, text=clash)["text_quality"] == pytest.approx(50.0)


# --- unreadable images -------------------------------------------------------------------------------

def test_noise_image_scores_zero_on_image_metrics_but_is_judged():
    task = _pick("recolour", 3)
    noise = np.random.default_rng(0).integers(0, 256, (TINY.image_size, TINY.image_size, 3), dtype=np.uint8)
    s = _judge(task, image=noise)
    assert all(s[m] == 0.0 for m in IMAGE + ("output_alignment",)) and _full(s, TEXT)
    too_big = np.full((64, 64, 3), 245, dtype=np.uint8)  # decodes, but is not a tiny render
    assert _judge(task, image=too_big)["image_quality"] == 0.0


def test_one_noisy_background_cell():
    task = _pick("recolour", 3)
    r, c = next(cell for cell in free_cells(task.output_scene, TINY) if cell in free_cells(task.input_scene, TINY))
    image = render(task.output_scene, TINY)
    px = TINY.cell_px
    image[r * px:(r + 1) * px, c * px:(c + 1) * px] = np.random.default_rng(1).integers(0, 256, (px, px, 3))
    s = _judge(task, image=image)
    assert s["image_quality"] == pytest.approx(100 * 15 / 16)
    assert s["image_alignment"] == pytest.approx(100 * 2 * 3 / (3 + 1 + 3))  # the unreadable cell is a wrong fact
    assert s["image_consistency"] == pytest.approx(100 * 14 / 15)
    assert s["output_alignment"] == 100.0 and _full(s, TEXT)  # every stated object is shown


def test_output_alignment_is_toy_agreement():
    for i, task in enumerate(POOL[:40]):
        text = write_trace(task, TINY, seed=i, error_rate=0.5).text
        image = render(POOL[i + 1].output_scene, TINY)  # another task's image: mostly disagrees
        assert _judge(task, text=text, image=image)["output_alignment"] == pytest.approx(
            100 * toy_agreement(text, image, TINY))


# --- failures and bookkeeping ------------------------------------------------------------------------

def test_failed_outputs_are_failed_judgments_with_reasons():
    tasks = [_pick("move", 3), _pick("swap", 3), _pick("generate", 2), _pick("add", 2), _pick("remove", 1)]
    items = [toy_item(t) for t in tasks]
    png = items[0].target_image
    outputs = [EvalOutput(items[0].item_id, "result: empty.", png, error="sampler ran out of memory"),
               EvalOutput(items[1].item_id, items[1].reference_text, None),
               EvalOutput(items[2].item_id, items[2].reference_text, b"not an image"),
               EvalOutput(items[3].item_id, items[3].reference_text, png[:len(png) // 2])]  # truncated PNG
    judgments = JUDGE.judge(items, outputs[::-1])  # order of outputs does not matter; items[4] has none
    assert [j.item_id for j in judgments] == [i.item_id for i in items]
    reasons = ("sampler ran out of memory", "no output image", "does not decode", "does not decode", "no output")
    for j, why in zip(judgments, reasons):
        assert j.failed and why in j.reason, j.reason
        assert j.scores == {m: None for m in METRICS} and overall(j.scores) is None


def test_other_image_modes_decode_and_bad_items_raise():
    task = _pick("move", 2)
    item = toy_item(task)
    rgba = io.BytesIO()
    Image.fromarray(render(task.output_scene, TINY)).convert("RGBA").save(rgba, format="PNG")
    j = JUDGE.judge([item], [EvalOutput(item.item_id, item.reference_text, rgba.getvalue())])[0]
    assert _full(j.scores, METRICS)
    with pytest.raises(ValueError, match="standard"):
        ExactToyJudge("standard").judge([item], [])
    with pytest.raises(ValueError, match="preset"):
        ExactToyJudge("huge")
    broken = replace(item, extra={**item.extra, "output_scene": "a red blob somewhere"})
    with pytest.raises(ValueError, match="toy_item"):
        JUDGE.judge([broken], [])
    with pytest.raises(ValueError, match="duplicate"):
        JUDGE.judge([item], [EvalOutput(item.item_id, "", None)] * 2)


def test_toy_item_carries_the_ground_truth():
    edit, gen = toy_item(_pick("swap", 3)), toy_item(_pick("generate", 2))
    assert edit.kind == "edit" and gen.kind == "generate" and gen.input_image is None
    assert edit.extra["input_scene"] == describe(_pick("swap", 3).input_scene) and gen.extra["input_scene"] is None
    assert edit.extra["output_scene"] == describe(_pick("swap", 3).output_scene) and edit.extra["preset"] == "tiny"
    decoded = np.asarray(Image.open(io.BytesIO(edit.input_image)))
    assert np.array_equal(decoded, render(_pick("swap", 3).input_scene, TINY))
    assert "result:" in edit.reference_text and edit.item_id == _pick("swap", 3).sample_id
