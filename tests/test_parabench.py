"""Benchmark items: the pinned toy ParaBench, Parquet storage of a benchmark, the real ParaBench folder reader."""
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.parquet import SchemaError
from tasks.evaluate.parabench import (BENCHMARK_SCHEMA, PINNED_SEED, benchmark_uri, build_toy_parabench,
                                      item_content_id, read_benchmark, read_parabench, toy_parabench_fingerprint,
                                      write_benchmark)
from tasks.toy import EDIT_CATEGORIES, PRESETS, parse_description, parse_image
from tasks.toy.tasks import split_of

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how `datasets` stores an Image feature


@pytest.fixture(scope="module")
def toy():
    return build_toy_parabench()


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def _digest(items) -> str:
    """sha256 over every stored byte of the items (ids, texts, PNG bytes), for byte-identity checks."""
    h = hashlib.sha256()
    for it in items:
        for part in (it.item_id, it.kind, it.category, it.instruction, it.reference_text or "",
                     json.dumps(it.extra, sort_keys=True)):
            h.update(part.encode() + b"\x00")
        h.update((it.input_image or b"") + b"\x00" + (it.target_image or b"") + b"\x00")
    return h.hexdigest()


# --- toy ParaBench ------------------------------------------------------------------------------------
def test_toy_parabench_has_parabench_shape(toy):
    assert len(toy) == 300
    assert Counter(it.category for it in toy) == {**{c: 20 for c in EDIT_CATEGORIES}, "generate": 100}
    assert Counter(it.kind for it in toy) == {"edit": 200, "generate": 100}
    assert all((it.kind == "generate") == (it.category == "generate") for it in toy)
    assert len({it.item_id for it in toy}) == 300


def test_toy_items_are_held_out_and_match_their_scenes(toy):
    tiny = PRESETS["tiny"]
    for it in toy:
        inp = None if it.extra["input_scene"] is None else parse_description(it.extra["input_scene"], tiny)
        out = parse_description(it.extra["output_scene"], tiny)
        assert it.extra["preset"] == "tiny" and out is not None
        assert split_of("tiny", inp, out) == "test", it  # never in the train split of any toy run
        assert it.target_image.startswith(PNG_MAGIC) and parse_image(_pixels(it.target_image), tiny) == out
        if it.kind == "edit":
            assert it.input_image.startswith(PNG_MAGIC) and parse_image(_pixels(it.input_image), tiny) == inp
        else:
            assert it.input_image is None and inp is None
        assert it.reference_text.endswith(f"{it.extra['output_scene']}.")
        assert it.item_id == item_content_id(it.kind, it.category, it.instruction, it.input_image, it.target_image,
                                             it.reference_text)


