"""storage/ against a real S3 server (SeaweedFS `weed mini` on loopback, see tests/s3server.py)."""
import pyarrow.fs as pafs
import pytest

from storage import fs, parquet
from storage.parquet import read_table, write_rows
from storage.schema import TABLES
from tests.s3server import s3_root, s3_server  # noqa: F401  (pytest fixtures)
from tests.test_storage import make_rows, sample


def keys_under(server, root: str) -> list[str]:
    prefix = root.removeprefix(f"s3://{server.bucket}/") + "/"
    listing = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for o in listing.get("Contents", []))


def test_fs_helpers_on_s3(s3_server, s3_root):
    cfg = s3_server.config()
    fs.write_json(fs.join(s3_root, "d/m.json"), {"a": 1}, cfg)
    fs.write_bytes(fs.join(s3_root, "d/x.bin"), b"xyz", cfg)
    assert fs.read_json(fs.join(s3_root, "d/m.json"), cfg) == {"a": 1}
    assert fs.read_bytes(fs.join(s3_root, "d/x.bin"), cfg) == b"xyz"
    assert fs.list_dir(s3_root, cfg) == [("d", True)]
    assert fs.list_dir(fs.join(s3_root, "d"), cfg) == [("m.json", False), ("x.bin", False)]
    fs.delete(fs.join(s3_root, "d/x.bin"), cfg)
    assert (fs.exists(fs.join(s3_root, "d/x.bin"), cfg), fs.exists(fs.join(s3_root, "d/m.json"), cfg)) == (False, True)
    assert [k for k in keys_under(s3_server, s3_root) if not k.endswith("/")] == ["d/m.json"]  # "d/": dir marker


def test_settings_come_from_aws_env_vars(s3_server, s3_root, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    assert fs.S3Config.from_env() == s3_server.config()
    filesystem, path = fs.resolve(f"{s3_root}/k")
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert path == f"{s3_root.removeprefix('s3://')}/k"
    write_rows(s3_root, "samples", [sample(0)], run="r")  # no explicit config anywhere
    assert read_table(s3_root, "samples").column("sample_id").to_pylist() == ["s000"]


def test_wrong_secret_is_rejected(s3_server, s3_root):
    bad = fs.S3Config(endpoint=s3_server.endpoint_url, access_key=s3_server.access_key, secret_key="wrong")
    with pytest.raises(OSError):
        fs.write_bytes(fs.join(s3_root, "x"), b"1", bad)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_round_trip_every_table_on_s3(s3_server, s3_root, table):
    rows = make_rows(table, 3)
    write_rows(s3_root, table, rows, run="r1", s3=s3_server.config())
    got = read_table(s3_root, table, s3=s3_server.config())
    assert got.drop_columns(["run"]).to_pylist() == rows


def test_partitioned_idempotent_writes_on_s3(s3_server, s3_root):
    cfg = s3_server.config()
    write_rows(s3_root, "samples", [sample(i) for i in range(12)], run="a", rows_per_shard=5, s3=cfg)
    write_rows(s3_root, "samples", [sample(i) for i in range(4)], run="b", s3=cfg)
    rerun = write_rows(s3_root, "samples", [sample(i) for i in range(12)], run="a", rows_per_shard=5, s3=cfg)
    assert (rerun.written, rerun.skipped) == (0, 12)
    assert keys_under(s3_server, s3_root) == [
        "samples/run=a/_manifest.json", "samples/run=a/shard-00000.parquet", "samples/run=a/shard-00001.parquet",
        "samples/run=a/shard-00002.parquet", "samples/run=b/_manifest.json", "samples/run=b/shard-00000.parquet"]
    assert parquet.list_runs(s3_root, "samples", cfg) == ["a", "b"]
    assert read_table(s3_root, "samples", run="a", s3=cfg).num_rows == 12
    assert read_table(s3_root, "samples", s3=cfg).num_rows == 16


def test_crash_before_manifest_on_s3(s3_server, s3_root, monkeypatch):
    cfg = s3_server.config()
    write_rows(s3_root, "samples", [sample(i) for i in range(3)], run="r", s3=cfg)

    def crash(*args, **kwargs):
        raise RuntimeError("killed before commit")

    monkeypatch.setattr(parquet, "_write_manifest", crash)
    with pytest.raises(RuntimeError):
        write_rows(s3_root, "samples", [sample(i) for i in range(2, 6)], run="r", s3=cfg)
    monkeypatch.undo()
    assert "samples/run=r/shard-00001.parquet" in keys_under(s3_server, s3_root)
    assert read_table(s3_root, "samples", s3=cfg).num_rows == 3
    res = write_rows(s3_root, "samples", [sample(i) for i in range(2, 6)], run="r", s3=cfg)
    assert (res.written, res.skipped) == (3, 1)
    ids = read_table(s3_root, "samples", s3=cfg).column("sample_id").to_pylist()
    assert sorted(ids) == [f"s{i:03d}" for i in range(6)]
