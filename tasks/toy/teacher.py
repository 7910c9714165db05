"""The teacher: a reasoning trace for every toy task, optional injected errors, and text scoring.

A trace states the facts the instruction needs (the task's hint), the changes it makes (full
mode only: moves, removals, additions, changes, read off the diff of input and output) and ends
with the canonical result phrase "result: <describe(output)>", so a generated trace can be
checked exactly against the true scene and against the generated image. Phrasing varies with
the seed; with error_rate > 0 some traces state a wrong result (a wrong colour, a wrong cell or
a phantom object) and stay consistent with it, to study how wrong reasoning propagates.
Leaves out task sampling (tasks.py) and pixels (render.py). Traces are lowercase.
"""
import random
from dataclasses import dataclass, replace

from tasks.toy.render import parse_image
from tasks.toy.scene import (Scene, ToyObject, ToyPreset, cell_name, describe, free_cells, glyph_phrase,
                             make_scene, parse_description, random_glyph)
from tasks.toy.tasks import ToyTask

RESULT_MARKER = "result:"
HINT_LEADS = ("{}", "first, {}", "note: {}")
CHANGE_LEADS = ("so {}.", "then {}.", "steps: {}.")
RESULT_LEADS = ("result: {}.", "so the result: {}.", "final result: {}.")
MOVE = ("{p} {a} to {b}", "the {p} goes from {a} to {b}", "move the {p} from {a} to {b}")
REMOVE = ("remove the {p} at {a}", "the {p} at {a} goes away", "drop the {p} at {a}")
ADD = ("add {p} {a}", "put the {p} at {a}", "new {p} at {a}")
CHANGE = ("{p} {a} becomes {q}", "the {p} at {a} is now {q}", "{a}: {p} to {q}")
NO_CHANGE = "nothing changes"


@dataclass(frozen=True)
class Trace:
    """A reasoning trace and what it claims."""

    text: str
    """The trace; its last sentence is the result phrase."""
    stated_scene: Scene
    """The scene the result phrase states (the task's output unless an error was injected)."""
    error_injected: bool
    """True when stated_scene was corrupted on purpose."""
    error: str
    """What was corrupted ('' when nothing was)."""


def _diff(before: Scene, after: Scene) -> list[tuple[str, ToyObject, ToyObject | None]]:
    """Edits from before to after, as (kind, object, new object | None).

    kinds: 'move' (same look, new cell), 'change' (same cell, new look), 'remove', 'add'.
    """
    removed = [o for o in before if o not in after]
    added = [o for o in after if o not in before]
    edits = []
    for kind, match in (("move", lambda r, a: r.glyph == a.glyph), ("change", lambda r, a: r.cell == a.cell)):
        for r in list(removed):
            a = min((a for a in added if match(r, a)), default=None,
                    key=lambda a: abs(a.row - r.row) + abs(a.col - r.col))
            if a is not None:
                edits.append((kind, r, a))
                removed.remove(r)
                added.remove(a)
    return sorted(edits) + [("remove", r, None) for r in removed] + [("add", a, None) for a in added]


def _change_text(kind: str, old: ToyObject, new: ToyObject | None, variant: int) -> str:
    p, a = glyph_phrase(old.glyph), cell_name(*old.cell)
    if kind == "move":
        return MOVE[variant].format(p=p, a=a, b=cell_name(*new.cell))
    if kind == "change":
        q = glyph_phrase(new.glyph)
        q = new.colour if new.glyph == (old.shape, new.colour, old.size) else f"{'an' if q[0] in 'aeiou' else 'a'} {q}"
        return CHANGE[variant].format(p=p, a=a, q=q)
    return (REMOVE if kind == "remove" else ADD)[variant].format(p=p, a=a)


def _corrupt(rng: random.Random, scene: Scene, preset: ToyPreset) -> tuple[Scene, str]:
    """A scene one wrong fact away from `scene`, and what that fact is."""
    cells = free_cells(scene, preset)
    kinds = [k for k, ok in (("colour", scene), ("cell", scene and cells), ("phantom", cells)) if ok]
    kind = rng.choice(kinds)
    if kind == "phantom":
        new = ToyObject(*rng.choice(cells), *random_glyph(rng, preset))
        return make_scene(scene + (new,)), f"phantom {glyph_phrase(new.glyph)} at {cell_name(*new.cell)}"
    o = rng.choice(scene)
    if kind == "colour":
        new = replace(o, colour=rng.choice([c for c in preset.colours if c != o.colour]))
        what = f"colour of the {glyph_phrase(o.glyph)} at {cell_name(*o.cell)} stated as {new.colour}"
    else:
        to = rng.choice(cells)
        new = replace(o, row=to[0], col=to[1])
        what = f"{glyph_phrase(o.glyph)} at {cell_name(*o.cell)} stated at {cell_name(*to)}"
    return make_scene([x for x in scene if x != o] + [new]), what


def write_trace(task: ToyTask, preset: ToyPreset, seed: int = 0, error_rate: float = 0.0,
                compact: bool = False) -> Trace:
    """Reasoning trace of a task; deterministic in (task, seed, error_rate, compact).

    Args:
        task: from sample_tasks(preset, ...).
        preset: the preset the task was drawn from.
        seed: picks the phrasing templates (and which traces get an error).
        error_rate: probability in [0, 1] that the trace states a wrong result.
        compact: hint + result only (the short form for tiny models); else hint + changes + result.
    """
    if task.preset != preset.name:
        raise ValueError(f"task {task.sample_id} is from preset {task.preset!r}, not {preset.name!r}; "
                         f"pass PRESETS[{task.preset!r}]")
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate={error_rate} must lie in [0, 1]")
    rng = random.Random(f"trace/{task.sample_id}/{seed}")
    inject, lead, variant = rng.random() < error_rate, rng.randrange(len(HINT_LEADS)), rng.randrange(len(MOVE))
    stated, error = _corrupt(rng, task.output_scene, preset) if inject else (task.output_scene, "")
    parts = [HINT_LEADS[lead].format(task.hint)]
    if not compact and task.input_scene is not None:
        edits = [_change_text(kind, a, b, variant) for kind, a, b in _diff(task.input_scene, stated)]
        parts.append(CHANGE_LEADS[lead].format("; ".join(edits) or NO_CHANGE))
    parts.append((RESULT_LEADS[lead] if not compact else RESULT_LEADS[0]).format(describe(stated)))
    return Trace(text=" ".join(parts), stated_scene=stated, error_injected=inject, error=error)


def trace_result(text: str, preset: ToyPreset | None = None) -> Scene | None:
    """The scene stated after the last 'result:' of a trace; None if there is none or it does not parse."""
    i = text.lower().rfind(RESULT_MARKER)
    return None if i < 0 else parse_description(text[i + len(RESULT_MARKER):], preset)


def text_correct(text: str, output_scene: Scene, preset: ToyPreset | None = None) -> bool:
    """The trace's result phrase states exactly the true output scene."""
    stated = trace_result(text, preset)
    return stated is not None and stated == output_scene


def text_image_agreement(text: str, image, preset: ToyPreset, tolerance: float = 0.0) -> bool:
    """The trace's result phrase states exactly the scene the image shows (image uint8 (H, W, 3))."""
    stated, shown = trace_result(text, preset), parse_image(image, preset, tolerance)
    return stated is not None and stated == shown

