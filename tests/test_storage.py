"""storage/ on local disk: schemas, atomic idempotent run-partitioned Parquet writes, validation errors, fs helpers."""
import datetime as dt
import io
import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from storage import fs, parquet
from storage.parquet import SchemaError, read_table, write_rows
from storage.schema import CHOICES, KEYS, TABLES, VERSIONS, schema_version

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def png(w: int, h: int, color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _value(table: str, field: pa.Field, i: int):
    """A deterministic value of the field's type for row i; nullable fields are null on odd rows."""
    if field.nullable and i % 2:
        return None
    t = field.type
    if (table, field.name) in CHOICES:
        choices = CHOICES[(table, field.name)]
        return choices[i % len(choices)]
    if pa.types.is_string(t):
        return f"{field.name}-{i}"
    if pa.types.is_integer(t):
        return 10 * i + 1
    if pa.types.is_floating(t):
        return i + 0.5
    if pa.types.is_binary(t):
        return png(i + 1, i + 2)
    if pa.types.is_boolean(t):
        return i % 4 == 0
    if pa.types.is_timestamp(t):
        return T0 + dt.timedelta(seconds=i)
    if pa.types.is_list(t):
        return [i, i + 1, i + 2]
    raise AssertionError(f"no test value for {table}.{field.name}: {t}")


def make_rows(table: str, n: int) -> list[dict]:
    return [{f.name: _value(table, f, i) for f in TABLES[table]} for i in range(n)]


def sample(i: int, source: str = "src", split: str = "train") -> dict:
    return dict(sample_id=f"s{i:03d}", source=source, kind="generate", split=split, instruction=f"draw {i}",
                output_image=png(8, 6), output_width=8, output_height=6, content_hash=f"h{i}")


def test_every_table_is_versioned_with_keys_and_choices_in_schema():
    assert set(TABLES) == set(VERSIONS) == set(KEYS) == {
        "samples", "quarantine", "traces", "train_metrics", "trajectories", "rewards", "rl_metrics", "eval_results",
        "eval_outputs", "eval_judgments", "runs"}
    for name, schema in TABLES.items():
        assert schema_version(schema) == VERSIONS[name] == (2 if name in ("traces", "trajectories", "rewards") else 1)
        assert schema.metadata[b"parapipe.table"] == name.encode()
        assert all(k in schema.names for k in KEYS[name]), name
        assert all(not schema.field(k).nullable for k in KEYS[name]), name
    assert all(col in TABLES[t].names for t, col in CHOICES)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_round_trip_every_table(tmp_path, table):
    rows = make_rows(table, 4)
    res = write_rows(str(tmp_path), table, rows, run="r1")
    assert (res.written, res.skipped) == (4, 0)
    got = read_table(str(tmp_path), table)
    assert got.schema == parquet.read_schema(table)
    assert got.column("run").to_pylist() == ["r1"] * 4
    assert got.drop_columns(["run"]).to_pylist() == rows
    assert schema_version(got.schema) == VERSIONS[table]


def test_sample_images_are_png_bytes_with_their_size(tmp_path):
    edit = dict(sample(0), kind="edit", input_image=png(5, 7, (0, 0, 255)), input_width=5, input_height=7)
    write_rows(str(tmp_path), "samples", [edit, sample(1)], run="r1")
    got = read_table(str(tmp_path), "samples").to_pylist()
    img = Image.open(io.BytesIO(got[0]["input_image"]))
    assert (img.format, img.size, img.getpixel((0, 0))) == ("PNG", (5, 7), (0, 0, 255))
    assert Image.open(io.BytesIO(got[1]["output_image"])).size == (got[1]["output_width"], got[1]["output_height"])
    assert (got[1]["input_image"], got[1]["input_width"]) == (None, None)


def test_layout_and_partitioning_by_run(tmp_path):
    root = str(tmp_path)
    write_rows(root, "samples", [sample(i) for i in range(3)], run="a")
    write_rows(root, "samples", [sample(i, split="val") for i in range(2)], run="b")  # same ids, other run: kept
    assert sorted(os.listdir(tmp_path / "samples")) == ["run=a", "run=b"]
    assert sorted(os.listdir(tmp_path / "samples" / "run=a")) == ["_manifest.json", "shard-00000.parquet"]
    manifest = json.loads((tmp_path / "samples" / "run=a" / "_manifest.json").read_text())
    assert (manifest["table"], manifest["run"], manifest["schema_version"], manifest["rows"]) == ("samples", "a", 1, 3)
    assert manifest["shards"] == [{"file": "shard-00000.parquet", "rows": 3}]
    assert parquet.list_runs(root, "samples") == ["a", "b"]
    assert read_table(root, "samples", run="a").num_rows == 3
    assert read_table(root, "samples", run="b").column("split").to_pylist() == ["val", "val"]
    assert read_table(root, "samples").num_rows == 5
    assert read_table(root, "samples", filter=pc.field("run") == "b").num_rows == 2
    assert read_table(root, "samples", columns=["sample_id"]).column_names == ["sample_id"]
    assert read_table(root, "quarantine").num_rows == 0  # never written: empty, typed
    assert read_table(root, "quarantine").schema == parquet.read_schema("quarantine")


def test_same_rows_twice_are_stored_once(tmp_path):
    root = str(tmp_path)
    first = write_rows(root, "samples", [sample(i) for i in range(3)], run="r")
    again = write_rows(root, "samples", [sample(i) for i in range(3)], run="r")
    overlap = write_rows(root, "samples", [sample(i) for i in range(1, 6)] + [sample(5)], run="r")
    assert (first.written, first.skipped, len(first.shards)) == (3, 0, 1)
    assert (again.written, again.skipped, again.shards) == (0, 3, ())
    assert (overlap.written, overlap.skipped) == (3, 3)
    ids = read_table(root, "samples").column("sample_id").to_pylist()
    assert sorted(ids) == [f"s{i:03d}" for i in range(6)]
    assert sorted(os.listdir(tmp_path / "samples" / "run=r")) == [
        "_manifest.json", "shard-00000.parquet", "shard-00001.parquet"]


def test_composite_and_explicit_keys(tmp_path):
    root = str(tmp_path)
    trace = make_rows("traces", 1)[0]
    other_gen = dict(trace, generator="g2")
    assert write_rows(root, "traces", [trace, other_gen, trace], run="r").written == 2  # key (sample_id, generator, attempt)
    assert write_rows(root, "traces", [dict(trace, generator="g3")], run="r", key="sample_id").written == 0
    with pytest.raises(ValueError, match=r"key column\(s\) \['nope'\] are not in table 'traces'"):
        write_rows(root, "traces", [trace], run="r", key="nope")


def test_rows_per_shard_commits_all_shards_in_one_manifest(tmp_path):
    res = write_rows(str(tmp_path), "samples", [sample(i) for i in range(25)], run="r", rows_per_shard=10)
    assert [os.path.basename(s) for s in res.shards] == [f"shard-0000{i}.parquet" for i in range(3)]
    manifest = parquet.read_manifest(str(tmp_path), "samples", "r")
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["rows"] == 25


def test_crash_before_manifest_hides_shard_and_resume_neither_duplicates_nor_loses(tmp_path, monkeypatch):
    root = str(tmp_path)
    write_rows(root, "samples", [sample(i) for i in range(5)], run="r")

    def crash(*args, **kwargs):
        raise RuntimeError("killed before commit")

    monkeypatch.setattr(parquet, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="killed before commit"):
        write_rows(root, "samples", [sample(i) for i in range(3, 10)], run="r")
    monkeypatch.undo()
    part = tmp_path / "samples" / "run=r"
    assert sorted(os.listdir(part)) == ["_manifest.json", "shard-00000.parquet", "shard-00001.parquet"]
    assert read_table(root, "samples").num_rows == 5  # the orphan shard is invisible

    res = write_rows(root, "samples", [sample(i) for i in range(3, 10)], run="r")
    assert (res.written, res.skipped) == (5, 2)
    ids = read_table(root, "samples").column("sample_id").to_pylist()
    assert sorted(ids) == [f"s{i:03d}" for i in range(10)]
    assert [s["file"] for s in parquet.read_manifest(root, "samples", "r")["shards"]] == [
        "shard-00000.parquet", "shard-00001.parquet"]


def test_torn_shard_file_is_ignored_then_overwritten(tmp_path):
    root = str(tmp_path)
    write_rows(root, "samples", [sample(0)], run="r")
    part = tmp_path / "samples" / "run=r"
    (part / "shard-00001.parquet").write_bytes(b"PAR1 half a file")
    (part / ".shard-00001.parquet.tmp-0123456789ab").write_bytes(b"partial")
    assert read_table(root, "samples").num_rows == 1
    assert write_rows(root, "samples", [sample(1)], run="r").written == 1
    assert sorted(read_table(root, "samples").column("sample_id").to_pylist()) == ["s000", "s001"]


@pytest.mark.parametrize("change, message", [
    ({"sample_idd": "x"}, r"samples: unknown column\(s\) \['sample_idd'\]; the schema has"),
    ({"input_width": "wide"}, r"samples\.input_width: cannot store values as int32: .*; pass int32 values"),
    ({"output_width": 4.5}, r"samples\.output_width: got float 4\.5 for an int32 column; pass whole numbers"),
    ({"output_image": None}, r"samples\.output_image: 1 null value\(s\) \(first at row 1\) in a required column; "
                             r"fill in output_image or drop those rows"),
    ({"kind": "inpaint"}, r"samples\.kind: values \['inpaint'\] are not allowed; use one of \['edit', 'generate'\]"),
])
def test_schema_violation_names_column_and_fix(tmp_path, change, message):
    rows = [sample(0), dict(sample(1), **change)]
    with pytest.raises(SchemaError, match=message):
        write_rows(str(tmp_path), "samples", rows, run="r")
    assert not (tmp_path / "samples").exists()  # nothing written


def test_arrow_input_is_cast_filled_and_checked(tmp_path):
    tbl = pa.Table.from_pylist([sample(0), sample(1)]).drop_columns(["content_hash"])
    with pytest.raises(SchemaError, match=r"samples\.content_hash: 2 null value\(s\) \(first at row 0\)"):
        write_rows(str(tmp_path), "samples", tbl, run="r")
    ok = tbl.append_column("content_hash", pa.array(["a", "b"]))  # int64 widths cast to int32; missing optionals null
    assert write_rows(str(tmp_path), "samples", ok, run="r").written == 2
    assert read_table(str(tmp_path), "samples").column("phash").to_pylist() == [None, None]
    bad = ok.set_column(ok.schema.get_field_index("output_width"), "output_width", pa.array(["8", "x"]))
    with pytest.raises(SchemaError, match=r"samples\.output_width: column of type string does not cast safely"):
        write_rows(str(tmp_path), "samples", bad, run="r")


def test_read_output_and_non_rows_are_refused_with_the_fix(tmp_path):
    write_rows(str(tmp_path), "samples", [sample(0)], run="r")
    with pytest.raises(SchemaError, match=r"'run' is added by read_table, drop it before writing"):
        write_rows(str(tmp_path / "copy"), "samples", read_table(str(tmp_path), "samples"), run="r")
    with pytest.raises(TypeError, match=r"rows must be a list of dicts .*, got a list holding a str; convert first"):
        write_rows(str(tmp_path), "samples", ["s1"], run="r")
    with pytest.raises(TypeError, match=r"rows must be a list of dicts .*, got dict; convert first"):
        write_rows(str(tmp_path), "samples", sample(1), run="r")


def test_bad_names_and_versions_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"run 'a/b' is not a valid partition name; use letters, digits"):
        write_rows(str(tmp_path), "samples", [sample(0)], run="a/b")
    with pytest.raises(ValueError, match=r"unknown table 'sample'; expected one of \['eval_judgments'"):
        read_table(str(tmp_path), "sample")
    write_rows(str(tmp_path), "samples", [sample(0)], run="r")
    path = tmp_path / "samples" / "run=r" / "_manifest.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), schema_version=99)))
    with pytest.raises(SchemaError, match=r"samples schema version 99, but this code expects version 1"):
        read_table(str(tmp_path), "samples")


