"""Reasoning traces: the versioned prompt template, requests, post-filters and resumable bookkeeping.

A trace is keyed by (sample_id, generator key, attempt); the generator key hashes the model,
revision, template hash and sampling parameters, so changing any of them makes a new set of
traces instead of silently mixing two. A run generates only for samples without an `ok` or
`filtered` trace of this generator; failed ones are retried under the next attempt number.
Failures are rows with their error, never an empty trace standing in for one. Post-filters mark
rows `filtered` with a reason instead of deleting them. The generators are in tasks/traces/generators.py.
"""
import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, field

from prefect import task

TEMPLATE_VERSION = "parapipe-trace-v1"
SYSTEM_PROMPT = ("You explain image edits and image generations. Think about what the request needs, which "
                 "objects it touches and what the final image shows, then state the result.")
EDIT_PROMPT = ("The first image is the input and the second image is the result of this editing instruction: "
               "\"{instruction}\". Write the reasoning that leads from the instruction to the result: what the "
               "instruction asks for, which objects it affects, and what the result image shows. "
               "Use at most {max_words} words.")
GENERATE_PROMPT = ("The image was generated for this prompt: \"{instruction}\". Write the reasoning that leads "
                   "from the prompt to the image: what it asks for, where each object goes, and what the image "
                   "shows. Use at most {max_words} words.")
STOPWORDS = frozenset("a an the of to and or in on at by with for from into onto it its is are be this that these "
                      "those every each all make turn put then so as than there their them they will after".split())


def template_hash() -> str:
    text = json.dumps([TEMPLATE_VERSION, SYSTEM_PROMPT, EDIT_PROMPT, GENERATE_PROMPT])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TraceRequest:
    """One sample to explain. Images are PNG bytes."""

    sample_id: str
    instruction: str
    output_image: bytes
    input_image: bytes | None = None
    seed: int = 0
    attempt: int = 1
    toy: dict | None = None
    """The toy world's task dict when the sample comes from it (the teacher generator needs it)."""


@dataclass
class TraceResult:
    sample_id: str
    text: str | None
    error: str | None = None
    latency_s: float = 0.0
    prompt_tokens: int | None = None
    output_tokens: int | None = None


def user_text(req: TraceRequest, max_words: int) -> str:
    template = GENERATE_PROMPT if req.input_image is None else EDIT_PROMPT
    return template.format(instruction=req.instruction, max_words=max_words)


def request_images(req: TraceRequest, max_pixels: int):
    """PIL images in prompt order (input, then output), pre-resized to at most max_pixels pixels."""
    from PIL import Image

    images = []
    for blob in (req.input_image, req.output_image):
        if blob is None:
            continue
        im = Image.open(io.BytesIO(blob)).convert("RGB")
        w, h = im.size
        if w * h > max_pixels:
            scale = (max_pixels / (w * h)) ** 0.5
            im = im.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BICUBIC)
        images.append(im)
    return images


def sample_seed(base: int, sample_id: str, attempt: int) -> int:
    """A per-request seed: reproducible, different across samples and retries."""
    return int(hashlib.sha256(f"{base}/{sample_id}/{attempt}".encode()).hexdigest()[:8], 16)


# ---------------------------------------------------------------------------------------------
# post-filters

@dataclass(frozen=True)
class FilterConfig:
    """Post-filters; a failing trace is kept with status 'filtered' and the reason."""

    min_words: int = 3
    """Shorter traces are filtered as too_short."""
    max_words: int = 200
    """Longer traces are filtered as too_long."""
    min_object_words: int = 1
    """The trace must mention at least this many of the instruction's content words (0 turns it off)."""
    min_clip_score: float | None = None
    """Cosine similarity of trace text and output image under the CLIP model below; None turns it off."""
    clip_model: str = "ViT-B-32"
    """open_clip model name (a built-in config, or a JSON config registered with open_clip)."""
    clip_pretrained: str | None = None
    """open_clip `pretrained` tag or local weights file; None means random weights (tests only)."""


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in STOPWORDS}


def filter_reason(text: str, instruction: str, cfg: FilterConfig) -> str | None:
    """None if the trace passes the text filters, else a short reason."""
    n = len(text.split())
    if n < cfg.min_words:
        return f"too_short: {n} words < {cfg.min_words}"
    if n > cfg.max_words:
        return f"too_long: {n} words > {cfg.max_words}"
    wanted = content_words(instruction)
    found = wanted & content_words(text)
    if len(found) < min(cfg.min_object_words, len(wanted)):
        return f"misses_objects: mentions {sorted(found)} of {sorted(wanted)}"
    return None


# ---------------------------------------------------------------------------------------------
# rows of the traces table

@dataclass(frozen=True)
class Provenance:
    generator: str
    """Generator key: hash of kind, model, revision, template and sampling parameters."""
    model: str
    revision: str | None
    template_hash: str
    run_id: str
    seed: int
    extra: dict = field(default_factory=dict)


