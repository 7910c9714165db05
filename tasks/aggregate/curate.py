"""Normalise, validate and deduplicate raw records into samples-table rows (pure functions).

normalise(): text checks, decode (a fixed list of formats, a pixel cap checked before decoding), EXIF
orientation applied, 16-bit scaled to 8-bit, transparency composited on white, RGB, size and aspect
checks, resize (squash or centre-crop) to the target resolution, re-encode as PNG, content hash,
perceptual hash, category and split. A record that fails becomes a quarantine row with a
machine-readable reason and a detail naming the file; nothing is silently dropped.
deduplicate(): exact duplicates share a content hash (instruction + pixels); near-duplicates share
the instruction and differ by at most a few bits of a 64-bit difference hash per image.
"""
import hashlib
import io
import json
import warnings
from dataclasses import asdict, dataclass

from tasks.aggregate.source_io import Rejected, check_text, clean
from tasks.aggregate.sources import RawRecord

RESIZE_POLICIES = ("squash", "center_crop")
SPLITS = (("train", 0.90), ("val", 0.05), ("test", 0.05))
DHASH_SIDE = 8  # 8 x 8 = 64-bit difference hash per image
PHASH_BITS = 128  # input + output dHash
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # decoders tried; never EPS (ghostscript) and the like
EXIF_ORIENTATION = 0x0112
RAW_FIELD_CHARS = 2000  # longest text field copied into a quarantine row's raw_json
CATEGORY_KEYWORDS = (  # first match wins; checked in this order
    ("counting", ("as many", "how many", "count")), ("swap", ("swap",)), ("move", ("move", "shift")),
    ("recolour", ("recolour", "recolor", "colour", "color", "paint")), ("remove", ("remove", "delete", "erase")),
    ("replace", ("replace", "turn", "change", "into")), ("add", ("add", "insert", "put")),
    ("spatial", ("fall", "after", "will")),
)


@dataclass(frozen=True)
class CurateConfig:
    """Validation and normalisation rules of the aggregation flow."""

    resolution: int = 32
    """Side of the square target images, in pixels."""
    resize: str = "squash"
    """squash (resize, ignoring aspect; MMaDA-Parallel-M's choice) or center_crop (crop to square, then resize)."""
    min_side: int = 16
    """Images with a shorter side are quarantined as tiny_image."""
    max_aspect: float = 3.0
    """Images with long/short side above this are quarantined as extreme_aspect_ratio."""
    near_duplicate_bits: int = 4
    """Max Hamming distance (summed over input and output dHash) of near-duplicates; -1 turns it off."""
    max_pixels: int = 40_000_000
    """Images with more pixels (width x height, read from the header before decoding) are quarantined as
    too_many_pixels: a bound on memory and time per image (8K video frames fit)."""
    max_text_chars: int = 100_000
    """Instructions and traces longer than this are quarantined as text_too_long."""

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize={self.resize!r}; use one of {RESIZE_POLICIES}")
        if self.resolution < 1 or self.min_side < 1 or self.max_aspect < 1:
            raise ValueError(f"resolution={self.resolution}, min_side={self.min_side} and "
                             f"max_aspect={self.max_aspect} must be >= 1")
        if self.max_pixels < self.min_side ** 2 or self.max_text_chars < 1:
            raise ValueError(f"max_pixels={self.max_pixels} must be >= min_side**2 and "
                             f"max_text_chars={self.max_text_chars} >= 1")


def _raw_value(v):
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, str) and len(v) > RAW_FIELD_CHARS:
        return v[:RAW_FIELD_CHARS] + f"… ({len(v)} chars)"
    return v


def quarantine_row(rec: RawRecord, reason: str, detail: str) -> dict:
    raw = {k: _raw_value(v) for k, v in asdict(rec).items()}
    try:
        raw_json = json.dumps(raw, default=lambda v: clean(repr(v), 200))
    except (ValueError, RecursionError) as e:  # a cyclic or absurdly deep value
        raw_json = json.dumps({"unserialisable": clean(e)})
    return {"source": rec.source, "source_ref": clean(rec.ref, 10_000), "reason": reason, "detail": clean(detail),
            "raw_json": raw_json}