def test_toy_build_is_deterministic_across_builds_and_processes(toy):
    again = build_toy_parabench()
    assert again == toy and _digest(again) == _digest(toy)
    assert toy_parabench_fingerprint(again) == toy_parabench_fingerprint(toy)
    code = ("import sys; sys.path.insert(0, 'tests'); from test_parabench import _digest; "
            "from tasks.evaluate.parabench import build_toy_parabench as b, toy_parabench_fingerprint as f; "
            "items = b(); print(_digest(items), f(items))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [_digest(toy), toy_parabench_fingerprint(toy)]


def test_fingerprint_sees_every_change(toy):
    base = toy_parabench_fingerprint(toy)
    swapped = toy[1:2] + toy[:1] + toy[2:]
    edited = [replace(toy[0], instruction=toy[0].instruction + "!")] + toy[1:]
    extra = [replace(toy[0], extra={**toy[0].extra, "preset": "x"})] + toy[1:]
    assert len({base, *map(toy_parabench_fingerprint, (swapped, edited, extra))}) == 4
    assert toy_parabench_fingerprint(build_toy_parabench(seed=PINNED_SEED + 1)) != base


# --- storage ----------------------------------------------------------------------------------------
def test_benchmark_round_trips_byte_identically(tmp_path, toy):
    uri = write_benchmark(str(tmp_path), "toy-parabench", toy)
    assert uri == str(tmp_path / "benchmarks" / "toy-parabench.parquet") and os.path.isfile(uri)
    back = read_benchmark(str(tmp_path), "toy-parabench")
    assert back == toy and _digest(back) == _digest(toy)
    meta = pq.read_schema(uri).metadata
    assert meta[b"parapipe.table"] == b"benchmarks" and meta[b"parapipe.fingerprint"].decode() == \
        toy_parabench_fingerprint(toy)
    first = Path(uri).read_bytes()
    write_benchmark(str(tmp_path), "toy-parabench", build_toy_parabench())  # same items: no-op
    assert Path(uri).read_bytes() == first


def test_benchmark_name_keeps_its_items(tmp_path, toy):
    write_benchmark(str(tmp_path), "bench", toy)
    with pytest.raises(ValueError, match="already holds other items.*overwrite=True"):
        write_benchmark(str(tmp_path), "bench", toy[:10])
    write_benchmark(str(tmp_path), "bench", toy[:10], overwrite=True)
    assert read_benchmark(str(tmp_path), "bench") == toy[:10]
    with pytest.raises(FileNotFoundError, match="write_benchmark"):
        read_benchmark(str(tmp_path), "missing")
    with pytest.raises(ValueError, match="share item_id"):
        write_benchmark(str(tmp_path), "dup", [toy[0], toy[0]])
    with pytest.raises(ValueError, match="not a valid file name"):
        benchmark_uri(str(tmp_path), "../escape")


def test_altered_benchmark_file_is_refused(tmp_path, toy):
    uri = write_benchmark(str(tmp_path), "bench", toy[:5])
    table = pq.read_table(uri)
    changed = table.set_column(3, "instruction", pa.array(["changed"] * 5, pa.string()))
    pq.write_table(changed.cast(table.schema), uri)  # keeps the stored metadata, fingerprint included
    with pytest.raises(SchemaError, match="altered"):
        read_benchmark(str(tmp_path), "bench")
    pq.write_table(table.replace_schema_metadata({}), uri)
    with pytest.raises(SchemaError, match="not a version-1 benchmark"):
        read_benchmark(str(tmp_path), "bench")


# --- real ParaBench ---------------------------------------------------------------------------------
def _encoded(colour, fmt="PNG", mode="RGB", size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _write_hf_folder(folder: Path, drop: str | None = None) -> None:
    """A ParaBench-like HF dataset folder: data/test-*.parquet with Image structs, plus a README."""
    (folder / "data").mkdir(parents=True)
    (folder / "images").mkdir()
    (folder / "images" / "room.png").write_bytes(_encoded((10, 20, 30)))
    (folder / "README.md").write_text("---\nconfigs: [{config_name: default, data_files: data/test-*}]\n---\n")
    rows = [
        {"instruction": "add a lamp", "category": "add", "input_image": {"bytes": _encoded("red", "JPEG"),
                                                                             "path": "0.jpg"}},
        {"instruction": "remove the cup", "category": "remove",
         "input_image": {"bytes": _encoded((0, 0, 255, 128), mode="RGBA"), "path": "1.png"}},
        {"instruction": "what the room looks like after ten years", "category": "temporal",
         "input_image": {"bytes": None, "path": "images/room.png"}},  # stored by path, relative to the folder
        {"instruction": "a fox reading under a tree", "category": "generation",
         "input_image": {"bytes": None, "path": None}},
        {"instruction": "a city of glass at dawn", "category": None, "input_image": None},
    ]
    schema = pa.schema([("instruction", pa.string()), ("category", pa.string()), ("input_image", HF_IMAGE)])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table.drop_columns([drop]) if drop else table, folder / "data" / "test-00000-of-00001.parquet")


def test_read_parabench_hf_layout(tmp_path):
    _write_hf_folder(tmp_path)
    items = read_parabench(str(tmp_path))
    assert [(it.kind, it.category) for it in items] == [("edit", "add"), ("edit", "remove"), ("edit", "temporal"),
                                                        ("generate", "generation"), ("generate", "generate")]
    for it in items[:3]:
        assert it.input_image.startswith(PNG_MAGIC) and _pixels(it.input_image).shape == (16, 24, 3)
    assert tuple(_pixels(items[2].input_image)[0, 0]) == (10, 20, 30)
    assert all(it.input_image is None and it.target_image is None for it in items[3:])
    assert items[0].extra == {"source": "tyfeld/ParaBench", "source_ref": "data/test-00000-of-00001.parquet:0"}
    assert len({it.item_id for it in items}) == 5 and read_parabench(str(tmp_path)) == items
    write_benchmark(str(tmp_path / "store"), "parabench", items)
    assert read_benchmark(str(tmp_path / "store"), "parabench") == items


def test_read_parabench_custom_columns_and_jsonl(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.webp").write_bytes(_encoded("green", "WEBP"))
    records = [{"q": "make the sky purple", "img": "imgs/a.webp", "edit_kind": "image_editing", "cat": "recolour",
                "uid": 7},
               {"q": "three cats on a sofa", "img": None, "edit_kind": "t2i", "cat": "scene", "uid": 8}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cols = {"instruction": "q", "input_image": "img", "kind": "edit_kind", "category": "cat", "source_id": "uid"}
    items = read_parabench(str(tmp_path), columns=cols)
    assert [(it.kind, it.category, it.instruction) for it in items] == [
        ("edit", "recolour", "make the sky purple"), ("generate", "scene", "three cats on a sofa")]
    assert items[0].input_image.startswith(PNG_MAGIC) and items[0].extra["source_id"] == "7"
    no_category = read_parabench(str(tmp_path), columns={**cols, "category": None})
    assert [it.category for it in no_category] == ["edit", "generate"]


def test_read_parabench_errors_name_the_folder_column_and_fix(tmp_path):
    _write_hf_folder(tmp_path / "a", drop="instruction")
    with pytest.raises(ValueError) as err:
        read_parabench(str(tmp_path / "a"))
    msg = str(err.value)
    assert str(tmp_path / "a") in msg and "'instruction'" in msg and "category" in msg  # lists the columns it has
    assert "columns={'instruction': '<their column>'}" in msg
    _write_hf_folder(tmp_path / "b")
    with pytest.raises(ValueError, match=r"no column for 'category' \(looked for \['topic'\]\)"):
        read_parabench(str(tmp_path / "b"), columns={"category": "topic"})
    with pytest.raises(ValueError, match="unknown fields"):
        read_parabench(str(tmp_path / "b"), columns={"prompt": "instruction"})
    with pytest.raises(FileNotFoundError, match="hf download tyfeld/ParaBench"):
        read_parabench(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        read_parabench(str(tmp_path / "empty"))
