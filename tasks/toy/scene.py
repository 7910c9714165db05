"""Objects, scenes and difficulty presets of the procedural toy world, and its canonical text.

Holds: ToyPreset and PRESETS, ToyObject, Scene (a tuple of objects in reading order), cell names,
random scenes, describe() / parse_description() (the exact "result" phrase that lets a reasoning
trace be checked against an image) and content hashes. Leaves out pixels (render.py), edit and
generation tasks (tasks.py) and reasoning traces (teacher.py).

Cells are named like spreadsheet cells: a column letter (a = leftmost) then a row number
(1 = top row), so "b3" is the second column of the third row.
"""
import hashlib
import random
from dataclasses import dataclass

# --- world vocabulary --------------------------------------------------------------------------
COLOUR_RGB = {
    "red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (235, 205, 30),
    "green": (40, 160, 60), "blue": (40, 80, 220), "purple": (140, 60, 190),
}
WARM_COLOURS = frozenset({"red", "orange", "yellow"})
COOL_COLOURS = frozenset({"green", "blue", "purple"})
SHAPES = ("square", "circle", "triangle", "diamond")
ROUND_SHAPES = frozenset({"circle"})
SIZES = ("", "small", "large")  # "" = the preset has no size attribute
EMPTY_SCENE_TEXT = "empty"
COLUMN_LETTERS = "abcdefghijklmnopqrstuvwxyz"
HASH_CHARS = 16  # hex characters kept of a sha256 content hash


@dataclass(frozen=True)
class ToyPreset:
    """Difficulty preset of the toy world: canvas, object grid, vocabulary and scene sizes."""

    name: str
    """Key in PRESETS; part of every content hash, so presets never share sample ids."""
    image_size: int
    """Side of the square canvas in pixels."""
    grid: int
    """Side of the object grid: objects sit in grid x grid cells."""
    token_px: int
    """Patch side of the image tokenizer; a cell spans (cell_px / token_px)^2 image tokens."""
    shapes: tuple[str, ...]
    """Shapes objects can take (a subset of SHAPES)."""
    colours: tuple[str, ...]
    """Colours objects can take (keys of COLOUR_RGB)."""
    sizes: tuple[str, ...] = ("",)
    """Object sizes; ("",) means no size attribute (size never appears in text)."""
    min_objects: int = 1
    """Fewest objects in a sampled input scene."""
    max_objects: int = 4
    """Most objects in any scene of a task (inputs and outputs)."""

    def __post_init__(self):
        if self.image_size % self.grid or self.cell_px % self.token_px:
            raise ValueError(f"preset {self.name!r}: image_size={self.image_size} must split into {self.grid} "
                             f"cells that are whole multiples of token_px={self.token_px}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError(f"preset {self.name!r}: need 1 <= min_objects={self.min_objects} <= "
                             f"max_objects={self.max_objects} <= {self.grid * self.grid} cells")
        if self.grid > len(COLUMN_LETTERS):
            raise ValueError(f"preset {self.name!r}: grid={self.grid} exceeds {len(COLUMN_LETTERS)} column letters")
        for field, values, known in (("shapes", self.shapes, SHAPES), ("colours", self.colours, tuple(COLOUR_RGB)),
                                     ("sizes", self.sizes, SIZES)):
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ValueError(f"preset {self.name!r}: {field}={values} must be a non-empty subset of {known}")
        if "" in self.sizes and len(self.sizes) > 1:
            raise ValueError(f"preset {self.name!r}: sizes={self.sizes} mixes '' (no size) with named sizes")

    @property
    def cell_px(self) -> int:
        """Side of one object cell in pixels."""
        return self.image_size // self.grid

    @property
    def tokens(self) -> int:
        """Side of the image-token grid (image_size / token_px)."""
        return self.image_size // self.token_px

    @property
    def n_glyphs(self) -> int:
        """Distinct object looks: shapes x colours x sizes."""
        return len(self.shapes) * len(self.colours) * len(self.sizes)


PRESETS = {
    "tiny": ToyPreset(name="tiny", image_size=32, grid=4, token_px=8, shapes=("square", "circle", "triangle"),
                      colours=("red", "yellow", "green", "blue"), min_objects=1, max_objects=4),
    "standard": ToyPreset(name="standard", image_size=64, grid=4, token_px=8,
                          shapes=("square", "circle", "triangle", "diamond"),
                          colours=("red", "orange", "yellow", "green", "blue", "purple"),
                          sizes=("small", "large"), min_objects=1, max_objects=6),
}