def _open_image(data: bytes, name: str, cfg: CurateConfig):
    """The PIL image of `data`, header only: refuses unknown formats and too many pixels before any decoding."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", f"{name}: {e}") from None
    except Image.UnidentifiedImageError:
        kind = "empty file" if not data else f"{len(data)} bytes starting {data[:8]!r}"
        raise Rejected("undecodable_image", f"{name}: not a {'/'.join(IMAGE_FORMATS)} image ({kind})") from None
    except Exception as e:  # PIL raises many types for corrupt headers
        raise Rejected("undecodable_image", f"{name}: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise Rejected("too_many_pixels", f"{name} is {w}x{h} = {w * h} pixels, above max_pixels={cfg.max_pixels}")
    return img


def _to_rgb(img):
    """8-bit RGB: 16-bit grey scaled (not clipped), transparency composited on white, other modes converted."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img).astype(np.float64) / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise Rejected("unsupported_image", "32-bit float images have no agreed range; save as 8- or 16-bit")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _upright(img):
    """Applies the EXIF orientation; an unreadable EXIF block leaves the pixels as stored."""
    from PIL import ImageOps

    try:
        if img.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return img  # upright already (most images): skip exif_transpose's copy
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _decode(data: bytes, name: str, cfg: CurateConfig):
    img = _open_image(data, name, cfg)
    try:
        img.load()
        img = _to_rgb(_upright(img))
    except Rejected as r:
        raise Rejected(r.reason, f"{name}: {r.detail}") from None
    except Exception as e:  # PIL raises many types for corrupt files
        reason = "truncated_image" if "truncat" in str(e).lower() else "undecodable_image"
        raise Rejected(reason, f"{name}: {type(e).__name__}: {e}") from None
    w, h = img.size
    if min(w, h) < cfg.min_side:
        raise Rejected("tiny_image", f"{name} is {w}x{h}, below min_side={cfg.min_side}")
    if max(w, h) / min(w, h) > cfg.max_aspect:
        raise Rejected("extreme_aspect_ratio", f"{name} is {w}x{h}, above max_aspect={cfg.max_aspect}")
    return img


def _resize(img, cfg: CurateConfig):
    return resize_image(img, (cfg.resolution, cfg.resolution), cfg.resize)


def resize_image(img, size: tuple[int, int], policy: str = "squash"):
    """A PIL image to size (H, W): squash (ignore aspect) or center_crop (crop to the target aspect first)."""
    from PIL import Image

    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy {policy!r}; choose one of {RESIZE_POLICIES}")
    H, W = size
    if policy == "center_crop":
        w, h = img.size
        cw, ch = (w, round(w * H / W)) if w * H <= h * W else (round(h * W / H), h)
        img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    if img.size != (W, H):
        img = img.resize((W, H), Image.Resampling.BICUBIC)
    return img


def dhash(img) -> int:
    """64-bit difference hash: is each pixel brighter than its right neighbour on a 9 x 8 grey thumbnail."""
    from PIL import Image

    g = img.convert("L").resize((DHASH_SIDE + 1, DHASH_SIDE), Image.Resampling.BILINEAR)
    px = g.tobytes()
    bits = 0
    for r in range(DHASH_SIDE):
        for c in range(DHASH_SIDE):
            row = r * (DHASH_SIDE + 1)
            bits = (bits << 1) | (px[row + c] > px[row + c + 1])
    return bits


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def guess_category(instruction: str, kind: str) -> str:
    if kind == "generate":
        return "generate"
    text = instruction.lower()
    return next((cat for cat, words in CATEGORY_KEYWORDS if any(w in text for w in words)), "other")


def split_for(sample_id: str) -> str:
    u = int(sample_id[:8], 16) / 16 ** 8
    total = 0.0
    for split, frac in SPLITS:
        total += frac
        if u < total:
            return split
    return SPLITS[-1][0]


def _text(value, what: str, cfg: CurateConfig) -> str | None:
    text = check_text(value, what)
    if text is not None and len(text) > cfg.max_text_chars:
        raise Rejected("text_too_long", f"{what} has {len(text)} characters, above max_text_chars={cfg.max_text_chars}")
    return text


def _name(rec: RawRecord, key: str) -> str:
    origin = rec.origins.get(key)
    return f"{key} {clean(origin, 200)}" if origin else key


