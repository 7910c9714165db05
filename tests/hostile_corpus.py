"""A corpus of hostile and broken inputs mixed among good samples, in every file-based source format.

`build(tmp)` writes it under `tmp` and returns (sources, expected): `expected[(source, ref)]` is a `Case` saying
whether that record is accepted (reason None) or which quarantine reason it gets, and which text its detail must
name. `tmp/outside` holds files that only the one opted-in source (`jsonl-open`) may read; `forbidden` lists those
no source may open. Images are tiny (16-48 px) so the whole corpus ingests in seconds.
"""
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

MAX_FILE_BYTES = 256 << 10
MAX_LINE_BYTES = 64 << 10
COLUMNS = {"instruction": "prompt", "input_image": "src", "output_image": "tgt"}


@dataclass(frozen=True)
class Case:
    reason: str | None = None
    """Quarantine reason, or None for an accepted sample."""
    mention: str = ""
    """Text the quarantine detail must contain (the offending file or field)."""


def img(seed: int, w: int = 32, h: int = 32, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (-(-h // 8), -(-w // 8), 3), dtype=np.uint8)
    return encode(Image.fromarray(np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:h, :w]), fmt)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A small PNG whose header claims w x h pixels (a decompression bomb's header; its data is short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def special_images() -> dict[str, bytes]:
    """Images a user expects to be normalised rather than refused (checked by the test) and ones that must fail."""
    half = np.zeros((16, 32, 3), np.uint8)
    half[:, :16], half[:, 16:] = (255, 0, 0), (0, 0, 255)  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: top red, bottom blue
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.paste(0, (0, 0, 16, 32))
    la = np.zeros((32, 32, 2), np.uint8)
    la[:, :, 0], la[:, 16:, 1] = 30, 255  # left half fully transparent
    return {
        "grey16.png": encode(Image.fromarray(np.full((32, 32), 40000, np.uint16))),
        "exif.jpg": encode(Image.fromarray(half), "JPEG", exif=exif.tobytes(), quality=95),
        "cmyk.jpg": encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"),
        "palette.png": encode(pal, transparency=0),
        "la.png": encode(Image.fromarray(la, "LA")),
        "bilevel.png": encode(Image.fromarray(np.eye(32, dtype=bool))),
        "anim.gif": encode(Image.open(io.BytesIO(img(40))).convert("P"), "GIF"),
        "float.tif": encode(Image.fromarray(np.full((32, 32), 0.5, np.float32)), "TIFF"),
        "tiny.png": img(41, 8, 8), "wide.png": img(42, 128, 16), "trunc.png": img(43)[:60], "empty.png": b"",
        "notimage.png": b"hello, not an image",
        "eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n",
        "bomb.png": png_claiming(10_000, 10_000), "bigbomb.png": png_claiming(40_000, 40_000),
        "big.png": np.random.default_rng(0).bytes(MAX_FILE_BYTES + 1000),
    }


def _outside(tmp: Path) -> Path:
    out = tmp / "outside"
    out.mkdir()
    (out / "secret.png").write_bytes(img(90))
    (out / "shared.png").write_bytes(img(91))
    os.mkfifo(out / "pipe")
    pq.write_table(pa.table({"prompt": ["outside"], "src": pa.array([None], pa.binary()), "tgt": [img(92)]}),
                   out / "outside.parquet")
    (out / "outside.tar").write_bytes(_tar([("o1", {"input_text.txt": b"outside", "output.jpg": img(93)})]))
    return out


class _Corpus:
    def __init__(self):
        self.expected: dict[tuple[str, str], Case] = {}

    def add(self, source: str, ref: str, reason: str | None = None, mention: str = "") -> None:
        assert (source, ref) not in self.expected, (source, ref)
        self.expected[(source, ref)] = Case(reason, mention)


def _jsonl(tmp: Path, out: Path, c: _Corpus) -> dict:
    d = tmp / "jsonl"
    (d / "img").mkdir(parents=True)
    files = {"a_in.png": img(1), "a_out.png": img(2), "gen.png": img(3), "bom.png": img(4), "crlf.png": img(5),
             **special_images()}
    for name, data in files.items():
        (d / "img" / name).write_bytes(data)
    os.mkfifo(d / "img" / "pipe.png")
    (d / "img" / "adir.png").mkdir()
    os.symlink("a_out.png", d / "img" / "alias.png")
    os.symlink(out / "secret.png", d / "img" / "leak.png")
    edit = {"input_image": "img/a_in.png", "output_image": "img/a_out.png"}
    lines: list[tuple[bytes, str | None, str]] = [  # (raw line, reason or None, mention)
        (b"\xef\xbb\xbf" + json.dumps({"instruction": "bom first line", "output_image": "img/bom.png"}).encode(),
         None, ""),
        (json.dumps({**edit, "instruction": "make it red", "trace": "red."}).encode(), None, ""),
        (json.dumps({"instruction": "a generated scene", "output_image": "img/gen.png"}).encode(), None, ""),
        (json.dumps({"instruction": "crlf line", "output_image": "img/crlf.png"}).encode() + b"\r", None, ""),
        (b"", None, ""), (b"   \t", None, ""),  # blank lines are not records
    ]
    for name in ("grey16.png", "exif.jpg", "cmyk.jpg", "palette.png", "la.png", "bilevel.png", "alias.png"):
        lines.append((json.dumps({"instruction": f"normalise {name}", "output_image": f"img/{name}"}).encode(),
                      None, ""))
    lines.append((json.dumps({"instruction": "gif input", "input_image": "img/anim.gif",
                              "output_image": "img/a_out.png"}).encode(), None, ""))
    bad = [
        (b'{"instruction": "caf\xe9", "output_image": "img/gen.png"}', "bad_encoding", "not UTF-8"),
        (b'{"instruction": "\\ud800 lone", "output_image": "img/gen.png"}', "bad_text", "lone surrogate"),
        (b'{"instruction": "x", "output_image": "img/\\udc80.png"}', "bad_text", "output_image"),
        (b"[1, 2, 3]", "bad_json", "list"), (b'"just a string"', "bad_json", "str"), (b"null", "bad_json", "NoneType"),
        (b"{not json", "bad_json", "manifest.jsonl"), (b"[" * 30000 + b"]" * 30000, "bad_json", "recursion"),
        (b'{"instruction": ' + b"9" * 5000 + b"}", "bad_json", "digits"),
        (b'{"instruction": 5, "output_image": "img/gen.png"}', "bad_field", "instruction must be text"),
        (b'{"instruction": NaN, "output_image": "img/gen.png"}', "bad_field", "float"),
        (b'{"instruction": ["a"], "output_image": "img/gen.png"}', "bad_field", "list"),
        (b'{"instruction": "x", "output_image": 123}', "bad_field", "path string"),
        (b'{"instruction": "x", "output_image": ""}', "bad_field", "empty path"),
        (b'{"instruction": "x", "output_image": "img/a\\u0000.png"}', "bad_field", "NUL"),
        (b'{"instruction": "x", "output_image": "img/gen.png", "trace": {"a": 1}}', "bad_field", "trace"),
        (b'{"instruction": "x", "output_image": "img/gen.png", "category": 7}', "bad_field", "category"),
        (b'{"instruction": "   ", "output_image": "img/gen.png"}', "empty_instruction", ""),
        (b'{"output_image": "img/gen.png"}', "missing_field", "instruction"),
        (b'{"instruction": "x", "output_image": "img/pipe.png"}', "not_a_regular_file", "FIFO"),
        (b'{"instruction": "x", "output_image": "img/adir.png"}', "not_a_regular_file", "directory"),
        (b'{"instruction": "x", "output_image": "../outside/secret.png"}', "outside_root", "secret.png"),
        (json.dumps({"instruction": "x", "output_image": str(out / "secret.png")}).encode(), "outside_root",
         "secret.png"),
        (b'{"instruction": "x", "output_image": "img/leak.png"}', "outside_root", "leak.png"),
        (b'{"instruction": "x", "output_image": "/dev/zero"}', "outside_root", "/dev/zero"),
        (b'{"instruction": "x", "input_image": "img/gone.png", "output_image": "img/a_out.png"}', "missing_file",
         "gone.png"),
        (b'{"instruction": "x", "input_image": "img/trunc.png", "output_image": "img/a_out.png"}',
         "truncated_image", "trunc.png"),
        (b'{"instruction": "x", "output_image": "img/empty.png"}', "undecodable_image", "empty.png"),
        (b'{"instruction": "x", "output_image": "img/notimage.png"}', "undecodable_image", "notimage.png"),
        (b'{"instruction": "x", "output_image": "img/eps.png"}', "undecodable_image", "eps.png"),
        (b'{"instruction": "x", "output_image": "img/bomb.png"}', "too_many_pixels", "bomb.png"),
        (b'{"instruction": "x", "output_image": "img/bigbomb.png"}', "too_many_pixels", "bigbomb.png"),
        (b'{"instruction": "x", "output_image": "img/big.png"}', "file_too_large", "big.png"),
        (b'{"instruction": "x", "output_image": "img/float.tif"}', "unsupported_image", "float.tif"),
        (b'{"instruction": "x", "output_image": "img/tiny.png"}', "tiny_image", "tiny.png"),
        (b'{"instruction": "x", "output_image": "img/wide.png"}', "extreme_aspect_ratio", "wide.png"),
        (b'{"instruction": "x", "output_image": "img/gen.png", "pad": "' + b"p" * MAX_LINE_BYTES + b'"}',
         "line_too_long", "max_line_bytes"),
        (json.dumps({**edit, "instruction": "make it red", "trace": "red."}).encode(), "duplicate", "same as"),
    ]
    lines += bad
    for lineno, (raw, reason, mention) in enumerate(lines, 1):
        if raw.strip():
            c.add("jsonl", f"manifest.jsonl:{lineno}", reason, mention)
    (d / "manifest.jsonl").write_bytes(b"\n".join(raw for raw, _, _ in lines) + b"\n")
    return {"type": "jsonl", "name": "jsonl", "path": str(d), "max_file_bytes": MAX_FILE_BYTES,
            "max_line_bytes": MAX_LINE_BYTES}


def _jsonl_open(tmp: Path, out: Path, c: _Corpus) -> dict:
    d = tmp / "jsonl-open"
    d.mkdir()
    rows = [({"instruction": "shared absolute", "output_image": str(out / "shared.png")}, None, ""),
            ({"instruction": "shared dotdot", "output_image": "../outside/shared.png"}, None, ""),
            ({"instruction": "x", "output_image": "/dev/zero"}, "not_a_regular_file", "character device"),
            ({"instruction": "x", "output_image": str(out / "pipe")}, "not_a_regular_file", "FIFO")]
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _, _ in rows))
    for lineno, (_, reason, mention) in enumerate(rows, 1):
        c.add("jsonl-open", f"manifest.jsonl:{lineno}", reason, mention)
    return {"type": "jsonl", "name": "jsonl-open", "path": str(d), "allow_outside_root": True}


STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _edits_table(rows: list[tuple]) -> pa.Table:
    """rows of (prompt, src struct or None, tgt bytes or None)."""
    return pa.table({"prompt": pa.array([r[0] for r in rows], pa.string()),
                     "src": pa.array([r[1] for r in rows], STRUCT), "tgt": pa.array([r[2] for r in rows], pa.binary())})


def _invalid_utf8_column(values: list[bytes]) -> pa.Array:
    """A string column holding the given bytes unchecked (pyarrow validates nothing built from buffers)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


def _parquet(tmp: Path, out: Path, c: _Corpus) -> dict:
    d = tmp / "parquet"
    for sub in "abcdefghijkl":
        (d / sub).mkdir(parents=True)
    (d / "a" / "img").mkdir()
    (d / "a" / "img" / "in.png").write_bytes(img(51))
    os.mkfifo(d / "a" / "img" / "pipe.png")
    os.symlink(out / "secret.png", d / "a" / "img" / "leak.png")
    s = lambda data=None, path=None: {"bytes": data, "path": path}  # noqa: E731
    rows_a = [  # (prompt, src, tgt, reason, mention)
        ("pq edit", s(img(52)), img(53), None, ""),
        ("pq generation", None, img(54), None, ""),
        ("pq struct path", s(path="img/in.png"), img(55), None, ""),
        ("pq empty struct", s(), img(56), None, ""),
        ("x", s(path="../../outside/secret.png"), img(57), "outside_root", "secret.png"),
        ("x", s(path=str(out / "secret.png")), img(57), "outside_root", "secret.png"),
        ("x", s(path="img/leak.png"), img(57), "outside_root", "leak.png"),
        ("x", s(path="img/gone.png"), img(57), "missing_file", "gone.png"),
        ("x", s(path="img/pipe.png"), img(57), "not_a_regular_file", "FIFO"),
        ("x", s(img(58)[:60]), img(57), "truncated_image", "column 'src'"),
        ("x", None, b"\x00not an image", "undecodable_image", "column 'tgt'"),
        (None, None, img(57), "missing_field", "instruction"),
        ("x", None, None, "missing_field", "output_image"),
        ("y" * 100_001, None, img(57), "text_too_long", "max_text_chars"),
        ("pq edit", s(img(52)), img(53), "duplicate", "same as"),
    ]
    pq.write_table(_edits_table([r[:3] for r in rows_a]), d / "a" / "edits.parquet")
    for i, r in enumerate(rows_a):
        c.add("parquet", f"a/edits.parquet:{i}", r[3], r[4])
    pq.write_table(_edits_table([("pq b one", None, img(61)), ("pq b two", s(img(62)), img(63))]),
                   d / "b" / "edits.parquet")  # same basename as a/edits.parquet, same row numbers
    c.add("parquet", "b/edits.parquet:0")
    c.add("parquet", "b/edits.parquet:1")
    pq.write_table(pa.table({"prompt": pa.array([b"pq binary prompt", b"caf\xe9"], pa.binary()),
                             "src": pa.array([None, None], STRUCT), "tgt": [img(64), img(65)]}),
                   d / "c" / "binary.parquet")
    c.add("parquet", "c/binary.parquet:0")
    c.add("parquet", "c/binary.parquet:1", "bad_text", "not UTF-8")
    pq.write_table(pa.table({"prompt": [float("nan"), 1.5], "src": pa.array([None, None], STRUCT),
                             "tgt": [img(66), img(67)]}), d / "d" / "floats.parquet")
    c.add("parquet", "d/floats.parquet:0", "bad_field", "float nan")
    c.add("parquet", "d/floats.parquet:1", "bad_field", "float 1.5")
    pq.write_table(pa.table({"prompt": ["x"], "src": ["img/in.png"], "tgt": [img(68)]}), d / "e" / "strings.parquet")
    c.add("parquet", "e/strings.parquet:0", "bad_cell", "holds str")
    pq.write_table(pa.table({"prompt": _invalid_utf8_column([b"pq valid text", b"\xff\xfe bad"]),
                             "src": pa.array([None, None], STRUCT), "tgt": [img(69), img(70)]}),
                   d / "f" / "utf8.parquet")
    c.add("parquet", "f/utf8.parquet:0")
    c.add("parquet", "f/utf8.parquet:1", "bad_cell", "UnicodeDecodeError")
    (d / "g" / "corrupt.parquet").write_bytes(np.random.default_rng(1).bytes(3000))
    c.add("parquet", "g/corrupt.parquet", "bad_file", "g/corrupt.parquet")
    pq.write_table(pa.table({"text": ["x"], "tgt": [img(71)]}), d / "h" / "nocolumns.parquet")
    c.add("parquet", "h/nocolumns.parquet", "missing_column", "prompt")
    (d / "i" / "empty.parquet").write_bytes(b"")
    c.add("parquet", "i/empty.parquet", "bad_file", "i/empty.parquet")
    whole = io.BytesIO()
    pq.write_table(_edits_table([("cut", None, img(72))]), whole)
    (d / "j" / "cut.parquet").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    c.add("parquet", "j/cut.parquet", "bad_file", "j/cut.parquet")
    os.symlink(out / "outside.parquet", d / "k" / "link.parquet")
    c.add("parquet", "k/link.parquet", "outside_root", "outside.parquet")
    os.mkfifo(d / "l" / "fifo.parquet")
    c.add("parquet", "l/fifo.parquet", "not_a_regular_file", "FIFO")
    return {"type": "parquet", "name": "parquet", "path": str(d), "columns": COLUMNS}


def _tar(groups: list[tuple[str, dict]], links: dict[str, str] | None = None) -> bytes:
    """A tar of `key.field` members in the given order; links: {member name: target} added as symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in groups:
            for field_name, data in members.items():
                name = f"{key}.{field_name.split('#')[0]}"
                if name in (links or {}):
                    info = tarfile.TarInfo(name)
                    info.type, info.linkname = tarfile.SYMTYPE, links[name]
                    tar.addfile(info)
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _member_count(groups: list[tuple[str, dict]]) -> int:
    return sum(len(m) for _, m in groups)


def _webdataset(tmp: Path, out: Path, c: _Corpus) -> dict:
    d = tmp / "wds"
    for sub in "abcdefghi":
        (d / sub).mkdir(parents=True)
    jpg = lambda seed: img(seed, fmt="JPEG")  # noqa: E731
    gif = special_images()["anim.gif"]
    groups = [  # (key, members, reason, mention); a '#n' suffix repeats a field name
        ("s1", {"input.jpg": jpg(1), "output.jpg": jpg(2), "input_text.txt": b"wds edit",
                "output_text.txt": b"edited."}, None, ""),
        ("s2", {"output.jpg": jpg(3), "input_text.txt": b"wds generation"}, None, ""),
        ("s3", {"input.gif": gif, "output.jpg": jpg(4), "input_text.txt": b"wds gif input"}, None, ""),
        ("s4", {"output.jpg": jpg(5), "input_text.txt": b"caf\xe9"}, "bad_text", "not UTF-8"),
        ("s5", {"input.jpg": b"", "output.jpg": jpg(6), "input_text.txt": b"x"}, "bad_member", "symlink"),
        ("s6", {"output.jpg": jpg(7), "output.jpg#2": jpg(8), "input_text.txt": b"x"}, "duplicate_member",
         "s6.output.jpg"),
        ("s7", {"input.jpg": jpg(9), "input.png": img(10), "output.jpg": jpg(11), "input_text.txt": b"x"},
         "ambiguous_member", "input"),
        ("s8", {"output.png": b"GIF89a but not really", "input_text.txt": b"x"}, "undecodable_image", "s8.output.png"),
        ("s9", {"output.png": special_images()["big.png"], "input_text.txt": b"x"}, "file_too_large", "s9.output.png"),
        ("s10", {"output.jpg": jpg(12), "input_text.txt": b"\xef\xbb\xbfwds bom text"}, None, ""),
        ("sub/s1", {"output.jpg": jpg(13), "input_text.txt": b"wds sub folder"}, None, ""),
        ("notes", {"txt": b"stray file"}, "missing_field", "instruction"),
        ("s11", {"input.jpg": jpg(14), "input_text.txt": b"x"}, "missing_field", "output_image"),
        ("s12", {"output.jpg": jpg(15), "input_text.txt": b"  \n"}, "empty_instruction", ""),
        ("s13", {"output.jpg": jpg(16), "input_text.txt": b"\xed\xa0\x80 surrogate"}, "bad_text", "not UTF-8"),
    ]
    again = ("s1", {"output.jpg": jpg(17), "input_text.txt": b"x"})
    (d / "a" / "shard.tar").write_bytes(_tar([g[:2] for g in groups] + [again], links={"s5.input.jpg": "s1.input.jpg"}))
    for key, _, reason, mention in groups:
        c.add("wds", f"a/shard.tar:{key}", reason, mention)
    c.add("wds", f"a/shard.tar:s1#{_member_count([g[:2] for g in groups])}", "duplicate_key", "adjacent")
    (d / "b" / "shard.tar").write_bytes(_tar([("s1", {"output.jpg": jpg(21), "input_text.txt": b"wds b one"}),
                                              ("s2", {"output.jpg": jpg(22), "input_text.txt": b"wds b two"})]))
    c.add("wds", "b/shard.tar:s1")
    c.add("wds", "b/shard.tar:s2")
    def three(seed: int) -> list[tuple[str, dict]]:  # three good edits, distinct per tar
        return [(f"g{i}", {"input_text.txt": f"wds {seed} {i}".encode(), "input.jpg": jpg(seed + i),
                           "output.jpg": jpg(seed + 10 + i)}) for i in range(3)]
    whole = _tar(three(100))
    (d / "c" / "cut.tar").write_bytes(whole[:_header_offset(whole, "g2.output.jpg") + 512 + len(jpg(112)) // 2])
    c.add("wds", "c/cut.tar:g0")
    c.add("wds", "c/cut.tar:g1")
    c.add("wds", "c/cut.tar:g2", "bad_tar", "c/cut.tar")
    (d / "d" / "notatar.tar").write_bytes(np.random.default_rng(2).bytes(5000))
    c.add("wds", "d/notatar.tar", "bad_tar", "d/notatar.tar")
    (d / "e" / "empty.tar").write_bytes(b"")
    c.add("wds", "e/empty.tar", "bad_tar", "e/empty.tar")
    (d / "e" / "gzip.tar").write_bytes(_gzip(_tar([("z", {"output.jpg": jpg(24), "input_text.txt": b"x"})])))
    c.add("wds", "e/gzip.tar", "bad_tar", "uncompressed")  # a gzip bomb would stall the reader: not read
    os.symlink(out / "outside.tar", d / "f" / "link.tar")
    c.add("wds", "f/link.tar", "outside_root", "outside.tar")
    os.mkfifo(d / "g" / "fifo.tar")
    c.add("wds", "g/fifo.tar", "not_a_regular_file", "FIFO")
    bad_header = bytearray(_tar(three(200)))
    at = _header_offset(bytes(bad_header), "g2.input_text.txt") + 148
    bad_header[at:at + 8] = b"99999999"  # the header checksum
    (d / "h" / "badheader.tar").write_bytes(bytes(bad_header))
    c.add("wds", "h/badheader.tar:g0")
    c.add("wds", "h/badheader.tar:g1", "bad_tar", "end-of-archive")  # tarfile stops quietly before g2
    boundary = _tar(three(300)[:2])
    (d / "i" / "boundary.tar").write_bytes(boundary[:_header_offset(boundary, "g1.input.jpg")])  # g1 loses its input
    c.add("wds", "i/boundary.tar:g0")
    c.add("wds", "i/boundary.tar:g1", "bad_tar", "end-of-archive")
    return {"type": "webdataset", "name": "wds", "path": str(d), "max_file_bytes": MAX_FILE_BYTES}


def _header_offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return next(m.offset for m in tar if m.name == name)


def build(tmp: Path) -> tuple[list[dict], dict[tuple[str, str], Case], list[str]]:
    """Writes the corpus; returns (sources, expected outcome per (source, ref), paths no source may open)."""
    out, c = _outside(tmp), _Corpus()
    (tmp / "jsonl-empty").mkdir()
    (tmp / "jsonl-empty" / "manifest.jsonl").write_bytes(b"\xef\xbb\xbf\n\n")  # a BOM and blank lines: no records
    sources = [_jsonl(tmp, out, c), _jsonl_open(tmp, out, c), _parquet(tmp, out, c), _webdataset(tmp, out, c),
               {"type": "jsonl", "name": "jsonl-empty", "path": str(tmp / "jsonl-empty")}]
    forbidden = [str(out / n) for n in ("secret.png", "pipe", "outside.parquet", "outside.tar")] + ["/dev/zero"]
    return sources, c.expected, forbidden
