"""`make run`'s pipeline, stage by stage: wall time and peak memory orchestrated (the Prefect flow on an
ephemeral Prefect server, SFT on Ray Train, ParaRL on Ray actors) next to the same work done by calling
the stages' functions directly in one plain Python process, in one run.

    .venv/bin/python benchmarks/pipeline.py [--full] [--out DIR] [--order direct,orchestrated]

On a machine shared with other work, the two arms can run at the same time, so both see the same load
(each then also slows the other), and be put side by side afterwards:

    for arm in orchestrated direct; do .venv/bin/python benchmarks/pipeline.py --out W --order $arm & done; wait
    .venv/bin/python benchmarks/pipeline.py --redraw W/orchestrated.measured.json W/direct.measured.json

Each arm runs in its own fresh Python process (`--arm` below) on a fresh output folder, with its own
fresh PREFECT_HOME (so the orchestrated arm's ephemeral server creates and migrates a new database, as
a first `make run` does). This process samples every --interval seconds the resident memory (RSS) and
CPU seconds of that process and all its descendants (Ray's gcs/raylet/dashboard/workers and actors,
Prefect's uvicorn server) and attributes them to the stage whose window holds the sample. CPU seconds
are the load-insensitive column on a shared machine: wall time there includes waiting for the CPU.
Stage windows, orchestrated: the start and end times the Prefect API recorded for the pipeline's
top-level task runs (aggregate-stage ... generate-examples), read after the run; direct: time.time()
around each call. "setup" = process start to the first stage (imports; orchestrated adds the Prefect
server start, the flow run and record-config); "teardown" = the last stage to the process's exit
(orchestrated: Prefect's and Ray's shutdown hooks).

What the direct arm does differently (the difference is meant to be orchestration, not less work):
- same config, data, seeds, steps, rounds, items; the same task bodies (`.fn`) and library functions.
- SFT: tasks/sft/sft.train_loop_per_worker's loop (train_step, checkpoint every 100 steps, toy eval every
  500 and at the end) as one process with the full global batch and torch's default threads (2 here);
  orchestrated: Ray Train with num_workers gloo DDP workers x 1 CPU, half the batch each (same FLOPs,
  one all-reduce per step). Not pure overhead: 2 processes x 1 thread vs 1 process x 2 threads.
- ParaRL: tasks.pararl.pararl.run_rl itself, with rl.loop.Roles replaced by `LocalRoles` (the same
  RolloutWorker / RewardWorker classes called in this process on the driver's threads, one after the
  other, where Ray overlaps scoring with sampling) and ray.is_initialized patched so Ray never starts.
- No Prefect at all: no server, task/flow runs, result persistence, cache keys, progress / markdown /
  table artifacts (prefect.artifacts' functions patched to no-ops; so the UI's loss and reward charts
  are not drawn); the evaluation's PNG reports are. PREFECT_API_URL points at a closed port, so any
  Prefect call left in would fail the arm.
RSS summed over processes counts shared pages (torch libraries, Ray's object store) once per process.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("aggregate", "fit-reward", "traces", "sft", "pararl", "evaluate", "examples")
SMALL = dict(toy_samples=600, sft_steps=100, reward_steps=50, rl=dict(rounds=2, eval_every=2, checkpoint_every=2),
             eval_limit=60)


def config(full: bool, out: str):
    from tasks.pipeline.pipeline_config import PipelineConfig

    return PipelineConfig(out=out) if full else PipelineConfig(out=out, **SMALL)


# ------------------------------------------------------------------------------------------ orchestrated

def run_orchestrated(c) -> dict:
    """The pipeline flow as `parapipe run` calls it; stage windows from the Prefect API afterwards."""
    from flows.cli_support import console_tracebacks_off
    from tasks.pipeline.progress import quiet_internals

    quiet_internals()
    from flows.pipeline import pipeline

    console_tracebacks_off()
    t_call = time.time()
    result = pipeline(config=c)
    t_return = time.time()
    windows = task_windows(result["flow_run_id"])
    return {"windows": windows, "pipeline_call": [t_call, t_return], "stages_state": result["stages"]}


def task_windows(flow_run_id: str) -> dict:
    """{stage: [start, end]} (epoch seconds) of the flow run's *-stage and generate-examples task runs."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        flow = client.read_flow_run(UUID(flow_run_id))
    out = {"flow": [flow.start_time.timestamp(), flow.end_time.timestamp()]}
    for r in runs:
        name = r.name.rsplit("-", 1)[0]  # task run names: "<task name>-<3 characters>"
        stage = "examples" if name == "generate-examples" else name.removesuffix("-stage")
        if r.start_time and r.end_time and (stage in STAGES or stage == "record-config"):
            out[stage] = [r.start_time.timestamp(), r.end_time.timestamp()]
    return out