def normalise(rec: RawRecord, cfg: CurateConfig) -> dict:
    """Raw record -> samples-table row. Raises Rejected with a quarantine reason."""
    if rec.error:
        reason, _, detail = rec.error.partition(": ")
        raise Rejected(reason, detail)
    raw_instruction = _text(rec.instruction, "instruction", cfg)
    trace, category = _text(rec.trace, "trace", cfg), _text(rec.category, "category", cfg)
    if raw_instruction is None:
        raise Rejected("missing_field", "instruction")
    if not raw_instruction.strip():
        raise Rejected("empty_instruction", repr(raw_instruction))
    if rec.output_image is None:
        raise Rejected("missing_field", "output_image")
    out = _resize(_decode(rec.output_image, _name(rec, "output_image"), cfg), cfg)
    inp = None if rec.input_image is None else _resize(_decode(rec.input_image, _name(rec, "input_image"), cfg), cfg)
    kind = "generate" if inp is None else "edit"
    instruction = " ".join(raw_instruction.split())
    digest = hashlib.sha256()
    for part in (kind, instruction.lower(), b"" if inp is None else inp.tobytes(), out.tobytes()):
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\x00")
    content_hash = digest.hexdigest()
    phash = f"{0 if inp is None else dhash(inp):016x}{dhash(out):016x}"
    sample_id = content_hash[:16]
    return {
        "sample_id": sample_id, "source": rec.source, "kind": kind,
        "category": category.strip() if category and category.strip() else guess_category(instruction, kind),
        "split": rec.split or split_for(sample_id), "instruction": instruction,
        "input_image": None if inp is None else _png(inp), "input_width": None if inp is None else inp.width,
        "input_height": None if inp is None else inp.height, "output_image": _png(out),
        "output_width": out.width, "output_height": out.height,
        "reference_trace": trace.strip() if trace is not None else None,
        "content_hash": content_hash, "phash": phash,
        "extra_json": json.dumps({"source_ref": rec.ref, **rec.extra}, default=str),
    }


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def _band_keys(row: dict, near_bits: int) -> list[tuple]:
    """near_bits + 1 bands of the 128-bit hash: rows within near_bits share at least one band exactly."""
    n = max(near_bits, 0) + 1
    width = -(-PHASH_BITS // n)
    value = int(row["phash"], 16)
    return [(row["instruction"].lower(), i, (value >> (i * width)) & ((1 << width) - 1)) for i in range(n)]


class Deduper:
    """Remembers kept rows; says whether a new row repeats one (exactly, or within near_bits)."""

    def __init__(self, near_bits: int = 4):
        self.near_bits = near_bits
        self.by_hash: dict[str, str] = {}  # content_hash -> sample_id
        self.bands: dict[tuple, list[dict]] = {}

    def check_add(self, row: dict, near: bool = True) -> tuple[str, str] | None:
        """(reason, kept sample_id) if row duplicates a kept row; otherwise keeps it and returns None.

        near=False checks exact duplicates only (sources with exact ground truth, like the toy world).
        """
        if row["content_hash"] in self.by_hash:
            return "duplicate", self.by_hash[row["content_hash"]]
        keys = _band_keys(row, self.near_bits)
        if near and self.near_bits >= 0:
            for k in keys:
                for kept in self.bands.get(k, []):
                    if _hamming(kept["phash"], row["phash"]) <= self.near_bits:
                        return "near_duplicate", kept["sample_id"]
        self.by_hash[row["content_hash"]] = row["sample_id"]
        slim = {"phash": row["phash"], "sample_id": row["sample_id"]}
        for k in keys:
            self.bands.setdefault(k, []).append(slim)
        return None


def deduplicate(rows: list[dict], near_bits: int = 4) -> tuple[list[dict], list[tuple[dict, str, str]]]:
    """Keeps the first of each exact or near-duplicate group, in input order.

    Returns (kept rows, [(row, reason, kept sample_id)] for the duplicates).
    """
    d = Deduper(near_bits)
    kept, dups = [], []
    for row in rows:
        hit = d.check_add(row)
        if hit is None:
            kept.append(row)
        else:
            dups.append((row, *hit))
    return kept, dups