def test_local_fs_helpers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = fs.resolve("a/b.json")
    assert path == str(tmp_path / "a" / "b.json")
    fs.write_json("a/b.json", {"x": [1, 2]})
    fs.write_bytes("a/c.bin", b"\x00\x01")
    assert fs.read_json("a/b.json") == {"x": [1, 2]}
    assert fs.read_bytes("a/c.bin") == b"\x00\x01"
    assert fs.list_dir("a") == [("b.json", False), ("c.bin", False)]  # no temp files left behind
    assert fs.list_dir("missing") == []
    fs.delete("a/c.bin")
    fs.delete("a/c.bin")
    assert (fs.exists("a/c.bin"), fs.exists("a/b.json")) == (False, True)
    assert fs.join("s3://b/p/", "t", "run=x") == "s3://b/p/t/run=x"
    with pytest.raises(ValueError, match=r"S3 URI 's3://' has no bucket"):
        fs.resolve("s3://")
    with pytest.raises(ValueError, match=r"unsupported URI scheme in 'gs://b/x'"):
        fs.resolve("gs://b/x")
    with pytest.raises(ValueError, match="set both access_key and secret_key"):
        fs.S3Config(access_key="k")


def test_runs_rows_one_per_invocation_with_the_error_of_a_failed_one(tmp_path, capsys):
    from tasks.common.runs import recorded

    root = str(tmp_path / "lake")
    for _ in range(2):  # the same run twice (a resume): two rows, each in a partition of its own
        with recorded(root, "r1", "sft", {"lr": 0.1}) as timings:
            timings["fit_s"] = 1.5
    with pytest.raises(ZeroDivisionError):
        with recorded(root, "r1", "sft", {"lr": 0.1}):
            1 / 0
    rows = sorted(read_table(root, "runs").to_pylist(), key=lambda r: r["start_time"])
    assert [r["run_id"] for r in rows] == ["r1"] * 3 and len({r["run"] for r in rows}) == 3
    done = [json.loads(r["timings_json"]) for r in rows]
    assert [t.get("fit_s") for t in done] == [1.5, 1.5, None] and all(t["seconds"] >= 0 for t in done)
    assert done[2]["error"] == "ZeroDivisionError: division by zero" and json.loads(rows[2]["config_json"]) == {"lr": 0.1}
    assert all(r["end_time"] >= r["start_time"] and len(r["code_version"]) == 12 for r in rows)
    # storage that cannot take the row: the stage's own error still comes out, the other is printed
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(KeyError, match="boom"):
        with recorded(str(blocked), "r2", "eval", {}):
            raise KeyError("boom")
    assert "could not record the failed eval run 'r2'" in capsys.readouterr().out
