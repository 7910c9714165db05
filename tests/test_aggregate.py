"""Aggregation: every source on small real files (broken ones too), quarantine, dedupe, resume, the flow."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tasks.aggregate.aggregate as agg
from storage.parquet import read_table
from tasks.aggregate.curate import CurateConfig, Rejected, normalise
from tasks.aggregate.sources import RawRecord, SourceSpec, read_source
from tests.s3server import s3_root, s3_server  # noqa: F401  (pytest fixtures)

CFG = dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0, near_duplicate_bits=2)


def _img(seed: int, w: int = 32, h: int = 32, fmt: str = "PNG") -> bytes:
    """Blocky random image (8 px blocks) encoded as PNG or JPEG."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (-(-h // 8), -(-w // 8), 3), dtype=np.uint8)
    arr = np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _jsonl_source(tmp_path):
    d = tmp_path / "jsonl"
    d.mkdir()
    files = {"a_in.png": _img(1), "a_out.png": _img(2), "b_out.png": _img(3), "tiny.png": _img(4, 8, 8),
             "wide.png": _img(5, 128, 16), "broken.png": b"not an image at all",
             "trunc.png": _img(6)[:60], "c_in.png": _img(7, 48, 40), "c_out.png": _img(8, 48, 40)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    lines = [
        {"input_image": "a_in.png", "instruction": "make it red", "output_image": "a_out.png", "trace": "red."},
        {"instruction": "a blue square", "output_image": "b_out.png"},                      # generation
        {"input_image": "c_in.png", "instruction": "move it", "output_image": "c_out.png"},  # resized
        {"input_image": "a_in.png", "instruction": "   ", "output_image": "a_out.png"},      # empty instruction
        {"input_image": "a_in.png", "output_image": "a_out.png"},                           # missing field
        {"input_image": "gone.png", "instruction": "x", "output_image": "a_out.png"},       # missing file
        {"instruction": "x", "output_image": "tiny.png"},                                   # tiny image
        {"instruction": "x", "output_image": "wide.png"},                                   # aspect ratio
        {"instruction": "x", "output_image": "broken.png"},                                 # undecodable
        {"instruction": "x", "output_image": "trunc.png"},                                  # truncated
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    (d / "manifest.jsonl").write_text(text)
    return {"type": "jsonl", "name": "folder", "path": str(d)}


def _parquet_source(tmp_path):
    # HF-style image structs for one column, raw bytes for the other; row 0 repeats the JSONL
    # sample exactly, row 1 is a JPEG re-encode of another JSONL sample (a near-duplicate)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(_img(3))).save(jpeg, format="JPEG", quality=90)
    tbl = pa.table({
        "source_img": [{"bytes": _img(1), "path": None}, None, {"bytes": _img(11), "path": None}],
        "target_img": [_img(2), jpeg.getvalue(), _img(12)],
        "edit_prompt": ["make it red", "a blue square", "turn it green"],
    })
    path = tmp_path / "edits.parquet"
    pq.write_table(tbl, path)
    return {"type": "parquet", "name": "hub", "path": str(path),
            "columns": {"input_image": "source_img", "output_image": "target_img", "instruction": "edit_prompt"}}


def _webdataset_source(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key, members in {"s1": {"input.jpg": _img(21, fmt="JPEG"), "output.jpg": _img(22, fmt="JPEG"),
                                    "input_text.txt": b"swap the two", "output_text.txt": b"swap them."},
                             "s2": {"output.jpg": _img(23, fmt="JPEG"), "input_text.txt": b""}}.items():
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"type": "webdataset", "name": "wds", "path": str(tmp_path)}


def _ingest(spec, root, dataset="d"):
    return agg.ingest_source.fn(spec, str(root), dataset, CFG)


def test_jsonl_source_quarantines_each_bad_record_with_its_reason(tmp_path):
    stats = _ingest(_jsonl_source(tmp_path), tmp_path / "lake")
    assert (stats["read"], stats["accepted"], stats["quarantined"]) == (11, 3, 8)
    q = read_table(str(tmp_path / "lake"), "quarantine").to_pylist()
    reasons = sorted(r["reason"] for r in q)
    assert reasons == sorted(["empty_instruction", "missing_field", "missing_file", "tiny_image",
                              "extreme_aspect_ratio", "undecodable_image", "truncated_image", "bad_json"])
    assert all(r["source"] == "folder" and r["source_ref"].startswith("manifest.jsonl:") for r in q)
    s = {r["instruction"]: r for r in read_table(str(tmp_path / "lake"), "samples").to_pylist()}
    assert s["a blue square"]["kind"] == "generate" and s["a blue square"]["input_image"] is None
    assert s["make it red"]["reference_trace"] == "red." and s["make it red"]["kind"] == "edit"
    assert (s["move it"]["output_width"], s["move it"]["output_height"]) == (32, 32)  # 48x40 squashed


def test_parquet_and_webdataset_sources_and_cross_source_duplicates(tmp_path):
    lake = tmp_path / "lake"
    _ingest(_jsonl_source(tmp_path), lake)
    pstats = _ingest(_parquet_source(tmp_path), lake)
    assert (pstats["read"], pstats["accepted"]) == (3, 1)
    q = {r["source_ref"]: r for r in read_table(str(lake), "quarantine").to_pylist() if r["source"] == "hub"}
    assert q["edits.parquet:0"]["reason"] == "duplicate"
    assert q["edits.parquet:1"]["reason"] == "near_duplicate"
    wstats = _ingest(_webdataset_source(tmp_path), lake)
    assert (wstats["read"], wstats["accepted"]) == (2, 1)
    wq = [r for r in read_table(str(lake), "quarantine").to_pylist() if r["source"] == "wds"]
    assert [r["reason"] for r in wq] == ["empty_instruction"]
    w = [r for r in read_table(str(lake), "samples").to_pylist() if r["source"] == "wds"][0]
    assert (w["instruction"], w["reference_trace"], w["kind"]) == ("swap the two", "swap them.", "edit")


def test_rerun_is_idempotent_and_crash_resumes_without_loss(tmp_path, monkeypatch):
    lake = tmp_path / "lake"
    spec = {"type": "toy", "name": "toy", "preset": "tiny", "n": 300, "seed": 3}
    expected = len(list(read_source(SourceSpec.from_dict(spec))))
    monkeypatch.setattr(agg, "CHUNK_ROWS", 50)
    real = agg.read_source

    def crashing(source):
        for i, rec in enumerate(real(source)):
            if i == 170:
                raise OSError("disk vanished")
            yield rec

    monkeypatch.setattr(agg, "read_source", crashing)
    with pytest.raises(OSError):
        _ingest(spec, lake)
    assert read_table(str(lake), "samples").num_rows == 150  # three committed chunks survive
    monkeypatch.setattr(agg, "read_source", real)
    stats = _ingest(spec, lake)
    assert stats["already_present"] == 150 and stats["accepted"] == expected - 150
    again = _ingest(spec, lake)
    assert again["accepted"] == 0
    ids = read_table(str(lake), "samples").column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == expected


def test_resize_policies():
    wide = _img(9, 64, 32)
    base = RawRecord("s", "r", "x", None, wide)
    for policy in ("squash", "center_crop"):
        row = normalise(base, CurateConfig(resolution=16, resize=policy, min_side=8))
        out = np.asarray(Image.open(io.BytesIO(row["output_image"])))
        assert out.shape == (16, 16, 3)
    crop = np.asarray(Image.open(io.BytesIO(normalise(base, CurateConfig(resolution=32, resize="center_crop")
                                                      )["output_image"])))
    assert np.array_equal(crop, np.asarray(Image.open(io.BytesIO(wide)))[:, 16:48])
    with pytest.raises(Rejected, match="missing_field"):
        normalise(RawRecord("s", "r", "x", None, None), CurateConfig())
    with pytest.raises(ValueError, match="resize='stretch'"):
        CurateConfig(resize="stretch")


def test_aggregate_flow_end_to_end(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.aggregate import aggregate

    sources = [{"type": "toy", "name": "toy", "preset": "tiny", "n": 200, "seed": 1}, _jsonl_source(tmp_path)]
    summary = aggregate(sources=sources, root=str(tmp_path / "lake"), dataset="mix")
    toy = summary["sources"][0]
    assert toy["accepted"] == toy["read"] >= 200 and summary["samples"] == toy["accepted"] + 3
    assert summary["quarantined"] == 8 and summary["quarantine_reasons"]["tiny_image"] == 1
    assert set(summary["by_split"]) == {"train", "val", "test"}
    assert summary["by_category"]["recolour"] > 0
    again = aggregate(sources=sources, root=str(tmp_path / "lake"), dataset="mix")
    assert again["samples"] == summary["samples"] and again["quarantined"] == summary["quarantined"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="aggregate-mix")))
    assert "aggregate-mix" in {a.key for a in arts}
    progress = [a for a in arts if (a.key or "").startswith("aggregate-mix-progress-")]  # one card per flow run
    assert len(progress) == 2 and len({a.key for a in progress}) == 2
    assert [float(a.data) for a in progress] == [100.0, 100.0]  # the re-run had nothing to do: 100%, not 0%
    assert any("nothing to do" in (a.description or "") for a in progress)


def test_ingest_to_s3_then_duckdb(tmp_path, s3_server, s3_root, monkeypatch):
    from storage.query import query

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    spec = {"type": "toy", "name": "toy", "preset": "tiny", "n": 60, "seed": 5}
    first = _ingest(spec, s3_root)
    assert first["accepted"] == first["read"] == 60
    assert _ingest(spec, s3_root)["already_present"] == 60
    rows = query(s3_root, "SELECT kind, count(*) AS n FROM samples GROUP BY kind ORDER BY kind").to_pylist()
    assert sum(r["n"] for r in rows) == 60 and {r["kind"] for r in rows} == {"edit", "generate"}


def test_flow_checks_sources_first_and_runs_past_a_failing_source(tmp_path, prefect_harness, monkeypatch):
    from flows.aggregate import aggregate

    toy = {"type": "toy", "name": "toy", "preset": "tiny", "n": 30, "seed": 2}
    with pytest.raises(ValueError, match="named more than once"):  # before anything is read
        aggregate(sources=[toy, toy], root=str(tmp_path / "lake"), dataset="twice")
    real = agg.read_source

    def failing(source):  # a reader bug: not retried, and the next source still runs
        if source.name == "folder":
            raise RuntimeError("bug in a reader")
        yield from real(source)

    monkeypatch.setattr(agg, "read_source", failing)
    with pytest.raises(RuntimeError, match="1 of 2 sources failed: folder: failed: RuntimeError: bug in a reader"):
        aggregate(sources=[_jsonl_source(tmp_path), toy], root=str(tmp_path / "lake"), dataset="partial")
    expected = len(list(real(SourceSpec.from_dict(toy))))
    assert read_table(str(tmp_path / "lake"), "samples", run="partial").num_rows == expected
    assert not (tmp_path / "lake" / "samples" / "run=twice").exists()
