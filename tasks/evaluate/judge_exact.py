"""The exact toy judge: ParaBench's six metrics computed from the toy world's scene parser and ground truth.

The paper scores its metrics with a GPT-4.1 judge and gives no rubric; on the toy world every
metric has an exact answer, defined here. Notation: T = the true output scene, I = the true input
scene (edits only), both from item.extra; the output's text is the reasoning trace; its image is
read cell by cell: a cell is *readable* when it equals (mean absolute error <= CELL_TOLERANCE) a
glyph tile or the empty background of the preset (tasks.toy.render), else *unreadable*. S = the
objects the image shows (readable cells holding a glyph), u = the number of unreadable cells,
N = grid * grid cells. The *result phrase* is the text after the trace's last "result:"; each of
its comma-separated items is a *fact* when it parses as one object of the preset ("blue circle
d1"), else a *malformed item*; "empty" alone states no object (rl.reward._stated_objects).
A = stated facts, m = malformed items. F1(P, m, Q) = 2 |P & Q| / (|P| + m + |Q|).

  text_quality      100 * R * W. R (the result phrase parses): 0 without a result phrase, 1 for
                    "empty", else (facts whose cell no earlier fact claimed) / (all items).
                    W (no garbage): the fraction of tokens (runs of [a-z0-9], each other
                    non-space character) that are toy vocabulary (teacher and hint words, the
                    preset's colours, shapes, sizes and cells, small numbers) or one of ".,:;".
  text_alignment    100 * F1(A, m, T): the stated result vs the true output scene; 0 without a
                    result phrase; 100 when "empty" is stated and T is empty.
  image_consistency edits only (None for generations). U = the cells whose content (an object's
                    look, or background) is the same in I and T, i.e. what the edit must leave
                    alone, background included; score = 100 * (cells of U the image shows as in I)
                    / |U|. An unreadable cell is never preserved; 100 when U is empty.
  image_alignment   100 * F1(S, u, T): every unreadable cell counts as a wrong fact, so 100 means
                    the image is exactly T. When neither S nor T holds an object: 100 * (N - u) / N.
  image_quality     100 * (N - u) / N: the fraction of cells that are a clean toy render.
  output_alignment  100 * rl.reward.toy_agreement(text, image): F1 of the stated result vs the
                    objects the image shows (unreadable cells only cost recall); 0 without a result
                    phrase; 100 * (N - u) / N when neither side names an object.

Failures: an output with `error` set, without an image, or whose image bytes do not decode (PIL)
gives Judgment(failed=True, reason=...) with every score None; so does an item without an output.
An image that decodes but is no toy render is *not* a failure: it scores by the rules above (a
noise image: image_quality 0). A decoded image of the wrong size is judged as an all-grey canvas
(no readable cell); RGBA / grey-scale PNGs are converted to RGB first. An item of another preset,
or with malformed extra, raises ValueError (a benchmark error, not a model error).
Leaves out: LLM judges, caching, aggregation (overall() is in tasks/evaluate/judges.py).
"""
import io
import re
from functools import lru_cache

import numpy as np
from PIL import Image

from rl.reward import GREY, _stated_objects, toy_agreement
from tasks.evaluate.judges import METRICS, EvalItem, EvalOutput, Judgment
from tasks.toy import teacher
from tasks.toy.render import _cells, glyph_tiles, render
from tasks.toy.scene import (EMPTY_SCENE_TEXT, PRESETS, Scene, ToyObject, ToyPreset, cell_name,
                             parse_description)
from tasks.toy.tasks import DIRECTIONS, NUMBER_WORDS, RELATION_WORDS, ToyTask

FULL_SCORE = 100.0
CELL_TOLERANCE = 0.0  # mean absolute error per value a readable cell may have (0: exact renders only)
UNREADABLE = "?"  # cell label of a cell that matches no glyph tile and not the background
PUNCTUATION = frozenset(".,:;")
TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
TEACHER_TEMPLATES = (teacher.HINT_LEADS + teacher.CHANGE_LEADS + teacher.RESULT_LEADS + teacher.MOVE + teacher.REMOVE
                     + teacher.ADD + teacher.CHANGE + (teacher.NO_CHANGE, teacher.RESULT_MARKER))
HINT_WORDS = frozenset("""a an and are at cell cells colours column common corners drops each free from hit is it its
    lowest most object objects of one rolls round shapes slide something the they to until warm cool with""".split())
"""Words of the hints tasks/toy/tasks.py writes inline (the rest are templates, presets and numbers)."""


# --- ground truth and decoding ---------------------------------------------------------------------