# ------------------------------------------------------------------------------------------------ direct

class LocalRoles:
    """rl.loop.Roles without Ray: the same RolloutWorker / RewardWorker, called in this process."""

    def __init__(self, checkpoint: str, shape, reward_kwargs: dict, rollout_workers: int = 1,
                 reward_workers: int = 1, use_gpu: bool = False, crash_markers: dict | None = None):
        import torch

        from rl.reward import RewardWorker
        from rl.rollout import RolloutWorker

        self.rollout = RolloutWorker(checkpoint, shape, threads=torch.get_num_threads())
        self.reward = RewardWorker(**reward_kwargs)
        self.n = rollout_workers  # chunks (their seeds) as Roles makes them
        self.weights, self.version = None, -1

    def publish(self, state_dict: dict, version: int) -> None:
        self.weights, self.version = {k: v.detach().clone() for k, v in state_dict.items()}, version

    def shutdown(self) -> None:
        pass

    def collect(self, prompts, group_size, sampler, steps, seed, round_, reward_batch: int = 256) -> dict:
        import numpy as np

        from rl.loop import _seed

        t0 = time.perf_counter()
        bounds = np.linspace(0, len(prompts), self.n + 1).round().astype(int)
        results, raw, stats = [], [], []
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b > a:
                results.append(self.rollout.sample(self.weights, self.version, prompts[a:b], group_size, sampler,
                                                   steps, _seed(seed, round_, i)))
        rollout_s = time.perf_counter() - t0
        for res in results:
            images = res["images"].reshape(-1, *res["images"].shape[2:])
            texts = [t for row in res["texts"] for t in row]
            for s in range(0, len(texts), reward_batch):
                out = self.reward.score(list(images[s:s + reward_batch]), texts[s:s + reward_batch])
                raw += out["scores"]
                stats.append(out["stats"])
        merged = {k: np.concatenate([r[k] for r in results]) for k in
                  ("tokens", "step_map", "logp", "image_codes", "text_ids")}
        merged["texts"] = [row for r in results for row in r["texts"]]
        merged["raw"] = np.asarray(raw, dtype=np.float64).reshape(len(merged["tokens"]), len(steps))
        pairs = sum(s.get("pairs", 0) for s in stats)
        merged["timing"] = {"rollout_s": rollout_s, "reward_s": sum(s["seconds"] for s in stats),
                            "wall_s": time.perf_counter() - t0, "rollout_busy_s": rollout_s, "reward_pairs": pairs,
                            "text_split_rate": sum(s.get("split_texts", 0) for s in stats) / max(pairs, 1)}
        return merged


