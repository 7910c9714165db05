"""Trace-stage overhead: the traces flow vs bare `LLM.chat` calls on the same inputs, in one run.

    python benchmarks/traces.py [--rounds 3] [--samples 64] [--batch-size 16] [--max-tokens 32] [--model FOLDER]

Both sides use the same vLLM engine settings, prompts, images, per-sample seeds and batch size.
The flow's generation loop (reading samples, prompts, filters, Parquet commits, progress artifact)
is timed from its first batch to its last commit; the engine start-up is timed separately and
every engine starts cold (a new one per round on each side, no warm-up batch). The sides are
interleaved (bare, flow, bare, flow, ...) so load from other processes falls on both; the end
prints the mean and the spread (min..max) of the per-round overheads.
Without --model a tiny random Qwen2.5-VL is built offline (so the model itself is very fast and
the ratio is the pessimistic case for overhead).

--warm: one engine for both sides, built and warmed once, then bare and flow rounds alternate on it
(the flow's make_generator hands it the shared engine and its close() leaves it running). Cold
engines on this CPU differ by +-15% from one start to the next, which swamps a 5% overhead; on one
warm engine the two sides see the same engine.

Measured 2026-11-24 (session 9, idle 2 cores, --max-tokens 128): cold engines, 64 samples x 3 rounds:
overhead -12.1..+28.6% (mean +9.0%); 640 samples x 3 rounds: -14.1, +2.9, +4.1% (mean -2.4%).
--warm, 640 samples x 6 rounds: median +0.8%, mean +3.2% (-9.5..+23.2%); a 3-round run before it
+2.9, +17.1, +9.0%. The bare side alone moved between 23.7 and 30.3 samples/s from one round to the next
on the same warm engine (vLLM's engine core and worker keep both cores busy, so any other thread on the
machine shows up in its time), so side by side cannot resolve 5% here. The in-run figure (the flow's
loop outside generate(), over the time inside) was +0.27..+0.6% in every round of every run.
"""
import argparse
import os
import tempfile
import time


def bare_seconds(spec, reqs, batch_size: int) -> tuple[float, float, int]:
    """A cold VLLMGenerator on reqs batch by batch: (start-up s, generation s, output tokens)."""
    import gc

    from tasks.traces.generators import VLLMGenerator

    t0 = time.perf_counter()
    gen = VLLMGenerator(spec)
    startup, t0, tokens = time.perf_counter() - t0, time.perf_counter(), 0
    for i in range(0, len(reqs), batch_size):
        tokens += sum(r.output_tokens or 0 for r in gen.generate(reqs[i:i + batch_size]))
    secs = time.perf_counter() - t0
    gen.close()
    gc.collect()  # the engine (and its KV cache) goes before the next one starts
    return startup, secs, tokens


class _Shared:
    """The warm engine handed to the flow: generate() passes through, close() leaves it running."""

    def __init__(self, gen):
        self.gen = gen

    @property
    def dead(self):  # generate_traces stops on a dead engine: pass the shared one's state through
        return self.gen.dead

    def generate(self, reqs):
        return self.gen.generate(reqs)

    def close(self) -> None:
        pass


def warm_seconds(gen, reqs, batch_size: int) -> tuple[float, int]:
    """bare generate() calls on an engine already running: (generation s, output tokens)."""
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(reqs), batch_size):
        tokens += sum(r.output_tokens or 0 for r in gen.generate(reqs[i:i + batch_size]))
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="bare / flow pairs, interleaved")
    ap.add_argument("--warm", action="store_true", help="one warm engine shared by both sides (see above)")
    a = ap.parse_args()
    for k, v in dict(VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1",
                     PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
                     PREFECT_HOME=tempfile.mkdtemp(prefix="parapipe-bench-")).items():
        os.environ.setdefault(k, v)
    import statistics
    from dataclasses import asdict

    import tasks.aggregate.aggregate as agg
    from flows.traces import traces
    from storage.parquet import read_table
    from tasks.traces.generators import GeneratorSpec
    from tasks.traces.tiny_qwen import build_tiny_qwen25_vl
    from tasks.traces.traces import TraceRequest, sample_seed

    work = tempfile.mkdtemp(prefix="parapipe-traces-bench-")
    model = a.model or build_tiny_qwen25_vl(os.path.join(work, "tiny-qwen"))
    root = os.path.join(work, "lake")
    for rep in range(a.rounds):  # one dataset per flow run: a finished dataset has nothing pending
        agg.ingest_source.fn({"type": "toy", "name": "toy", "preset": "tiny", "n": a.samples, "seed": 0}, root,
                             f"d{rep}", dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0,
                                            near_duplicate_bits=2))
    spec = GeneratorSpec(kind="vllm", model=model, max_tokens=a.max_tokens, max_model_len=1024,
                         max_num_seqs=a.batch_size, dtype="bfloat16", temperature=0.7, seed=1)
    rows = read_table(root, "samples", run="d0", columns=["sample_id", "instruction", "input_image", "output_image"]).to_pylist()
    reqs = [TraceRequest(r["sample_id"], r["instruction"], r["output_image"], r["input_image"],
                         sample_seed(spec.seed, r["sample_id"], 1)) for r in rows]
    n, overheads, outside = len(reqs), [], []
    if a.warm:
        import tasks.traces.generators as generators

        shared = generators.make_generator(spec)
        warm_seconds(shared, reqs, a.batch_size)  # warm-up pass, not counted
        generators.make_generator = lambda _spec: _Shared(shared)
    for rep in range(a.rounds):  # bare, flow, bare, flow, ...: load from other processes falls on both
        if a.warm:
            startup, (bare_s, bare_tokens) = 0.0, warm_seconds(shared, reqs, a.batch_size)
        else:
            startup, bare_s, bare_tokens = bare_seconds(spec, reqs, a.batch_size)
        t0 = time.perf_counter()
        out = traces(root=root, dataset=f"d{rep}", generator=asdict(spec), batch_size=a.batch_size,
                     filters={"min_object_words": 0})
        flow_wall = time.perf_counter() - t0
        overheads.append(100 * (out["seconds"] / bare_s - 1))
        outside.append(100 * (out["seconds"] / out["generate_seconds"] - 1))
        print(f"round {rep + 1}: bare LLM.chat {n / bare_s:6.2f} samples/s {bare_tokens / bare_s:7.1f} output tokens/s "
              f"(engine start-up {startup:.1f} s) | traces flow {n / out['seconds']:6.2f} samples/s "
              f"{out['output_tokens'] / out['seconds']:7.1f} output tokens/s (whole flow incl. engine start "
              f"{flow_wall:.1f} s) | overhead {overheads[-1]:+.1f}%, flow's loop outside generate() "
              f"{outside[-1]:+.1f}%", flush=True)
    print(f"{n} samples, batch {a.batch_size}, max_tokens {a.max_tokens}, {a.rounds} interleaved rounds, "
          + ("one warm engine shared by both sides" if a.warm else "every engine cold"))
    print(f"overhead of the flow's loop vs bare: median {statistics.median(overheads):+.1f}%, "
          f"mean {statistics.mean(overheads):+.1f}% "
          f"(min..max {min(overheads):+.1f}..{max(overheads):+.1f}%)")
    print(f"the flow's loop outside the generator's generate() calls, over the time inside them (same engine, same "
          f"run: robust to load from other processes): mean {statistics.mean(outside):+.2f}% "
          f"(min..max {min(outside):+.2f}..{max(outside):+.2f}%)")


if __name__ == "__main__":
    main()