def trace_row(req: TraceRequest, res: TraceResult, prov: Provenance, status: str, reason: str | None) -> dict:
    return {"sample_id": req.sample_id, "generator": prov.generator, "attempt": req.attempt,
            "template_hash": prov.template_hash, "text": res.text, "status": status, "error": res.error,
            "filter_reason": reason, "model": prov.model, "revision": prov.revision, "seed": req.seed,
            "run_id": prov.run_id, "latency_s": res.latency_s, "prompt_tokens": res.prompt_tokens,
            "output_tokens": res.output_tokens}


def classify(req: TraceRequest, res: TraceResult, cfg: FilterConfig) -> tuple[str, str | None]:
    """(status, filter reason) of a result before any CLIP filter."""
    if res.error is not None:
        return "failed", None
    if res.text is None or not res.text.strip():
        res.error = "empty completion"
        return "failed", None
    reason = filter_reason(res.text, req.instruction, cfg)
    return ("filtered", reason) if reason else ("ok", None)


def generator_key(spec: dict) -> str:
    """Hash of what determines the generated text (not how it is served)."""
    keep = {k: spec.get(k) for k in ("kind", "model", "revision", "temperature", "top_p", "max_tokens", "seed",
                                     "max_words", "json_schema", "error_rate", "compact")}
    keep["template"] = template_hash()
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]



# ---------------------------------------------------------------------------------------------
# Prefect tasks: what is pending, and generation batch by batch

SAMPLE_COLUMNS = ["sample_id", "instruction", "input_image", "output_image", "extra_json"]
PROGRESS_EVERY_S = 2.0  # the progress artifact is an API call: not after every small batch
COMMIT_EVERY_S = 10.0  # at most this much finished work is uncommitted at any time
COMMIT_ROWS = 1024  # ... or this many rows


@task
def find_pending(root: str, dataset: str, generator: str) -> dict[str, int]:
    """sample_id -> attempt number for every sample without an ok / filtered trace of `generator`."""
    import pyarrow.compute as pc

    from storage.parquet import read_table

    ids = read_table(root, "samples", run=dataset, columns=["sample_id"]).column("sample_id").to_pylist()
    done, attempts = set(), {}
    mine = read_table(root, "traces", run=dataset, filter=pc.field("generator") == generator,
                      columns=["sample_id", "status", "attempt"])
    for r in mine.to_pylist():
        if r["status"] in ("ok", "filtered"):
            done.add(r["sample_id"])
        attempts[r["sample_id"]] = max(attempts.get(r["sample_id"], 0), r["attempt"])
    return {s: attempts.get(s, 0) + 1 for s in ids if s not in done}


def _requests(batch: list[dict], pending: dict[str, int], base_seed: int) -> list[TraceRequest]:
    out = []
    for row in batch:
        extra = json.loads(row["extra_json"] or "{}")
        attempt = pending[row["sample_id"]]
        out.append(TraceRequest(row["sample_id"], row["instruction"], row["output_image"], row["input_image"],
                                sample_seed(base_seed, row["sample_id"], attempt), attempt, extra.get("toy")))
    return out


def _apply_clip(reqs, results, statuses, scorer, cfg: FilterConfig) -> None:
    """Marks ok traces whose CLIP score is below cfg.min_clip_score as filtered (in place)."""
    from PIL import Image

    ok = [i for i, (s, _) in enumerate(statuses) if s == "ok"]
    if not ok:
        return
    images = [Image.open(io.BytesIO(reqs[i].output_image)).convert("RGB") for i in ok]
    for i, score in zip(ok, scorer.score(images, [results[i].text for i in ok])):
        if score < cfg.min_clip_score:
            statuses[i] = ("filtered", f"low_clip_score: {score:.3f} < {cfg.min_clip_score}")


def progress_text(counts: dict, total: int, secs: float, out_tokens: int) -> str:
    """The progress card's line: what is done and how it went, failures first when there are any."""
    done = sum(counts.values())
    text = f"{done}/{total} traces: {counts['ok']} ok, {counts['filtered']} filtered, {counts['failed']} failed"
    if counts["failed"]:
        text = f"{counts['failed']} of {done} FAILED; " + text
    return text + f"; {done / max(secs, 1e-9):.1f} samples/s, {out_tokens / max(secs, 1e-9):.1f} output tokens/s"