def direct_sft(c, root: str, out: str, recipe) -> str:
    """flows/sft.py's work: tokenizer, prepare, tasks/sft/sft.train_loop_per_worker's loop as one process
    (same steps, checkpoints every 100 steps, toy eval every 500 and at the end), held-out evaluation."""
    import torch

    from flows.sft import fit_batch, image_tokenizer_for
    from model.checkpoint import from_pretrained
    from storage.parquet import write_rows
    from tasks.sft.image_codes import fit_image_tokenizer
    from tasks.sft.sft import _evaluate, _metric_rows, _save_checkpoint, evaluate_checkpoint, load_set, prepare_sft
    from tasks.sft.sft import step_seed
    from tasks.sft.sft_data import SequenceConfig, batch_stream
    from tasks.sft.sft_eval import evaluate_heldout
    from tasks.sft.sft_loop import SFTConfig, make_optimizer, train_step

    r, run_id, every, interval = recipe.to_dict(), f"sft-{c.dataset}-direct", 100, 500  # flows/sft.py's defaults
    r["init_from"] = os.path.abspath(r["init_from"]) if r["init_from"] else None
    r["sft"] = {**r["sft"], "total_steps": c.sft_steps, "warmup_steps": min(r["sft"]["warmup_steps"], c.sft_steps // 5)}
    fit_vq = r["image_tokenizer"] == "fit" and not r["init_from"]  # image_tokenizer_for would call the task
    vq = (fit_image_tokenizer.fn(root, c.dataset, os.path.join(out, "image_tokenizer")) if fit_vq
          else image_tokenizer_for.fn(r, root, c.dataset, out))
    paths = prepare_sft.fn(root, c.dataset, out, r, r["init_from"], vq,
                           eval_per_category=max(4, r["eval_per_category"] // 4))
    r["seq"] = paths["seq"]
    r["sft"] = fit_batch(r["sft"], paths, c.dataset, c.num_workers)  # the global batch, which Ray's workers split
    cfg = {"base": paths["base"], "train_data": paths["train_data"], "seq": r["seq"], "sft": r["sft"], "root": root,
           "run_id": run_id, "out": out, "image_tokenizer": paths["image_tokenizer"],
           "eval": {"val_data": paths["val_data"], "scenes": paths["scenes"], "preset": paths["preset"],
                    "sampler": r["sampler"]}}
    sft, seq = SFTConfig(**r["sft"]), SequenceConfig(**r["seq"])
    torch.manual_seed(sft.seed)
    model, vocab = from_pretrained(paths["base"])
    optimizer, gen = make_optimizer(model, sft), torch.Generator()
    stream = batch_stream(load_set(paths["train_data"]), vocab, seq, sft.batch_size, sft.seed, 0, 1, sft.cond_dropout)
    final, pending = os.path.join(out, "checkpoints", run_id, "final"), []
    for step in range(sft.total_steps):
        gen.manual_seed(step_seed(sft.seed, 0, step))
        t0 = time.perf_counter()
        row = train_step(model, optimizer, [next(stream) for _ in range(sft.grad_accum)], sft, gen, step,
                         vocab.mask_id)
        pending.append({**row, "step": step + 1, "tokens_per_s": row["tokens"] / (time.perf_counter() - t0)})
        last = step + 1 == sft.total_steps
        if (step + 1) % every and not last:
            continue
        if last or (step + 1) % interval == 0:
            write_rows(root, "eval_results", _evaluate(model, cfg, vocab, step + 1), run=run_id)
        if os.path.isdir(final):
            shutil.rmtree(final)
        _save_checkpoint(model, optimizer, step + 1, cfg, vocab, final)
        write_rows(root, "train_metrics", _metric_rows(pending, run_id), run=run_id)
        pending = []
    evaluate_heldout.fn(final, root, c.dataset, run_id, r)
    evaluate_checkpoint.fn(final, root, c.dataset, run_id, "test", r["eval_per_category"], r["sampler"], r["seq"],
                           r["categories"])
    return final


def direct_pararl(c, root: str, out: str, checkpoint: str, reward: str) -> str:
    """flows/pararl.py's work through tasks.pararl.pararl.run_rl, with LocalRoles and without Ray."""
    import ray

    import rl.loop
    from rl.learner import RLConfig
    from tasks.pararl.pararl import prepare_rl, run_rl

    paths = prepare_rl(checkpoint, root, c.dataset, out)
    rl.loop.Roles, ray.is_initialized = LocalRoles, lambda: True  # run_rl: no actors, no ray.init
    result = run_rl(checkpoint, paths, RLConfig(**c.rl), out, root, f"rl-{c.dataset}-direct", None,
                    {"kind": "clip", "clip_folder": reward})
    return result["checkpoint"]


def direct_evaluate(c, root: str, checkpoints: list[str], sampler: dict) -> None:
    """flows/evaluate.py's work: outputs, judgments, aggregates, sample grids and the metrics chart."""
    from flows.evaluate import TOY_BENCHMARK, judge_outputs, label_of, load_benchmark, sample_outputs, write_grid
    from storage.parquet import write_rows
    from tasks.evaluate.eval_report import metric_chart
    from tasks.evaluate.evaluate import aggregate

    items, report = load_benchmark.fn(root, TOY_BENCHMARK)[:c.eval_limit], os.path.join(os.path.abspath(c.out), "eval")
    os.makedirs(report, exist_ok=True)
    rows = {}
    for ckpt in checkpoints:
        run = f"eval-direct-{label_of(ckpt).replace('/', '-')}"
        for mode in c.eval_modes:
            outputs = sample_outputs.fn(ckpt, items, root, run, TOY_BENCHMARK, mode, c.seed, sampler, 16)
            judgments = judge_outputs.fn(items, outputs, "exact", root, run, TOY_BENCHMARK, mode, c.seed, None)
            agg = aggregate(items, outputs, judgments)
            write_rows(root, "eval_results", [
                {"run_id": run, "checkpoint": ckpt, "step": None, "suite": f"{TOY_BENCHMARK}/exact/{mode}",
                 "metric": f"{m}/{g}", "value": v, "num_samples": agg["counts"][g]["items"]}
                for g, vals in agg["table"].items() for m, v in vals.items() if v is not None], run=run)
            label = label_of(ckpt).replace("/", "-")
            write_grid(items, outputs, judgments, os.path.join(report, f"samples-{label}-{mode}.png"), 12)
            rows[f"{label_of(ckpt)} ({mode})"] = agg["table"]["overall"]
    metric_chart(rows, os.path.join(report, "metrics.png"), f"{TOY_BENCHMARK} (exact judge)")


def no_artifacts() -> None:
    """Prefect artifacts (API calls) become no-ops: task bodies that publish one (evaluate_checkpoint's
    table) import it at call time. The arm runs with an unreachable PREFECT_API_URL: any other Prefect
    call fails instead of quietly starting a server."""
    import prefect.artifacts

    for name in dir(prefect.artifacts):
        if name.startswith(("create_", "update_")) and name.endswith("_artifact"):
            setattr(prefect.artifacts, name, lambda *a, **k: None)


def run_direct(c) -> dict:
    """The pipeline's stages, in order, as plain calls; {stage: [start, end]}."""
    from dataclasses import asdict

    from model.sampling import SamplerConfig
    from storage.parquet import read_table
    from tasks.aggregate.aggregate import ingest_source
    from tasks.common.generate import generate_examples_fn
    from tasks.pararl.fit_reward import fit_tiny_clip
    from tasks.traces.generators import GeneratorSpec
    from tasks.traces.traces import find_pending, generate_traces, generator_key

    out = os.path.abspath(c.out)
    root, recipe, windows = os.path.join(out, "data"), c.resolved_recipe(), {}
    no_artifacts()

    def timed(stage, fn, *args):
        t0 = time.time()
        value = fn(*args)
        windows[stage] = [t0, time.time()]
        return value

    spec = {"type": "toy", "name": c.dataset, "preset": "tiny", "n": c.toy_samples or recipe.toy_samples,
            "seed": c.seed, "categories": list(recipe.categories or [])}
    timed("aggregate", lambda: (ingest_source.fn(spec, root, c.dataset, dict(resolution=32)),
                                read_table(root, "samples", run=c.dataset, columns=["split"]).num_rows))
    reward = os.path.join(out, "reward")
    timed("fit-reward", lambda: fit_tiny_clip(reward, preset="tiny", seed=c.seed, steps=c.reward_steps))
    gen = asdict(GeneratorSpec(kind="teacher", seed=c.seed))
    timed("traces", lambda: generate_traces.fn(root, c.dataset, gen, find_pending.fn(root, c.dataset,
                                               generator_key(gen)), "traces-direct", 16, None, None, 10.0))
    sft = timed("sft", direct_sft, c, root, os.path.join(out, "sft"), recipe)
    tuned = timed("pararl", direct_pararl, c, root, os.path.join(out, "rl"), sft, reward)
    timed("evaluate", direct_evaluate, c, root, [sft, tuned], recipe.sampler)
    timed("examples", lambda: generate_examples_fn(tuned, root, c.dataset, os.path.join(out, "examples"),
                                                   SamplerConfig(**recipe.sampler), n=c.examples, split="test",
                                                   seed=c.seed))
    return {"windows": windows}


# -------------------------------------------------------------------------------------- measuring arms

GROUPS = ("driver", "ray", "prefect", "other")


class TreeSampler(threading.Thread):
    """Every `interval` s: (time, RSS MiB of the process tree, {group: RSS MiB}, {group: CPU s so far}).

    Groups: the arm's own process (driver), Ray's (cmdline names ray), Prefect's server (uvicorn), other.
    CPU seconds (user + system) add up every process ever seen at its last reading, so work done by a
    process that has since exited still counts (up to one interval of it is lost)."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.samples, self.stop = pid, interval, [], threading.Event()
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (group, CPU s at its last reading)

    def _group(self, p) -> str:
        cmd = " ".join(p.cmdline())
        return ("driver" if p.pid == self.pid else "ray" if "ray" in cmd.lower() else
                "prefect" if "uvicorn" in cmd or "prefect" in cmd else "other")

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            rss = dict.fromkeys(GROUPS, 0.0)
            for p in procs:
                try:
                    with p.oneshot():
                        group = self.cpu[p.pid][0] if p.pid in self.cpu else self._group(p)
                        rss[group] += p.memory_info().rss / 2 ** 20
                        t = p.cpu_times()
                        self.cpu[p.pid] = (group, t.user + t.system)
                except psutil.Error:
                    continue
            cpu = dict.fromkeys(GROUPS, 0.0)
            for group, secs in self.cpu.values():
                cpu[group] += secs
            self.samples.append((time.time(), sum(rss.values()), rss, cpu))
            self.stop.wait(self.interval)


def measure(arm: str, full: bool, work: str, interval: float) -> dict:
    """Runs one arm in a fresh process; returns its stage windows, process times and memory samples."""
    out, result = os.path.join(work, arm), os.path.join(work, f"{arm}.json")
    env = dict(os.environ, PREFECT_HOME=os.path.join(work, f"prefect-{arm}"), RAY_USAGE_STATS_ENABLED="0",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=HERE)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # as flows/cli.main sets it
    if arm == "direct":
        env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # nothing listens: a Prefect call fails loudly
    else:
        env.pop("PREFECT_API_URL", None)  # parapipe run's default: an ephemeral server
    cmd = [sys.executable, os.path.abspath(__file__), "--arm", arm, "--out", out, "--result", result]
    t0 = time.time()
    proc = subprocess.Popen(cmd + (["--full"] if full else []), cwd=HERE, env=env)
    sampler = TreeSampler(proc.pid, interval)
    sampler.start()
    rc = proc.wait()
    t1 = time.time()
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise RuntimeError(f"the {arm} arm exited with {rc} (its output is above); outputs in {out}")
    with open(result) as f:
        got = json.load(f)
    return {**got, "process": [t0, t1], "samples": sampler.samples}


def stage_rows(m: dict) -> dict:
    """{row: (seconds, peak MiB, {group: MiB} at the peak, {group: CPU s})} for setup, each stage, teardown and the whole process."""
    w, (t0, t1) = m["windows"], m["process"]
    first, last = min(w[s][0] for s in STAGES), max(w[s][1] for s in STAGES)
    spans = {"setup": (t0, first), **{s: tuple(w[s]) for s in STAGES}, "teardown": (last, t1), "total": (t0, t1)}
    rows, samples = {}, m["samples"]
    near = lambda t: min(samples, key=lambda s: abs(s[0] - t))  # noqa: E731
    for name, (a, b) in spans.items():
        inside = [s for s in samples if a <= s[0] <= b] or [near(a)]
        peak = max(inside, key=lambda s: s[1])
        cpu = {g: near(b)[3][g] - near(a)[3][g] for g in GROUPS}
        rows[name] = (b - a, peak[1], peak[2], cpu)
    return rows


def print_table(orch: dict, direct: dict, full: bool) -> None:
    o, d = stage_rows(orch), stage_rows(direct)
    print(f"\npipeline, {'PipelineConfig() (make run)' if full else 'small config ' + json.dumps(SMALL)}")
    print(f"{'stage':11s} {'orchestrated s':>15s} {'direct s':>9s} {'overhead s (%)':>17s} "
          f"{'peak MiB orch':>14s} {'peak MiB direct':>16s} {'CPU s orch':>11s} {'CPU s direct':>13s}")
    for name in o:
        (so, mo, _, co), (sd, md, _, cd) = o[name], d[name]
        pct = f"({100 * (so - sd) / sd:+.0f}%)" if sd > 0.05 else ""
        print(f"{name:11s} {so:15.1f} {sd:9.1f} {so - sd:+9.1f} {pct:>7s} {mo:14.0f} {md:16.0f} "
              f"{sum(co.values()):11.1f} {sum(cd.values()):13.1f}")
    print("\norchestrated, by process group: RSS MiB at the stage's peak sample | CPU s in the stage")
    print(f"{'stage':11s} " + " ".join(f"{g:>8s}" for g in GROUPS) + " | " + " ".join(f"{g:>8s}" for g in GROUPS))
    for name, (_, _, rss, cpu) in o.items():
        print(f"{name:11s} " + " ".join(f"{rss[g]:8.0f}" for g in GROUPS) + " | "
              + " ".join(f"{cpu[g]:8.1f}" for g in GROUPS))
    w = orch["windows"]
    call0, call1 = orch["pipeline_call"]
    print(f"\norchestration outside the stages: pipeline() call -> flow run start {w['flow'][0] - call0:.1f} s "
          f"(ephemeral Prefect server start, flow run creation), record-config "
          f"{w['record-config'][1] - w['record-config'][0]:.1f} s, flow end -> pipeline() return "
          f"{call1 - w['flow'][1]:.1f} s, gaps between stages "
          f"{sum(w[b][0] - w[a][1] for a, b in zip(STAGES, STAGES[1:])):.1f} s (caching keys, result storage)")
    print(f"stage states: {orch['stages_state']}; samples every {orch.get('interval', '?')} s: "
          f"{len(orch['samples'])} orchestrated, {len(direct['samples'])} direct")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="make run's PipelineConfig() instead of the small config")
    ap.add_argument("--out", default=None, help="work folder (default: a new temporary folder, kept)")
    ap.add_argument("--order", default="direct,orchestrated",
                    help="the arms, in the order they run (comma-separated; one alone is allowed)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    ap.add_argument("--arm", choices=("orchestrated", "direct"), help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--redraw", nargs=2, metavar=("ORCHESTRATED_JSON", "DIRECT_JSON"),
                    help="print the table from two arms' <arm>.measured.json files (e.g. from separate runs)")
    a = ap.parse_args()
    if a.redraw:
        with open(a.redraw[0]) as f, open(a.redraw[1]) as g:
            print_table(json.load(f), json.load(g), a.full)
        return
    if a.arm:
        c = config(a.full, a.out)
        got = run_orchestrated(c) if a.arm == "orchestrated" else run_direct(c)
        with open(a.result, "w") as f:
            json.dump(got, f)
        return
    order = a.order.split(",")
    if not order or len(set(order)) != len(order) or not set(order) <= {"direct", "orchestrated"}:
        raise SystemExit(f"--order={a.order!r}: name each arm (direct, orchestrated) at most once, e.g. "
                         f"direct,orchestrated (one arm alone: its <arm>.measured.json, for --redraw)")
    work = os.path.abspath(a.out or tempfile.mkdtemp(prefix="parapipe-pipeline-bench-"))
    os.makedirs(work, exist_ok=True)
    runs = {}
    for arm in order:
        t0 = time.time()
        runs[arm] = measure(arm, a.full, work, a.interval)
        runs[arm]["interval"] = a.interval
        with open(os.path.join(work, f"{arm}.measured.json"), "w") as f:
            json.dump(runs[arm], f)  # windows and samples: --redraw prints the table from these files
        print(f"{arm}: {time.time() - t0:.0f} s", flush=True)
    if len(runs) == 2:
        print_table(runs["orchestrated"], runs["direct"], a.full)
    print(f"\nload average at the end: {os.getloadavg()} on {os.cpu_count()} CPUs; outputs in {work}")


if __name__ == "__main__":
    main()
