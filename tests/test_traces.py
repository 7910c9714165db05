"""Trace stage without vLLM: teacher generator, filters, failure rows, retries, resume."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import tasks.aggregate.aggregate as agg
from storage.parquet import read_table
from tasks.traces.generators import GeneratorSpec, HTTPGenerator
from tasks.traces.traces import FilterConfig, TraceRequest, filter_reason, find_pending, generate_traces, generator_key

CURATE = dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0, near_duplicate_bits=2)


@pytest.fixture
def lake(tmp_path):
    root = str(tmp_path / "lake")
    agg.ingest_source.fn({"type": "toy", "name": "toy", "preset": "tiny", "n": 40, "seed": 2}, root, "d", CURATE)
    return root


def _run(root, generator, **kw):
    spec = {**GeneratorSpec().__dict__, **generator}
    pending = find_pending.fn(root, "d", generator_key(spec))
    return pending, generate_traces.fn(root, "d", spec, pending, "run-1", **kw)


def test_teacher_traces_resume_without_duplicates(lake):
    pending, stats = _run(lake, {"kind": "teacher"}, batch_size=7)
    assert len(pending) == 40 and stats["ok"] == 40 and stats["failed"] == 0
    again, stats2 = _run(lake, {"kind": "teacher"})
    assert again == {} and stats2["ok"] == 0
    rows = read_table(lake, "traces").to_pylist()
    assert len(rows) == 40 and len({r["sample_id"] for r in rows}) == 40
    r = rows[0]
    assert r["model"] == "toy-teacher" and r["attempt"] == 1 and r["run_id"] == "run-1" and len(r["template_hash"]) == 12
    assert r["text"].startswith(tuple("abcdefghijklmnopqrstuvwxyz")) and "result:" in r["text"]
    # another generator (different sampling parameters) makes its own set
    other, _ = _run(lake, {"kind": "teacher", "error_rate": 0.5})
    assert len(other) == 40
    assert len(read_table(lake, "traces").to_pylist()) == 80


def test_failures_are_rows_and_are_retried_next_run(lake, tmp_path):
    # a JSONL sample has no toy task: the teacher cannot explain it -> a failed row, never an empty trace
    d = tmp_path / "j"
    d.mkdir()
    (d / "o.png").write_bytes(read_table(lake, "samples").column("output_image")[0].as_py())
    (d / "manifest.jsonl").write_text(json.dumps({"instruction": "draw a cat", "output_image": "o.png"}) + "\n")
    agg.ingest_source.fn({"type": "jsonl", "name": "j", "path": str(d)}, lake, "d", CURATE)
    _, stats = _run(lake, {"kind": "teacher"})
    assert (stats["ok"], stats["failed"]) == (40, 1)
    failed = [r for r in read_table(lake, "traces").to_pylist() if r["status"] == "failed"]
    assert failed[0]["text"] is None and "toy task" in failed[0]["error"] and failed[0]["attempt"] == 1
    pending, stats = _run(lake, {"kind": "teacher"})
    assert list(pending.values()) == [2] and stats["failed"] == 1  # retried as attempt 2


def test_filters_mark_rows_with_a_reason():
    cfg = FilterConfig(min_words=3, max_words=10, min_object_words=1)
    assert filter_reason("ok.", "paint the red circle", cfg).startswith("too_short")
    assert filter_reason("word " * 11, "paint the red circle", cfg).startswith("too_long")
    assert filter_reason("nothing relevant here", "paint the red circle", cfg).startswith("misses_objects")
    assert filter_reason("the circle becomes blue", "paint the red circle", cfg) is None


def test_clip_filter_uses_a_real_open_clip_model(lake, tmp_path):
    from rl.reward import ClipScorer, register_tiny_clip

    name = register_tiny_clip(str(tmp_path / "clip"))
    scorer = ClipScorer(name)
    from PIL import Image

    s = scorer.score([Image.new("RGB", (32, 32), "red")] * 2, ["a red square", "a blue circle"])
    assert len(s) == 2 and all(-1.0 <= v <= 1.0 for v in s) and s[0] != s[1]
    _, stats = _run(lake, {"kind": "teacher"}, filters={"min_clip_score": 2.0, "clip_model": name})
    assert stats["filtered"] == 40  # a cosine similarity never reaches 2
    rows = read_table(lake, "traces").to_pylist()
    assert all(r["status"] == "filtered" and r["filter_reason"].startswith("low_clip_score") for r in rows)


class _Flaky(BaseHTTPRequestHandler):
    """503 on every other request, else an OpenAI-style completion."""

    calls = 0

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).calls % 2:
            self.send_response(503)
            self.end_headers()
            return
        body = json.dumps({"choices": [{"message": {"content": "the red circle turns blue"}}],
                           "usage": {"prompt_tokens": 30, "completion_tokens": 6}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_generator_retries_and_reports_unreachable_servers(lake):
    server = HTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    png = read_table(lake, "samples").column("output_image")[0].as_py()
    req = TraceRequest("s1", "paint the red circle blue", png, png)
    try:
        gen = HTTPGenerator(GeneratorSpec(kind="http", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                          concurrency=2, retries=2))
        out = gen.generate([req, req, req])
        gen.close()
    finally:
        server.shutdown()
    assert [o.text for o in out] == ["the red circle turns blue"] * 3
    assert all(o.error is None and o.output_tokens == 6 for o in out)
    assert _Flaky.calls == 6  # each request saw one 503, backed off, then got a 200
    _, stats = _run(lake, {"kind": "http", "base_url": "http://127.0.0.1:9/v1", "retries": 0, "timeout_s": 2})
    assert stats["failed"] == 40
    assert all("Connect" in r["error"] for r in read_table(lake, "traces").to_pylist())


class _NotFound(BaseHTTPRequestHandler):
    """A 404 with an OpenAI-style explanation, as vLLM answers for a wrong model name."""

    calls = 0

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": {"message": "The model `nope` does not exist.", "code": 404}}).encode()
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_404_keeps_the_servers_explanation_and_is_not_retried(lake):
    server = HTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    png = read_table(lake, "samples").column("output_image")[0].as_py()
    try:
        gen = HTTPGenerator(GeneratorSpec(kind="http", model="nope", retries=3,
                                          base_url=f"http://127.0.0.1:{server.server_port}/v1"))
        [out] = gen.generate([TraceRequest("s1", "paint the red circle blue", png)])
        gen.close()
    finally:
        server.shutdown()
    assert out.text is None and out.error.startswith("HTTP 404 from http://127.0.0.1:")
    assert "The model `nope` does not exist." in out.error
    assert _NotFound.calls == 1  # a 404 is final: no retries


def test_resume_with_nothing_pending_never_starts_the_generator(lake):
    # a vLLM generator on a folder that does not exist would fail to start; nothing pending: not started
    spec = {**GeneratorSpec().__dict__, "kind": "vllm", "model": "/does/not/exist"}
    stats = generate_traces.fn(lake, "d", spec, {}, "run-1")
    assert (stats["ok"], stats["failed"], stats["output_tokens"]) == (0, 0, 0)


def test_trace_stats_counts_only_each_samples_latest_attempt(lake):
    from storage.parquet import write_rows
    from storage.query import query

    base = dict(generator="g", template_hash="t", model="m", run_id="r", latency_s=1.0, output_tokens=3)
    write_rows(lake, "traces", [
        {**base, "sample_id": "a", "attempt": 1, "status": "failed", "error": "HTTP 503"},
        {**base, "sample_id": "a", "attempt": 2, "status": "ok", "text": "the circle turns blue"},
        {**base, "sample_id": "b", "attempt": 1, "status": "failed", "error": "HTTP 503"},
        {**base, "sample_id": "b", "attempt": 2, "status": "failed", "error": "HTTP 503"},
        {**base, "sample_id": "c", "attempt": 1, "status": "filtered", "text": "no"}], run="d")
    got = query(lake, "SELECT generator, n, n_ok, n_failed, n_filtered FROM trace_stats").to_pylist()
    assert got == [{"generator": "g", "n": 3, "n_ok": 1, "n_failed": 1, "n_filtered": 1}]


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [a for a in arts if a.type == "progress"]


def test_a_run_whose_rows_all_fail_ends_failed_with_the_count(lake, prefect_harness):
    from flows.traces import TracesFailed, traces

    unreachable = {"kind": "http", "base_url": "http://127.0.0.1:9/v1", "retries": 0, "timeout_s": 2}
    state = traces(root=lake, dataset="d", generator=unreachable, return_state=True)
    assert state.is_failed() and "40 of 40 traces failed" in state.message
    with pytest.raises(TracesFailed, match="40 of 40 traces failed"):
        state.result()
    [card] = _artifacts(state.state_details.flow_run_id)
    assert card.type == "progress" and card.data == 100.0 and card.key.startswith("traces-progress-")
    assert card.description.startswith("40 of 40 FAILED") and "0 ok" in card.description
    # the teacher writes them all: a different generator, its own run, its own card
    ok = traces(root=lake, dataset="d", generator={"kind": "teacher"}, return_state=True)
    assert ok.is_completed() and ok.result()["ok"] == 40
    [card2] = _artifacts(ok.state_details.flow_run_id)
    assert card2.key != card.key and "40/40 traces: 40 ok, 0 filtered, 0 failed" in card2.description
    # resumed with nothing to do: 100%, and the model is never loaded
    again = traces(root=lake, dataset="d", generator={"kind": "teacher"}, return_state=True)
    assert again.is_completed() and again.result()["pending"] == 0 and again.result()["without_trace"] == 0
    [card3] = _artifacts(again.state_details.flow_run_id)
    assert card3.data == 100.0 and card3.description.startswith("nothing to do")
    # the runs table has each invocation: the failed one with its error, then what each did
    runs = sorted(read_table(lake, "runs").to_pylist(), key=lambda r: r["start_time"])
    assert [r["stage"] for r in runs] == ["traces"] * 3 and all(r["end_time"] >= r["start_time"] for r in runs)
    timings = [json.loads(r["timings_json"]) for r in runs]
    assert "40 of 40 traces failed" in timings[0]["error"] and timings[0]["failed"] == 40
    assert timings[1]["ok"] == 40 and "error" not in timings[1] and timings[1]["seconds"] > 0
    assert [json.loads(r["config_json"])["pending"] for r in runs] == [40, 40, 0]
    assert json.loads(runs[0]["config_json"])["generator"]["kind"] == "http"


def test_failures_over_the_threshold_fail_the_run_below_it_do_not(lake, tmp_path, prefect_harness):
    from flows.traces import traces

    # the teacher fails samples without a toy task: 10 JSONL samples beside the 40 toy ones (20% of 50 fail)
    d = tmp_path / "j"
    d.mkdir()
    png = read_table(lake, "samples").column("output_image")[0].as_py()
    lines = []
    for i in range(10):
        (d / f"o{i}.png").write_bytes(png)
        lines.append(json.dumps({"instruction": f"draw cat {i}", "output_image": f"o{i}.png"}))
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    agg.ingest_source.fn({"type": "jsonl", "name": "j", "path": str(d)}, lake, "d", CURATE)
    n = read_table(lake, "samples").num_rows
    failed = n - 40
    strict = traces(root=lake, dataset="d", generator={"kind": "teacher"}, max_failed_fraction=0.0, return_state=True)
    assert strict.is_failed() and f"{failed} of {n} traces failed" in strict.message
    # another generator (seed 1): the same 20% fails, under the default threshold (0.25)
    lenient = traces(root=lake, dataset="d", generator={"kind": "teacher", "seed": 1}, return_state=True)
    assert lenient.is_completed() and lenient.result()["failed"] == failed and lenient.result()["pending"] == n
    assert lenient.result()["without_trace"] == failed  # dataset totals: the failed samples still have none
    # retrying only the failed ones: all of this run's rows fail again, so this run fails
    retry = traces(root=lake, dataset="d", generator={"kind": "teacher", "seed": 1}, return_state=True)
    assert retry.is_failed() and f"{failed} of {failed} traces failed" in retry.message


def test_a_generator_that_cannot_start_fails_once_with_a_clear_error(lake, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.traces import traces
    from tasks.traces.generators import GeneratorStartError

    state = traces(root=lake, dataset="d", generator={"kind": "ray", "model": "/does/not/exist"}, return_state=True)
    assert state.is_failed()
    with pytest.raises(GeneratorStartError, match="could not start model '/does/not/exist'"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
            state.state_details.flow_run_id])))
    [gen] = [r for r in runs if r.name.startswith("generate_traces")]
    assert gen.run_count == 1 and gen.state.is_failed()  # not retried as if it were transient
    assert read_table(lake, "traces").num_rows == 0


def test_the_cli_exits_non_zero_with_the_count_when_every_trace_failed(lake, prefect_harness, capsys):
    from flows.cli import main

    gen = '{"kind": "http", "base_url": "http://127.0.0.1:9/v1", "retries": 0, "timeout_s": 2}'
    with pytest.raises(SystemExit) as exit_:
        main(["traces", "--root", lake, "--dataset", "d", "--generator", gen], console=True)
    assert exit_.value.code == 1
    assert "40 of 40 traces failed" in capsys.readouterr().err