@dataclass(frozen=True, order=True)
class ToyObject:
    """One object; ordering is reading order (row, then column)."""

    row: int
    """Row of its cell, 0 = top."""
    col: int
    """Column of its cell, 0 = left."""
    shape: str
    """One of the preset's shapes."""
    colour: str
    """One of the preset's colours."""
    size: str = ""
    """One of the preset's sizes ('' when the preset has none)."""

    @property
    def glyph(self) -> tuple[str, str, str]:
        """What the object looks like, without where it is."""
        return (self.shape, self.colour, self.size)

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)


Scene = tuple[ToyObject, ...]
"""Objects in reading order, at most one per cell (build with make_scene)."""


def make_scene(objects) -> Scene:
    """Sorts objects into reading order; two objects may not share a cell."""
    scene = tuple(sorted(objects))
    cells = [o.cell for o in scene]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell in {describe(scene)!r}; give each object its own cell")
    return scene


def cell_name(row: int, col: int) -> str:
    return f"{COLUMN_LETTERS[col]}{row + 1}"


def parse_cell(name: str) -> tuple[int, int] | None:
    """'b3' -> (2, 1); None if the text is not a cell name."""
    if len(name) < 2 or name[0] not in COLUMN_LETTERS or not name[1:].isdigit() or int(name[1:]) < 1:
        return None
    return (int(name[1:]) - 1, COLUMN_LETTERS.index(name[0]))


def in_grid(row: int, col: int, preset: ToyPreset) -> bool:
    return 0 <= row < preset.grid and 0 <= col < preset.grid


def free_cells(scene: Scene, preset: ToyPreset) -> list[tuple[int, int]]:
    """Empty cells in reading order."""
    taken = {o.cell for o in scene}
    return [(r, c) for r in range(preset.grid) for c in range(preset.grid) if (r, c) not in taken]


def object_at(scene: Scene, row: int, col: int) -> ToyObject | None:
    return next((o for o in scene if o.cell == (row, col)), None)


def glyph_phrase(glyph: tuple[str, str, str]) -> str:
    """('circle', 'red', 'small') -> 'small red circle'."""
    shape, colour, size = glyph
    return f"{size} {colour} {shape}" if size else f"{colour} {shape}"


def describe(scene: Scene) -> str:
    """Canonical text of a scene: 'red circle a1, blue square c2' in reading order, or 'empty'."""
    if not scene:
        return EMPTY_SCENE_TEXT
    return ", ".join(f"{glyph_phrase(o.glyph)} {cell_name(o.row, o.col)}" for o in sorted(scene))


def _parse_item(words: list[str], preset: ToyPreset | None) -> ToyObject | None:
    shapes = preset.shapes if preset else SHAPES
    colours = preset.colours if preset else tuple(COLOUR_RGB)
    sizes = preset.sizes if preset else SIZES
    if len(words) not in (3, 4):
        return None
    size = words[0] if len(words) == 4 else ""
    colour, shape, cell = words[-3], words[-2], parse_cell(words[-1])
    if size not in sizes or colour not in colours or shape not in shapes or cell is None:
        return None
    if preset is not None and not in_grid(*cell, preset):
        return None
    return ToyObject(row=cell[0], col=cell[1], shape=shape, colour=colour, size=size)


def parse_description(text: str, preset: ToyPreset | None = None) -> Scene | None:
    """Inverse of describe(); None for anything describe() cannot have written.

    With a preset, also checks its shapes, colours, sizes and grid bounds.
    """
    text = text.strip().lower().rstrip(".").strip()
    if text == EMPTY_SCENE_TEXT:
        return ()
    objects = [_parse_item(item.split(), preset) for item in text.split(",")]
    if not objects or any(o is None for o in objects):
        return None
    try:
        return make_scene(objects)
    except ValueError:
        return None


def random_glyph(rng: random.Random, preset: ToyPreset) -> tuple[str, str, str]:
    return (rng.choice(preset.shapes), rng.choice(preset.colours), rng.choice(preset.sizes))


def random_scene(rng: random.Random, preset: ToyPreset, n_objects: int | None = None) -> Scene:
    """A scene of n_objects (default: uniform in [min_objects, max_objects]) in distinct random cells."""
    n = rng.randint(preset.min_objects, preset.max_objects) if n_objects is None else n_objects
    if not 0 <= n <= preset.grid * preset.grid:
        raise ValueError(f"n_objects={n} does not fit a {preset.grid}x{preset.grid} grid")
    cells = rng.sample([(r, c) for r in range(preset.grid) for c in range(preset.grid)], n)
    return make_scene(ToyObject(r, c, *random_glyph(rng, preset)) for r, c in cells)


def content_hash(*parts: str) -> str:
    """Stable short hash of text parts (independent of PYTHONHASHSEED)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:HASH_CHARS]
