"""Pixels of the toy world: render a scene with PIL, parse an image back into the exact scene.

Every object is a glyph (shape x colour x size) drawn once with PIL into a cell-sized tile;
a scene is the background with tiles pasted into their cells. The parser matches each cell
against every tile (and the empty cell), so it inverts the renderer exactly. Also holds the
pure image-side scoring helper. Leaves out text (scene.py, teacher.py) and tokenization
(model/image_tokenizer.py).

Shapes: image arrays are uint8 (H, W, 3); cells are (cell_px, cell_px, 3).
"""
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from tasks.toy.scene import COLOUR_RGB, Scene, ToyObject, ToyPreset, make_scene

BACKGROUND_RGB = (245, 245, 240)
# Empty border around a glyph inside its cell, as a fraction of the cell side.
SIZE_MARGIN = {"": 1 / 8, "large": 1 / 8, "small": 1 / 4}


def _draw_glyph(shape: str, colour: str, size: str, cell_px: int) -> np.ndarray:
    """One object on an empty cell, (cell_px, cell_px, 3) uint8."""
    tile = Image.new("RGB", (cell_px, cell_px), BACKGROUND_RGB)
    draw = ImageDraw.Draw(tile)
    lo = round(cell_px * SIZE_MARGIN[size])
    hi = cell_px - 1 - lo
    mid = (cell_px - 1) / 2
    fill = COLOUR_RGB[colour]
    if shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=fill)
    elif shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=fill)
    elif shape == "triangle":
        draw.polygon([(lo, hi), (hi, hi), (mid, lo)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of square, circle, triangle, diamond")
    return np.asarray(tile, dtype=np.uint8)


@lru_cache(maxsize=8)
def glyph_tiles(preset: ToyPreset) -> tuple[tuple[tuple[str, str, str] | None, ...], np.ndarray]:
    """All cell looks of a preset: labels (None = empty cell, else a glyph) and tiles (T, c, c, 3)."""
    labels = [None] + [(s, c, z) for s in preset.shapes for c in preset.colours for z in preset.sizes]
    empty = np.full((preset.cell_px, preset.cell_px, 3), BACKGROUND_RGB, dtype=np.uint8)
    tiles = [empty] + [_draw_glyph(*g, preset.cell_px) for g in labels[1:]]
    stacked = np.stack(tiles)
    flat = stacked.reshape(len(tiles), -1)
    if len(np.unique(flat, axis=0)) != len(tiles):
        raise ValueError(f"preset {preset.name!r}: two glyphs render identically at cell_px={preset.cell_px}; "
                         f"use larger cells or fewer shapes")
    stacked.setflags(write=False)
    return tuple(labels), stacked


def render(scene: Scene, preset: ToyPreset) -> np.ndarray:
    """Scene -> image, uint8 (image_size, image_size, 3)."""
    labels, tiles = glyph_tiles(preset)
    index = {g: i for i, g in enumerate(labels)}
    c = preset.cell_px
    image = np.empty((preset.image_size, preset.image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    for o in scene:
        if o.glyph not in index:
            raise ValueError(f"object {o} is not drawable in preset {preset.name!r}; "
                             f"use its shapes {preset.shapes}, colours {preset.colours}, sizes {preset.sizes}")
        image[o.row * c:(o.row + 1) * c, o.col * c:(o.col + 1) * c] = tiles[index[o.glyph]]
    return image


def _cells(image: np.ndarray, preset: ToyPreset) -> np.ndarray:
    """(H, W, 3) -> (grid*grid, c*c*3) int16, cells in reading order."""
    g, c = preset.grid, preset.cell_px
    return image.reshape(g, c, g, c, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1).astype(np.int16)


def parse_image(image, preset: ToyPreset, tolerance: float = 0.0) -> Scene | None:
    """Image -> scene: each cell is the nearest glyph tile (mean absolute error per value).

    Args:
        image: array-like uint8 (H, W, 3), e.g. a numpy array or a CPU torch tensor.
        tolerance: largest accepted mean absolute error of a cell; 0 accepts only exact renders.
    Returns:
        The scene, or None if some cell is further than tolerance from every tile.
    """
    image = np.asarray(image)
    expected = (preset.image_size, preset.image_size, 3)
    if image.shape != expected or image.dtype != np.uint8:
        raise ValueError(f"parse_image expects uint8 {expected} for preset {preset.name!r}, "
                         f"got {image.dtype} {image.shape}; render with the same preset")
    labels, tiles = glyph_tiles(preset)
    cells = _cells(image, preset)
    flat_tiles = tiles.reshape(len(tiles), -1).astype(np.int16)
    err = np.abs(cells[:, None, :] - flat_tiles[None, :, :]).mean(axis=-1)  # (cells, tiles)
    best = err.argmin(axis=1)
    if (err[np.arange(len(best)), best] > tolerance).any():
        return None
    objects = []
    for i, t in enumerate(best):
        if labels[t] is not None:
            objects.append(ToyObject(i // preset.grid, i % preset.grid, *labels[t]))
    return make_scene(objects)


def images_match(image_a, image_b, preset: ToyPreset, tolerance: float = 0.0) -> bool:
    """Exact scene match: both images parse, to the same scene."""
    a = parse_image(image_a, preset, tolerance)
    return a is not None and a == parse_image(image_b, preset, tolerance)


def distinct_patches(images: np.ndarray, patch: int) -> int:
    """Number of distinct patch x patch tiles over uint8 images (N, H, W, 3)."""
    n, h, w, _ = images.shape
    tiles = images.reshape(n, h // patch, patch, w // patch, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    return len(np.unique(tiles.reshape(-1, patch * patch * 3), axis=0))
