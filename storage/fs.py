"""One file interface over local paths and `s3://bucket/prefix` URIs, built on `pyarrow.fs`.

Holds: `S3Config` (endpoint and credentials, from env vars or explicit), `resolve(uri) -> (filesystem, path)`, and
small helpers to read/write bytes and JSON, list, test existence and delete. Writes are atomic: locally a temp file
in the same directory then a rename (`LocalFileSystem.move`); on S3 one object upload, visible all-or-nothing.
Leaves out: Parquet and manifests (storage/parquet.py), DuckDB (storage/query.py), bucket creation, retries.

S3 settings come from `AWS_ENDPOINT_URL` (e.g. `http://127.0.0.1:8333`), `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY` and `AWS_REGION` unless an `S3Config` is passed explicitly.
"""
import functools
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

S3_PREFIX = "s3://"
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Config:
    """Where the S3 server is and how to sign requests."""

    endpoint: str | None = None
    """`host:port` or `http(s)://host:port` of an S3-compatible server; None means AWS itself."""
    access_key: str | None = None
    """Access key id; None lets pyarrow use its default credential chain."""
    secret_key: str | None = field(default=None, repr=False)
    """Secret access key, required when `access_key` is set. Left out of repr: it never reaches a log or error."""
    region: str = DEFAULT_REGION
    """Signing region."""

    def __post_init__(self):
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("S3Config: set both access_key and secret_key (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
                             "or neither")

    @classmethod
    def from_env(cls) -> "S3Config":
        """Read AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION."""
        return cls(endpoint=os.environ.get("AWS_ENDPOINT_URL") or None,
                   access_key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
                   secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
                   region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION)


@functools.lru_cache(maxsize=8)
def s3_filesystem(cfg: S3Config) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for `cfg` (cached: one client per distinct config)."""
    kwargs: dict[str, Any] = {"region": cfg.region}
    if cfg.endpoint:
        scheme, _, host = cfg.endpoint.rpartition("://")
        kwargs.update(endpoint_override=host, scheme=scheme or "http")
    if cfg.access_key:
        kwargs.update(access_key=cfg.access_key, secret_key=cfg.secret_key)
    return pafs.S3FileSystem(**kwargs)


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def resolve(uri: str | os.PathLike, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a local path or `s3://bucket/key` to `(filesystem, path inside it)`.

    Local paths become absolute; S3 paths become `bucket/key` without a trailing slash.
    """
    uri = os.fspath(uri)
    if is_s3(uri):
        path = uri[len(S3_PREFIX):].strip("/")
        if not path:
            raise ValueError(f"S3 URI {uri!r} has no bucket; use s3://bucket/prefix")
        return s3_filesystem(s3 or S3Config.from_env()), path
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts with '/', for local paths and S3 URIs alike."""
    out = os.fspath(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str, s3: S3Config | None = None) -> bool:
    fs, path = resolve(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, s3: S3Config | None = None) -> bytes:
    fs, path = resolve(uri, s3)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes | pa.Buffer, s3: S3Config | None = None) -> None:
    """Write `data` to `uri` atomically: readers see the old object or the whole new one, never a part."""
    fs, path = resolve(uri, s3)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:  # one object upload: S3 publishes it only when complete
            f.write(data)
        return
    parent, name = os.path.split(path)
    fs.create_dir(parent, recursive=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # rename(2): atomic within one filesystem
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(uri: str, s3: S3Config | None = None) -> Any:
    return json.loads(read_bytes(uri, s3))


def write_json(uri: str, obj: Any, s3: S3Config | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=1, sort_keys=True).encode(), s3)


def list_dir(uri: str, s3: S3Config | None = None) -> list[tuple[str, bool]]:
    """Entries directly under `uri` as `(name, is_dir)`, sorted by name; empty if `uri` does not exist."""
    fs, path = resolve(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


def delete(uri: str, s3: S3Config | None = None) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = resolve(uri, s3)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