def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 (H, W, 3); raises OSError / ValueError / SyntaxError / EOFError if they do not decode."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def toy_item(task: ToyTask, seed: int = 0, compact: bool = True) -> EvalItem:
    """A benchmark item of a toy task: rendered input / target PNGs, the teacher trace, scenes in extra."""
    preset = PRESETS[task.preset]
    d = task.to_dict()
    return EvalItem(item_id=task.sample_id, kind="generate" if task.input_scene is None else "edit",
                    category=task.category, instruction=task.instruction,
                    input_image=None if task.input_scene is None else png_bytes(render(task.input_scene, preset)),
                    target_image=png_bytes(render(task.output_scene, preset)),
                    reference_text=teacher.write_trace(task, preset, seed=seed, compact=compact).text,
                    extra={"input_scene": d["input_scene"], "output_scene": d["output_scene"], "preset": task.preset})


def item_scenes(item: EvalItem, preset: ToyPreset) -> tuple[Scene | None, Scene]:
    """(input scene or None, output scene) from item.extra; ValueError if they are not this preset's."""
    extra = item.extra or {}
    if extra.get("preset") != preset.name:
        raise ValueError(f"item {item.item_id} has preset {extra.get('preset')!r} but the judge reads "
                         f"{preset.name!r}; build ExactToyJudge({extra.get('preset')!r}) for it")
    texts = (extra.get("input_scene"), extra.get("output_scene"))
    input_scene, output_scene = (None if t is None else parse_description(t, preset) for t in texts)
    if output_scene is None or (texts[0] is None) != (input_scene is None) or (item.kind == "edit") != (
            input_scene is not None):
        raise ValueError(f"item {item.item_id} ({item.kind}): extra scenes {texts} must be describe() text of "
                         f"preset {preset.name!r}, input_scene None exactly for generation; build it with toy_item")
    return input_scene, output_scene


# --- reading the image and the text ----------------------------------------------------------------

def read_cells(image: np.ndarray, preset: ToyPreset) -> list:
    """Per cell in reading order: its glyph, None (background) or UNREADABLE. image: uint8 (H, W, 3)."""
    labels, tiles = glyph_tiles(preset)
    cells = _cells(image, preset)  # (N, c*c*3)
    err = np.abs(cells[:, None, :] - tiles.reshape(len(tiles), -1).astype(np.int16)[None]).mean(-1)  # (N, T)
    best = err.argmin(1)
    ok = err[np.arange(len(best)), best] <= CELL_TOLERANCE
    return [labels[t] if k else UNREADABLE for t, k in zip(best, ok)]


def scene_cells(scene: Scene, preset: ToyPreset) -> list:
    """Per cell in reading order: the glyph of the scene's object there, or None."""
    out = [None] * preset.grid ** 2
    for o in scene:
        out[o.row * preset.grid + o.col] = o.glyph
    return out


