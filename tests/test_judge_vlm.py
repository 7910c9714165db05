"""VLMJudge: answer parsing and validation, retries and caching against a scripted server, and a real vLLM server."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from tasks.evaluate.judge_vlm import (CACHE_FILE, PROMPT_VERSION, SYSTEM_PROMPT, VLMJudge, answer_schema,
                                      build_messages, parse_answer)
from tasks.evaluate.judges import METRICS, EvalItem, EvalOutput, overall


def _png(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _answer(kind="edit", **over) -> dict:
    a = {"text_quality": 80, "text_alignment": 70, "image_consistency": 90 if kind == "edit" else None,
         "image_alignment": 60, "image_quality": 50, "output_alignment": 40, "rationale": "The circle turned blue."}
    return {**a, **over}


def _items_outputs(n=2):
    """n items alternating edit / generate, with matching outputs."""
    items, outputs = [], []
    for i in range(n):
        edit = i % 2 == 0
        items.append(EvalItem(f"it{i}", "edit" if edit else "generate", "color",
                              f"instruction {i}: paint the red circle blue", _png("red") if edit else None))
        outputs.append(EvalOutput(f"it{i}", f"the red circle becomes blue ({i})", _png("blue")))
    return items, outputs


# ---------------------------------------------------------------------------------------------
# 1. parser and validator

CLEAN = json.dumps(_answer())


@pytest.mark.parametrize("text, kind, expected", [
    (CLEAN, "edit", None),
    ("```json\n" + CLEAN + "\n```", "edit", None),
    ("```\n" + CLEAN + "\n```", "edit", None),
    ("Here is my evaluation:\n" + CLEAN + "\nI hope this helps {really}.", "edit", None),
    ("Scores use {braces} first. " + CLEAN, "edit", None),
    (json.dumps(_answer(text_quality=85.0)), "edit", None),
    (json.dumps({**_answer(), "notes": "extra keys are ignored"}), "edit", None),
    (json.dumps(_answer("generate")), "generate", None),
    (json.dumps(_answer()).replace("circle ", "circle\x1d\n"), "edit", None),  # raw control characters
    ("", "edit", "empty answer"),
    ("the image is nice", "edit", "no JSON object in the answer"),
    ('{"text_quality": 80,', "edit", "the JSON object in the answer is malformed or cut off"),
    ("{'text_quality': 80}", "edit", "the JSON object in the answer is malformed or cut off"),
    ("[1, 2, 3]", "edit", "the answer is a JSON list, not an object"),
    (json.dumps({k: v for k, v in _answer().items() if k != "output_alignment"}), "edit",
     "missing keys: output_alignment"),
    (json.dumps({"rationale": "x"}), "edit", "missing keys: text_quality, text_alignment"),
    (json.dumps(_answer(image_quality=101)), "edit", "image_quality is out of range 0-100: 101"),
    (json.dumps(_answer(text_quality=-1)), "edit", "text_quality is out of range 0-100: -1"),
    (json.dumps(_answer(text_alignment="85")), "edit",
     "text_alignment must be an integer from 0 to 100, got '85' (str)"),
    (json.dumps(_answer(text_alignment=85.5)), "edit", "text_alignment must be an integer from 0 to 100, got 85.5"),
    (json.dumps(_answer(output_alignment=True)), "edit", "output_alignment must be an integer"),
    (json.dumps(_answer(output_alignment=None)), "edit", "output_alignment must be an integer"),
    (json.dumps(_answer(image_consistency=50)), "generate",
     "image_consistency must be null for a generation item, got 50"),
    (json.dumps(_answer(image_consistency=None)), "edit",
     "image_consistency must be an integer from 0 to 100 for an edit item, got null"),
    (json.dumps(_answer(rationale=3)), "edit", "rationale must be a string, got int"),
])
def test_parse_answer_accepts_or_rejects_with_a_reason(text, kind, expected):
    parsed, reason = parse_answer(text, kind)
    if expected is None:
        assert reason == "" and parsed is not None
        assert set(parsed) == {*METRICS, "rationale"}
        assert all(type(parsed[m]) is int for m in METRICS if parsed[m] is not None)
        assert parsed["text_quality"] in (80, 85) and parsed["rationale"] == "The circle turned blue."
        assert (parsed["image_consistency"] is None) == (kind == "generate")
    else:
        assert parsed is None and reason.startswith(expected), reason


def test_answer_schema_matches_the_validator():
    for kind in ("edit", "generate"):
        schema = answer_schema(kind)
        assert set(schema["required"]) == {*METRICS, "rationale"}
        assert parse_answer(json.dumps(_answer(kind)), kind)[0] is not None
    assert answer_schema("generate")["properties"]["image_consistency"] == {"type": "null"}


def test_messages_carry_instruction_images_and_text():
    items, outputs = _items_outputs(2)
    edit = build_messages(items[0], outputs[0], max_pixels=1024 * 1024)
    assert edit[0] == {"role": "system", "content": SYSTEM_PROMPT}
    parts = edit[1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    texts = "\n".join(p["text"] for p in parts if p["type"] == "text")
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)
    assert base64.b64decode(urls[0].split(",", 1)[1]) == items[0].input_image  # small PNGs travel unchanged
    assert "image editing" in texts and items[0].instruction in texts and outputs[0].text in texts
    assert "must be an integer from 0 to 100" in texts
    gen = build_messages(items[1], outputs[1], max_pixels=1024 * 1024)[1]["content"]
    assert sum(p["type"] == "image_url" for p in gen) == 1
    assert "image_consistency must be null" in gen[-1]["text"]
    big = build_messages(items[1], EvalOutput("it1", "t", _png("blue", (400, 300))), max_pixels=100 * 75)
    url = [p for p in big[1]["content"] if p["type"] == "image_url"][0]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (100, 75)


# ---------------------------------------------------------------------------------------------
# 2. a scripted OpenAI-compatible server

class Scripted:
    """A local /v1/chat/completions whose replies come from `reply(body, n) -> (status, content)`.

    n counts the requests for the same item (recognised by its instruction), from 1.
    """

    def __init__(self, reply, delay_s=0.0):
        self.reply, self.delay_s = reply, delay_s
        self.bodies, self.headers, self.per_item = [], [], {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                instruction = body["messages"][1]["content"][0]["text"]
                with scripted.lock:
                    scripted.bodies.append(body)
                    scripted.headers.append(dict(self.headers))
                    n = scripted.per_item[instruction] = scripted.per_item.get(instruction, 0) + 1
                    scripted.in_flight += 1
                    scripted.max_in_flight = max(scripted.max_in_flight, scripted.in_flight)
                time.sleep(scripted.delay_s)
                status, content = scripted.reply(body, n)
                with scripted.lock:
                    scripted.in_flight -= 1
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                                      "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
                                     if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    @property
    def requests(self) -> int:
        return len(self.bodies)


@pytest.fixture
def serve():
    servers = []

    def start(reply, delay_s=0.0):
        servers.append(Scripted(reply, delay_s))
        return servers[-1]

    yield start
    for s in servers:
        s.server.shutdown()
        s.server.server_close()


def _kind(body) -> str:
    return "edit" if "image editing" in body["messages"][1]["content"][0]["text"] else "generate"


def _valid(body, n):
    return 200, json.dumps(_answer(_kind(body)))


def _judge(url, tmp_path, **kw):
    kw = {"model": "judge-m", "api_key": "sk-test", "concurrency": 2, "max_retries": 2, "backoff_s": 0.01,
          "cache_dir": tmp_path and str(tmp_path / "cache"), **kw}
    return VLMJudge(url, **kw)


def test_a_malformed_answer_is_repaired_and_the_request_carries_images(serve, tmp_path):
    srv = serve(lambda body, n: (200, "Sure! The scores are high.") if n == 1 else _valid(body, n))
    items, outputs = _items_outputs(2)
    with _judge(srv.url, tmp_path) as judge:
        out = judge.judge(items, outputs)
    assert [j.item_id for j in out] == ["it0", "it1"] and not any(j.failed for j in out)
    assert out[0].scores == {k: v for k, v in _answer().items() if k != "rationale"}
    assert out[1].scores["image_consistency"] is None and overall(out[1].scores) == 60
    assert out[0].reason == "The circle turned blue." and out[0].judge == "vlm:judge-m"
    assert out[0].version == judge.version and judge.version.startswith(PROMPT_VERSION)
    assert srv.requests == 4 and judge.stats == {"cached": 0, "judged": 2, "failed": 0, "requests": 4,
                                                 "prompt_tokens": 400, "completion_tokens": 80}
    first = [b for b in srv.bodies if len(b["messages"]) == 2]
    repairs = [b for b in srv.bodies if len(b["messages"]) == 4]
    assert len(first) == len(repairs) == 2
    for b in first:
        assert b["model"] == "judge-m" and b["temperature"] == 0 and b["response_format"] == {"type": "json_object"}
        n_images = sum(p["type"] == "image_url" for p in b["messages"][1]["content"])
        assert n_images == (2 if _kind(b) == "edit" else 1)
    assert repairs[0]["messages"][2] == {"role": "assistant", "content": "Sure! The scores are high."}
    assert "rejected: no JSON object in the answer" in repairs[0]["messages"][3]["content"]
    assert srv.headers[0]["Authorization"] == "Bearer sk-test"


def test_an_always_off_schema_answer_fails_with_its_reason_and_is_not_cached(serve, tmp_path):
    srv = serve(lambda body, n: (200, json.dumps(_answer("edit"))))  # image_consistency set on generations too
    items, outputs = _items_outputs(2)
    judge = _judge(srv.url, tmp_path)
    out = judge.judge(items, outputs)
    assert not out[0].failed
    bad = out[1]
    assert bad.failed and bad.scores == {m: None for m in METRICS} and overall(bad.scores) is None
    assert bad.reason.startswith("invalid answer after 3 attempts: image_consistency must be null for a generation")
    assert srv.per_item[f"Task: image generation.\nInstruction: {items[1].instruction}"] == 3
    assert srv.requests == 4 and judge.stats["failed"] == 1 and judge.stats["judged"] == 1
    lines = (tmp_path / "cache" / CACHE_FILE).read_text().splitlines()
    assert [json.loads(line)["item_id"] for line in lines] == ["it0"]
    again = judge.judge(items, outputs)  # the failure is asked again, the success comes from the cache
    assert again[1].failed and srv.requests == 7 and judge.stats["cached"] == 1


def test_server_errors_and_timeouts_are_retried_with_backoff(serve, tmp_path):
    srv = serve(lambda body, n: (500, "overloaded") if n == 1 else _valid(body, n))
    items, outputs = _items_outputs(2)
    out = _judge(srv.url, tmp_path).judge(items, outputs)
    assert not any(j.failed for j in out) and srv.requests == 4
    tmp_path = None  # no cache below: every judge asks its own server

    down = serve(lambda body, n: (503, "down for maintenance"))
    out = _judge(down.url, tmp_path, max_retries=1).judge(items[:1], outputs[:1])
    assert out[0].failed and out[0].reason.startswith("transport: HTTP 503")
    assert "(after 2 attempts)" in out[0].reason and down.requests == 2

    bad_request = serve(lambda body, n: (400, "response_format is not supported"))
    out = _judge(bad_request.url, tmp_path).judge(items[:1], outputs[:1])
    assert out[0].failed and "HTTP 400" in out[0].reason and "response_format" in out[0].reason
    assert bad_request.requests == 1  # a 4xx is not retried

    slow = serve(_valid, delay_s=1.0)
    out = _judge(slow.url, tmp_path, timeout=0.2, max_retries=1).judge(items[:1], outputs[:1])
    assert out[0].failed and "ReadTimeout" in out[0].reason and slow.requests == 2

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _judge(f"http://127.0.0.1:{port}/v1", tmp_path, max_retries=1).judge(items, outputs)
    assert all(j.failed and j.reason.startswith("transport: ConnectError") for j in out)


def test_the_cache_judges_only_what_is_new(serve, tmp_path):
    srv = serve(_valid)
    items, outputs = _items_outputs(3)
    first = _judge(srv.url, tmp_path).judge(items, outputs)
    assert srv.requests == 3
    judge = _judge(srv.url, tmp_path)  # a new process would see the same file
    assert judge.judge(items, outputs) == first and srv.requests == 3 and judge.stats["cached"] == 3
    changed = [outputs[0], EvalOutput("it1", "a different reasoning text", outputs[1].image), outputs[2]]
    again = judge.judge(items, changed)
    assert srv.requests == 4 and judge.stats["cached"] == 2 and judge.stats["judged"] == 1
    assert srv.bodies[-1]["messages"][1]["content"][-1]["text"].count("a different reasoning text") == 1
    assert [j.scores for j in again] == [j.scores for j in first]
    new_image = [EvalOutput("it0", outputs[0].text, _png("green")), *changed[1:]]
    judge.judge(items, new_image)
    assert srv.requests == 5
    _judge(srv.url, tmp_path, model="another-judge").judge(items, outputs)  # another model: its own judgments
    assert srv.requests == 8
    _judge(srv.url, tmp_path, cache_dir=None).judge(items, outputs)  # caching off
    assert srv.requests == 11


def test_unjudgeable_outputs_fail_without_a_request(serve, tmp_path):
    srv = serve(_valid)
    items, outputs = _items_outputs(4)
    outputs = [EvalOutput("it0", "", None, error="sampling diverged"), EvalOutput("it1", "text", None),
               EvalOutput("it2", "text", b"not a png")]  # it3 has no output at all
    out = _judge(srv.url, tmp_path).judge(items, outputs)
    assert [j.failed for j in out] == [True] * 4 and srv.requests == 0
    assert out[0].reason == "no output: sampling diverged"
    assert out[1].reason == "the output has no image"
    assert out[2].reason.startswith("unreadable image: UnidentifiedImageError")
    assert out[3].reason == "no output for this item"
    with pytest.raises(ValueError, match="two outputs for item 'it0'"):
        _judge(srv.url, tmp_path).judge(items, [outputs[0], outputs[0]])


def test_concurrency_is_bounded_and_response_format_is_a_flag(serve, tmp_path):
    srv = serve(_valid, delay_s=0.1)
    items, outputs = _items_outputs(12)
    out = _judge(srv.url, tmp_path, concurrency=3, response_format="json_schema").judge(items, outputs)
    assert not any(j.failed for j in out) and [j.item_id for j in out] == [i.item_id for i in items]
    assert 2 <= srv.max_in_flight <= 3
    rf = srv.bodies[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == answer_schema(_kind(srv.bodies[0]))
    _judge(srv.url, tmp_path, response_format=None, cache_dir=None).judge(items[:1], outputs[:1])
    assert "response_format" not in srv.bodies[-1]
    with pytest.raises(ValueError, match="response_format='xml' is unknown"):
        _judge(srv.url, tmp_path, response_format="xml")


# ---------------------------------------------------------------------------------------------
# 3. a real vLLM server with a tiny random Qwen2.5-VL

SERVER_START_S = 300


@pytest.fixture(scope="module")
def tiny_vllm(tmp_path_factory):
    """`vllm serve` of a tiny random Qwen2.5-VL on loopback, for this module only.

    The judge prompt is ~1.4k tokens with this toy tokenizer, so the context is stretched past the
    model's 2048 positions (random weights: nothing to preserve).
    """
    from tasks.traces.tiny_qwen import build_tiny_qwen25_vl

    folder = build_tiny_qwen25_vl(str(tmp_path_factory.mktemp("tiny-qwen25-vl")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("vllm-serve") / "serve.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
                             "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny-qwen",
                             "--max-model-len", "4096", "--max-num-seqs", "4", "--dtype", "bfloat16",
                             "--enforce-eager", "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}),
                             # grammar-constrained answers without the endless whitespace a random model picks
                             "--structured-outputs-config",
                             json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"vllm serve did not come up; see {log.name}")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def _check(judgments, items):
    assert [j.item_id for j in judgments] == [i.item_id for i in items]
    for j, item in zip(judgments, items):
        if j.failed:  # garbage from random weights: rejected with the validator's reason, never zeros
            assert j.reason.startswith("invalid answer after 2 attempts: ") and "last answer" in j.reason, j.reason
            assert all(v is None for v in j.scores.values())
        else:
            assert set(j.scores) == set(METRICS) and all(0 <= j.scores[m] <= 100 for m in METRICS
                                                         if m != "image_consistency")
            assert (j.scores["image_consistency"] is None) == (item.kind == "generate")


@pytest.mark.slow
def test_against_a_real_vllm_server(tiny_vllm, tmp_path):
    items, outputs = _items_outputs(4)
    # the images are consumed: the same request without them is shorter
    messages = build_messages(items[0], outputs[0], max_pixels=1024 * 1024)
    no_images = [messages[0], {"role": "user", "content": [p for p in messages[1]["content"]
                                                           if p["type"] != "image_url"]}]
    tokens = [httpx.post(f"{tiny_vllm}/chat/completions", timeout=120, json={
        "model": "tiny-qwen", "messages": m, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
        for m in (messages, no_images)]
    assert tokens[0] >= tokens[1] + 2 * 4, tokens

    judge = VLMJudge(tiny_vllm, "tiny-qwen", concurrency=2, max_retries=1, max_tokens=48, timeout=120,
                     backoff_s=0.5, cache_dir=str(tmp_path))
    out = judge.judge(items, outputs)
    _check(out, items)
    assert judge.stats["requests"] >= 4 and judge.stats["prompt_tokens"] > 4 * tokens[1]
    assert judge.stats["judged"] + judge.stats["failed"] == 4

    # grammar-constrained decoding: random weights, but answers of the right shape (observed: all four
    # valid); whatever is valid is cached, whatever failed is asked again (2 attempts each)
    constrained = VLMJudge(tiny_vllm, "tiny-qwen", concurrency=2, max_retries=1, max_tokens=400, timeout=120,
                           response_format="json_schema", cache_dir=str(tmp_path))
    out = constrained.judge(items, outputs)
    _check(out, items)
    judged = constrained.stats["judged"]
    assert judged == sum(not j.failed for j in out)
    again = constrained.judge(items, outputs)
    assert constrained.stats["cached"] == judged and constrained.stats["requests"] == 2 * (4 - judged)
    assert [j for j in again if not j.failed] == [j for j in out if not j.failed]
    judge.close()
    constrained.close()
