"""Edit and generation tasks of the toy world, with exact ground truth and disjoint splits.

A task is an input scene (None for generation), an instruction, the output scene and a short
hint (the facts the instruction needs, which the teacher turns into a reasoning trace). Every
builder rejects what it cannot phrase unambiguously (references name exactly one object,
relations point at an occupied cell, counts have a unique answer, ...), so the output scene
is the only correct answer. The split of a task is a hash of its (preset, input, output) key
and the sampler rejects keys of other splits, so train / val / test never share an edit.
Leaves out pixels (render.py) and reasoning text (teacher.py). Instructions are lowercase.
"""
import random
from collections import Counter
from dataclasses import dataclass, replace

from tasks.toy.scene import (COOL_COLOURS, HASH_CHARS, ROUND_SHAPES, WARM_COLOURS, Scene, ToyObject, ToyPreset,
                             cell_name, content_hash, describe, free_cells, glyph_phrase, in_grid, make_scene,
                             object_at, parse_description, random_glyph, random_scene)

EDIT_CATEGORIES = ("add", "remove", "replace", "recolour", "move", "swap", "counting", "relational", "attribute",
                   "spatial")
GENERATION_CATEGORIES = ("generate",)
CATEGORIES = EDIT_CATEGORIES + GENERATION_CATEGORIES
SPLIT_FRACTIONS = {"train": 0.90, "val": 0.05, "test": 0.05}
MAX_ATTEMPTS_PER_TASK = 2000  # rejection-sampler budget per requested task before giving up
MAX_GENERATED_CHAIN = 3       # objects named in a relational generation prompt
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
RELATION_WORDS = {"left": "directly left of", "right": "directly right of", "up": "directly above",
                  "down": "directly below"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
NO_INPUT = "<none>"


@dataclass(frozen=True)
class ToyTask:
    """One sample: input scene (None for generation) + instruction -> output scene."""

    sample_id: str
    """Hash of the task's content; stable across runs and machines."""
    preset: str
    """Name of the ToyPreset it was drawn from."""
    split: str
    """train, val or test (a function of preset, input and output)."""
    category: str
    """One of CATEGORIES."""
    input_scene: Scene | None
    """Scene to edit; None for generation."""
    instruction: str
    """Edit instruction or generation prompt."""
    output_scene: Scene
    """The exact ground-truth result."""
    hint: str
    """One short sentence of the facts the instruction needs (seed of the reasoning trace)."""

    def to_dict(self) -> dict:
        """Plain strings only; scenes as describe() text."""
        return {"sample_id": self.sample_id, "preset": self.preset, "split": self.split,
                "category": self.category, "instruction": self.instruction, "hint": self.hint,
                "input_scene": None if self.input_scene is None else describe(self.input_scene),
                "output_scene": describe(self.output_scene)}

    @classmethod
    def from_dict(cls, d: dict) -> "ToyTask":
        scenes = {k: None if d[k] is None else parse_description(d[k]) for k in ("input_scene", "output_scene")}
        bad = [k for k in ("output_scene", "input_scene") if d[k] is not None and scenes[k] is None]
        if bad:
            raise ValueError(f"{bad[0]}={d[bad[0]]!r} is not a scene description; write it with describe()")
        return cls(**{**d, **scenes})


def split_of(preset_name: str, input_scene: Scene | None, output_scene: Scene) -> str:
    """The split that owns this (preset, input, output) key; fractions SPLIT_FRACTIONS."""
    key = content_hash("split", preset_name, NO_INPUT if input_scene is None else describe(input_scene),
                       describe(output_scene))
    u = int(key, 16) / 16 ** HASH_CHARS
    total = 0.0
    for split, fraction in SPLIT_FRACTIONS.items():
        total += fraction
        if u < total:
            return split
    return split


def make_task(preset: ToyPreset, category: str, input_scene: Scene | None, instruction: str,
              output_scene: Scene, hint: str) -> ToyTask:
    """Fills in sample_id and split."""
    input_text = NO_INPUT if input_scene is None else describe(input_scene)
    sample_id = content_hash("task", preset.name, category, input_text, instruction, describe(output_scene))
    return ToyTask(sample_id=sample_id, preset=preset.name, split=split_of(preset.name, input_scene, output_scene),
                   category=category, input_scene=input_scene, instruction=instruction,
                   output_scene=output_scene, hint=hint)


# --- phrasing helpers ------------------------------------------------------------------------------
def _a(glyph: tuple[str, str, str]) -> str:
    phrase = glyph_phrase(glyph)
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _the(o: ToyObject) -> str:
    return f"the {glyph_phrase(o.glyph)}"


def _at(o: ToyObject) -> str:
    return f"{glyph_phrase(o.glyph)} {cell_name(o.row, o.col)}"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _pick_unique(rng: random.Random, scene: Scene, k: int = 1) -> list[ToyObject] | None:
    """k distinct objects whose look appears once in the scene (so 'the red circle' names one)."""
    counts = Counter(o.glyph for o in scene)
    unique = [o for o in scene if counts[o.glyph] == 1]
    return rng.sample(unique, k) if len(unique) >= k else None


def _step(cell: tuple[int, int], direction: str) -> tuple[int, int]:
    dr, dc = DIRECTIONS[direction]
    return (cell[0] + dr, cell[1] + dc)


def _edit(scene: Scene, remove: list[ToyObject], add: list[ToyObject]) -> Scene:
    return make_scene([o for o in scene if o not in remove] + add)


def _slide(scene: Scene, movers: list[ToyObject], direction: str, preset: ToyPreset) -> Scene:
    """Moves each mover in direction until the edge or another object; leaders move first."""
    dr, dc = DIRECTIONS[direction]
    placed = {o.cell: o for o in scene}
    for o in sorted(movers, key=lambda o: -(o.row * dr + o.col * dc)):
        del placed[o.cell]
        r, c = o.cell
        while in_grid(r + dr, c + dc, preset) and (r + dr, c + dc) not in placed:
            r, c = r + dr, c + dc
        placed[(r, c)] = replace(o, row=r, col=c)
    return make_scene(placed.values())


# --- edit builders: (rng, preset, scene) -> (instruction, output scene, hint) | None ------------------
Built = tuple[str, Scene, str] | None


def _add(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    cells = free_cells(scene, preset)
    if not cells:
        return None
    new = ToyObject(*rng.choice(cells), *random_glyph(rng, preset))
    where = cell_name(new.row, new.col)
    verb = rng.choice(("add", "put", "place"))
    return f"{verb} {_a(new.glyph)} at {where}", _edit(scene, [], [new]), f"cell {where} is free."


def _remove(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    picked = _pick_unique(rng, scene)
    if not picked:
        return None
    t = picked[0]
    verb = rng.choice(("remove", "delete", "take away"))
    return f"{verb} {_the(t)}", _edit(scene, [t], []), f"{_the(t)} is at {cell_name(*t.cell)}."


def _replace(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    picked, glyph = _pick_unique(rng, scene), random_glyph(rng, preset)
    if not picked or glyph == picked[0].glyph:
        return None
    t = picked[0]
    template = rng.choice(("replace {old} with {new}", "turn {old} into {new}"))
    return (template.format(old=_the(t), new=_a(glyph)), _edit(scene, [t], [ToyObject(t.row, t.col, *glyph)]),
            f"{_the(t)} is at {cell_name(*t.cell)}.")


def _recolour(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    picked, colour = _pick_unique(rng, scene), rng.choice(preset.colours)
    if not picked or colour == picked[0].colour:
        return None
    t = picked[0]
    verb = rng.choice(("make", "paint", "recolour"))
    return (f"{verb} {_the(t)} {colour}", _edit(scene, [t], [replace(t, colour=colour)]),
            f"{_the(t)} is at {cell_name(*t.cell)}.")


def _move(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    picked, cells = _pick_unique(rng, scene), free_cells(scene, preset)
    if not picked or not cells:
        return None
    t = picked[0]
    if rng.random() < 0.5:
        to = rng.choice(cells)
        instruction, hint = f"move {_the(t)} to {cell_name(*to)}", f"cell {cell_name(*to)} is free."
    else:
        direction = rng.choice(tuple(DIRECTIONS))
        to = _step(t.cell, direction)
        if not in_grid(*to, preset) or object_at(scene, *to):
            return None
        instruction = f"move {_the(t)} one cell {direction}"
        hint = f"one cell {direction} of {cell_name(*t.cell)} is {cell_name(*to)}."
    return instruction, _edit(scene, [t], [ToyObject(*to, *t.glyph)]), hint


def _swap(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    picked = _pick_unique(rng, scene, k=2)
    if not picked:
        return None
    a, b = picked
    template = rng.choice(("swap {a} and {b}", "exchange {a} and {b}"))
    moved = [ToyObject(*b.cell, *a.glyph), ToyObject(*a.cell, *b.glyph)]
    return template.format(a=_the(a), b=_the(b)), _edit(scene, [a, b], moved), f"{_at(a)}, {_at(b)}."


def _counting(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    mode = rng.choice(("colour", "shape", "match"))
    if mode != "match":  # remove every object of the (unique) most common colour / shape
        counts = Counter(getattr(o, mode) for o in scene).most_common()
        if counts[0][1] < 2 or (len(counts) > 1 and counts[1][1] == counts[0][1]):
            return None
        top = counts[0][0]
        tally = ", ".join(f"{k} {n}" for k, n in counts)
        return (f"remove every object of the most common {mode}", _edit(scene, [o for o in scene if
                getattr(o, mode) == top], []), f"{tally}: {top} is most common.")
    few, many = rng.sample(preset.shapes, 2)  # add `few`s to the bottom row until they match `many`s
    n_few, n_many = (sum(o.shape == s for o in scene) for s in (few, many))
    bottom = preset.grid - 1
    cols = [c for c in range(preset.grid) if not object_at(scene, bottom, c)][:n_many - n_few]
    if n_few >= n_many or len(cols) < n_many - n_few:
        return None
    glyph = (few, rng.choice(preset.colours), rng.choice(preset.sizes))
    added = [ToyObject(bottom, c, *glyph) for c in cols]
    instruction = (f"add {glyph_phrase(glyph)}s to the bottom row from the left until the {few}s are as many "
                   f"as the {many}s")
    return instruction, _edit(scene, [], added), f"{few}s {n_few}, {many}s {n_many}: add {NUMBER_WORDS[len(cols)]}."


def _relational(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    picked, direction = _pick_unique(rng, scene), rng.choice(tuple(DIRECTIONS))
    if not picked:
        return None
    anchor = picked[0]
    cell = _step(anchor.cell, direction)
    target = object_at(scene, *cell) if in_grid(*cell, preset) else None
    if target is None:
        return None
    which = f"the object {RELATION_WORDS[direction]} {_the(anchor)}"
    hint = f"{_at(anchor)}; {RELATION_WORDS[direction]} it: {_at(target)}."
    if rng.random() < 0.5:
        return f"remove {which}", _edit(scene, [target], []), hint
    colour = rng.choice([c for c in preset.colours if c != target.colour])
    return f"make {which} {colour}", _edit(scene, [target], [replace(target, colour=colour)]), hint


def _attribute(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    groups = {"warm": [c for c in preset.colours if c in WARM_COLOURS],
              "cool": [c for c in preset.colours if c in COOL_COLOURS]}
    mode = rng.choice(("recolour", "remove_colour", "remove_shape"))
    if mode == "remove_shape":
        round_ = rng.random() < 0.5
        hit = [o for o in scene if (o.shape in ROUND_SHAPES) == round_]
        named = [s for s in preset.shapes if (s in ROUND_SHAPES) == round_]
        kind = "round" if round_ else "with corners"
        instruction = "remove every round object" if round_ else "remove every object with corners"
        return (instruction, _edit(scene, hit, []), f"shapes {kind}: {_join(named)}.") if hit else None
    name, other = rng.choice((("warm", "cool"), ("cool", "warm")))
    hit = [o for o in scene if o.colour in groups[name]]
    if not hit or not groups[other]:
        return None
    hint = f"{name} colours are {_join(groups[name])}."
    if mode == "remove_colour":
        return f"remove every {name}-coloured object", _edit(scene, hit, []), hint
    colour = rng.choice(groups[other])
    return (f"turn every {name}-coloured object {colour}", _edit(scene, hit, [replace(o, colour=colour) for o in hit]),
            hint)


def _spatial(rng: random.Random, preset: ToyPreset, scene: Scene) -> Built:
    mode = rng.choice(("fall", "gravity", "wind", "roll"))
    if mode == "gravity":
        return ("everything falls down: show where each object lands", _slide(scene, list(scene), "down", preset),
                "each object drops to the lowest free cell of its column.")
    if mode == "wind":
        side = rng.choice(("left", "right"))
        return (f"a strong wind pushes everything to the {side}", _slide(scene, list(scene), side, preset),
                f"objects slide {side} until they hit something.")
    picked = _pick_unique(rng, scene)
    if not picked:
        return None
    t = picked[0]
    direction = "down" if mode == "fall" else rng.choice(("left", "right"))
    out = _slide(scene, [t], direction, preset)
    landed = next((cell_name(*o.cell) for o in out if o not in scene), cell_name(*t.cell))
    if mode == "fall":
        return (f"where will {_the(t)} be after it falls?", out,
                f"{_the(t)} drops from {cell_name(*t.cell)} to {landed}.")
    return (f"{_the(t)} rolls {direction} until it hits something", out,
            f"{_the(t)} rolls from {cell_name(*t.cell)} to {landed}.")


# --- generation: (rng, preset) -> (prompt, output scene, hint) | None ----------------------------------
def _generate(rng: random.Random, preset: ToyPreset) -> Built:
    if rng.random() < 0.5:
        return _generate_line(rng, preset)
    n = rng.randint(1, min(MAX_GENERATED_CHAIN, preset.max_objects))
    glyphs = set()
    while len(glyphs) < n:  # distinct looks, so every later object can name an earlier one
        glyphs.add(random_glyph(rng, preset))
    glyphs = sorted(glyphs)
    rng.shuffle(glyphs)
    first = ToyObject(rng.randrange(preset.grid), rng.randrange(preset.grid), *glyphs[0])
    objects, parts, steps = [first], [f"{_a(first.glyph)} at {cell_name(*first.cell)}"], []
    for glyph in glyphs[1:]:
        anchor, direction = rng.choice(objects), rng.choice(tuple(DIRECTIONS))
        cell = _step(anchor.cell, direction)
        if not in_grid(*cell, preset) or any(o.cell == cell for o in objects):
            return None
        objects.append(ToyObject(*cell, *glyph))
        parts.append(f"{_a(glyph)} {RELATION_WORDS[direction]} {_the(anchor)}")
        steps.append(f"{RELATION_WORDS[direction]} {cell_name(*anchor.cell)} is {cell_name(*cell)}")
    hint = f"{'; '.join(steps)}." if steps else f"one object, at {cell_name(*first.cell)}."
    return _join(parts), make_scene(objects), hint


def _generate_line(rng: random.Random, preset: ToyPreset) -> Built:
    """'three red circles in a row going right from a2' (or a column going down)."""
    k = rng.randint(2, min(preset.grid, preset.max_objects))
    glyph, start = random_glyph(rng, preset), rng.randrange(preset.grid - k + 1)
    other = rng.randrange(preset.grid)
    if rng.random() < 0.5:
        cells, line, way = [(other, start + i) for i in range(k)], "row", "right"
    else:
        cells, line, way = [(start + i, other) for i in range(k)], "column", "down"
    prompt = f"{NUMBER_WORDS[k]} {glyph_phrase(glyph)}s in a {line} going {way} from {cell_name(*cells[0])}"
    hint = f"cells {_join([cell_name(*c) for c in cells])}."
    return prompt, make_scene(ToyObject(*c, *glyph) for c in cells), hint


EDIT_BUILDERS = {"add": _add, "remove": _remove, "replace": _replace, "recolour": _recolour, "move": _move,
                 "swap": _swap, "counting": _counting, "relational": _relational, "attribute": _attribute,
                 "spatial": _spatial}


def sample_task(rng: random.Random, preset: ToyPreset, category: str) -> ToyTask | None:
    """One attempt at a task of this category; None when the draw was ambiguous or a no-op."""
    input_scene = None if category in GENERATION_CATEGORIES else random_scene(rng, preset)
    built = _generate(rng, preset) if input_scene is None else EDIT_BUILDERS[category](rng, preset, input_scene)
    if built is None:
        return None
    instruction, output_scene, hint = built
    if output_scene == input_scene or len(output_scene) > preset.max_objects:
        return None
    return make_task(preset, category, input_scene, instruction, output_scene, hint)


def sample_tasks(preset: ToyPreset, n: int, split: str, seed: int,
                 categories: str | tuple[str, ...] | list[str] | None = None) -> list[ToyTask]:
    """n distinct tasks of one split, categories in round-robin order; deterministic in (preset, split, seed).

    Args:
        preset: e.g. PRESETS["tiny"].
        n: number of tasks.
        split: "train", "val" or "test"; tasks whose key hashes to another split are rejected.
        seed: any int; the same arguments always give the same list.
        categories: subset of CATEGORIES (default: all of them).
    """
    categories = (categories,) if isinstance(categories, str) else tuple(categories or CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {CATEGORIES}")
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"split={split!r}; use one of {tuple(SPLIT_FRACTIONS)}")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(f"toy/{preset.name}/{split}/{seed}")
    tasks, seen = [], set()
    for _ in range(n * MAX_ATTEMPTS_PER_TASK):
        if len(tasks) == n:
            break
        task = sample_task(rng, preset, categories[len(tasks) % len(categories)])
        if task is not None and task.split == split and task.sample_id not in seen:
            seen.add(task.sample_id)
            tasks.append(task)
    if len(tasks) < n:
        raise RuntimeError(f"found only {len(tasks)} of n={n} distinct {split!r} tasks of {categories} in preset "
                           f"{preset.name!r}; ask for fewer tasks or allow more categories")
    return tasks