class _ProgressCard:
    """Progress-artifact updates (an API call each) sent from one background thread, so the
    generation loop never waits on the server; an update due while one is in flight is skipped,
    the final one (100%) is always sent and waited for in close()."""

    def __init__(self, progress_id):
        from concurrent.futures import ThreadPoolExecutor

        self.id, self.pool, self.inflight = progress_id, ThreadPoolExecutor(1, "traces-progress"), None

    def update(self, percent: float, text: str, final: bool = False) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.id is None or (not final and self.inflight is not None and not self.inflight.done()):
            return
        self.inflight = self.pool.submit(update_progress_artifact, self.id, percent, description=text)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.inflight is not None and self.inflight.done() and self.inflight.exception() is not None:
            print(f"WARNING: the progress card {self.id} was not updated: {self.inflight.exception()}")


def _transient(task, task_run, state) -> bool:
    """Prefect retry condition: a generator that cannot start or whose engine died is not retried."""
    from tasks.traces.generators import GeneratorDeadError, GeneratorStartError

    return not isinstance(state.data, (GeneratorStartError, GeneratorDeadError))  # data: the exception


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_transient)
def generate_traces(root: str, dataset: str, generator: dict, pending: dict[str, int], run_id: str,
                    batch_size: int = 16, filters: dict | None = None, progress_id=None,
                    commit_every_s: float = COMMIT_EVERY_S) -> dict:
    """Generates traces for the pending samples batch by batch. Finished rows are committed once
    commit_every_s has passed since the last commit (every batch when 0), at COMMIT_ROWS rows, and at
    the end: a crash loses at most that much work, and a fast generator does not pay a Parquet
    commit per small batch. Nothing pending: returns at once without starting the generator.
    Raises GeneratorStartError (not retried) when the generator cannot start, GeneratorDeadError
    (after committing the rows so far) when its engine dies."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from storage.parquet import open_dataset, write_rows
    from tasks.traces.generators import GeneratorDeadError, GeneratorSpec, make_generator

    spec, cfg = GeneratorSpec(**generator), FilterConfig(**(filters or {}))
    prov = Provenance(generator_key(generator), spec.model, spec.revision, template_hash(), run_id, spec.seed)
    if not pending:  # a resume with nothing to do never loads the model
        return {"ok": 0, "filtered": 0, "failed": 0, "generator": prov.generator, "seconds": 0.0,
                "generate_seconds": 0.0, "output_tokens": 0, "samples_per_s": 0.0}
    scorer = None
    if cfg.min_clip_score is not None:
        from rl.reward import ClipScorer

        scorer = ClipScorer(cfg.clip_model, cfg.clip_pretrained)
    gen, card = make_generator(spec), _ProgressCard(progress_id)
    counts, out_tokens, t0, last_report = {"ok": 0, "filtered": 0, "failed": 0}, 0, time.perf_counter(), 0.0
    buffer, last_commit, generate_s = [], t0, 0.0
    scanner = open_dataset(root, "samples", run=dataset).scanner(
        columns=SAMPLE_COLUMNS, filter=pc.field("sample_id").isin(pa.array(list(pending), pa.string())),
        batch_size=batch_size)
    try:
        for record_batch in scanner.to_batches():
            reqs = _requests(record_batch.to_pylist(), pending, spec.seed)
            if not reqs:
                continue
            t_gen = time.perf_counter()
            results = gen.generate(reqs)
            generate_s += time.perf_counter() - t_gen
            statuses = [classify(q, r, cfg) for q, r in zip(reqs, results)]
            if scorer is not None:
                _apply_clip(reqs, results, statuses, scorer, cfg)
            buffer += [trace_row(q, r, prov, s, why) for q, r, (s, why) in zip(reqs, results, statuses)]
            if len(buffer) >= COMMIT_ROWS or time.perf_counter() - last_commit >= commit_every_s:
                write_rows(root, "traces", buffer, run=dataset)
                buffer, last_commit = [], time.perf_counter()
            for s, _ in statuses:
                counts[s] += 1
            out_tokens += sum(r.output_tokens or 0 for r in results)
            done, secs = sum(counts.values()), time.perf_counter() - t0
            if secs - last_report >= PROGRESS_EVERY_S or done == len(pending):
                last_report = secs
                card.update(100.0 * done / max(1, len(pending)), progress_text(counts, len(pending), secs, out_tokens),
                            final=done == len(pending))
            if getattr(gen, "dead", None):
                break
        if buffer:
            write_rows(root, "traces", buffer, run=dataset)
        if getattr(gen, "dead", None):
            raise GeneratorDeadError(f"the generator's engine died after {sum(counts.values())} of {len(pending)} "
                                     f"traces ({counts}): {gen.dead}. The rows so far are committed; re-run to "
                                     f"resume once the cause (see the engine's log above) is fixed")
        secs = time.perf_counter() - t0  # generation only: the engine's start and shutdown are not counted
    finally:
        gen.close()
        card.close()  # the last card update goes on while the engine shuts down
    return {**counts, "generator": prov.generator, "seconds": secs, "generate_seconds": generate_s,
            "output_tokens": out_tokens, "samples_per_s": sum(counts.values()) / secs if secs else 0.0}