def shown_objects(read: list, preset: ToyPreset) -> set:
    """The objects a read image shows (cells holding a glyph)."""
    return {ToyObject(i // preset.grid, i % preset.grid, *g) for i, g in enumerate(read) if g not in (None, UNREADABLE)}


def canvas(image: np.ndarray, preset: ToyPreset) -> np.ndarray:
    """The image, or an all-grey canvas (no readable cell) when it is not the preset's size."""
    if image.shape == (preset.image_size, preset.image_size, 3):
        return image
    return np.full((preset.image_size, preset.image_size, 3), GREY, dtype=np.uint8)


@lru_cache(maxsize=8)
def lexicon(preset: ToyPreset) -> frozenset:
    """Every word a teacher trace of this preset can contain."""
    words = set(HINT_WORDS) | set(DIRECTIONS) | set(NUMBER_WORDS) | {EMPTY_SCENE_TEXT}
    for phrase in TEACHER_TEMPLATES + tuple(RELATION_WORDS.values()):
        words |= set(TOKEN.findall(re.sub(r"\{\w*\}", " ", phrase)))
    words |= set(preset.colours) | set(preset.shapes) | {f"{s}s" for s in preset.shapes} | set(preset.sizes) - {""}
    words |= {cell_name(r, c) for r in range(preset.grid) for c in range(preset.grid)}
    return frozenset(words | {str(n) for n in range(preset.grid ** 2 + 1)})


# --- the six metrics (pure; scores in [0, 100]) -----------------------------------------------------

def f1(predicted: list | set, wrong: int, actual: Scene | set) -> float:
    """2 |P & Q| / (|P| + wrong + |Q|) in [0, 1]; 1.0 when all three are empty."""
    total = len(predicted) + wrong + len(actual)
    return 1.0 if total == 0 else 2.0 * len(set(predicted) & set(actual)) / total


def text_quality(text: str, preset: ToyPreset) -> float:
    """100 * (well-formed share of the result phrase) * (share of tokens that are toy vocabulary)."""
    stated = _stated_objects(text, preset)
    if stated is None:
        return 0.0
    objects, wrong = stated
    items = len(objects) + wrong
    clashes = len(objects) - len({o.cell for o in objects})  # two facts claiming one cell
    result_share = 1.0 if items == 0 else (len(objects) - clashes) / items
    tokens = TOKEN.findall(text.lower())
    known = lexicon(preset) | PUNCTUATION
    return FULL_SCORE * result_share * sum(t in known for t in tokens) / len(tokens)


def text_alignment(text: str, output_scene: Scene, preset: ToyPreset) -> float:
    """100 * F1 of the stated result (facts + malformed items) vs the true output scene."""
    stated = _stated_objects(text, preset)
    return 0.0 if stated is None else FULL_SCORE * f1(stated[0], stated[1], output_scene)


def image_consistency(read: list, input_scene: Scene, output_scene: Scene, preset: ToyPreset) -> float:
    """100 * share of the cells the edit leaves alone (same in input and output) the image shows as in the input."""
    before, after = scene_cells(input_scene, preset), scene_cells(output_scene, preset)
    unaffected = [i for i in range(len(before)) if before[i] == after[i]]
    if not unaffected:
        return FULL_SCORE
    return FULL_SCORE * sum(read[i] == before[i] for i in unaffected) / len(unaffected)


def image_alignment(read: list, output_scene: Scene, preset: ToyPreset) -> float:
    """100 * F1 of the shown objects (+ unreadable cells as wrong facts) vs the true output scene."""
    shown, unreadable = shown_objects(read, preset), read.count(UNREADABLE)
    if not shown and not output_scene:
        return image_quality(read)
    return FULL_SCORE * f1(shown, unreadable, output_scene)


def image_quality(read: list) -> float:
    """100 * share of readable cells."""
    return FULL_SCORE * (len(read) - read.count(UNREADABLE)) / len(read)


def output_alignment(text: str, image: np.ndarray, preset: ToyPreset) -> float:
    """100 * rl.reward.toy_agreement: the stated result vs what the image shows."""
    return FULL_SCORE * toy_agreement(text, image, preset, tolerance=CELL_TOLERANCE)


def score_output(text: str, image: np.ndarray, input_scene: Scene | None, output_scene: Scene,
                 preset: ToyPreset) -> dict:
    """The six metrics of one decoded output (image uint8 (H, W, 3)); image_consistency None for generation."""
    image = canvas(image, preset)
    read = read_cells(image, preset)
    scores = {"text_quality": text_quality(text, preset),
              "text_alignment": text_alignment(text, output_scene, preset),
              "image_consistency": None if input_scene is None else image_consistency(read, input_scene,
                                                                                      output_scene, preset),
              "image_alignment": image_alignment(read, output_scene, preset),
              "image_quality": image_quality(read),
              "output_alignment": output_alignment(text, image, preset)}
    return {m: scores[m] for m in METRICS}


# --- the judge ---------------------------------------------------------------------------------------

def _rationale(text: str, scores: dict, preset: ToyPreset) -> str:
    stated = _stated_objects(text, preset)
    said = "no result phrase" if stated is None else f"result states {len(stated[0])} objects, {stated[1]} malformed"
    return f"{said}; {scores['image_quality']:.0f}% of cells readable"


class ExactToyJudge:
    """Scores toy-world outputs exactly (see the module docstring for every metric's definition)."""

    name = "exact-toy"
    version = "1"

    def __init__(self, preset: str = "tiny"):
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}; use one of {sorted(PRESETS)}")
        self.preset = PRESETS[preset]

    def judge(self, items: list[EvalItem], outputs: list[EvalOutput]) -> list[Judgment]:
        """One Judgment per item, in item order (outputs are matched by item_id)."""
        by_id = {o.item_id: o for o in outputs}
        if len(by_id) != len(outputs):
            raise ValueError(f"{len(outputs) - len(by_id)} duplicate item_ids among {len(outputs)} outputs; "
                             f"pass one output per item")
        return [self.judge_one(item, by_id.get(item.item_id)) for item in items]

    def judge_one(self, item: EvalItem, output: EvalOutput | None) -> Judgment:
        """The Judgment of one item (output None: no output was produced for it)."""
        input_scene, output_scene = item_scenes(item, self.preset)
        if output is None or output.error or output.image is None:
            why = ("no output for this item" if output is None else f"output error: {output.error}" if output.error
                   else "no output image")
            return self._failed(item, why)
        try:
            image = decode_image(output.image)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            return self._failed(item, f"output image does not decode: {type(e).__name__}: {e}")
        scores = score_output(output.text, image, input_scene, output_scene, self.preset)
        return Judgment(item_id=item.item_id, judge=self.name, version=self.version, scores=scores,
                        reason=_rationale(output.text, scores, self.preset))

    def _failed(self, item: EvalItem, reason: str) -> Judgment:
        return Judgment(item_id=item.item_id, judge=self.name, version=self.version,
                        scores={m: None for m in METRICS}, failed=True, reason=reason)
