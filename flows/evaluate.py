"""`evaluate`: a checkpoint on a benchmark, ParaBench's six metrics, a Table 2 report.

benchmark (the pinned toy ParaBench, stored once under the root; or a local ParaBench folder) ->
per decoding mode: outputs (kept in eval_outputs; a re-run samples only what is missing, so judging
can be redone without resampling) -> judgments (eval_judgments, keyed by judge version) ->
aggregates by metric and category / kind (eval_results) -> a table artifact in the paper's Table 2
layout with its published rows beside ours.
"""
import datetime as dt
import json
import os
import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.common.runs import recorded
from tasks.evaluate.judges import METRICS, EvalOutput

TOY_BENCHMARK = "toy-parabench"


@task(name="load-benchmark", persist_result=False)
def load_benchmark(root: str, benchmark: str, preset: str = "tiny", columns: dict | None = None) -> list:
    """toy-parabench (built once with the pinned seed, then read back) or a local ParaBench folder."""
    from tasks.evaluate.parabench import build_toy_parabench, read_benchmark, read_parabench, write_benchmark

    if benchmark == TOY_BENCHMARK:
        try:
            return read_benchmark(root, benchmark)
        except FileNotFoundError:
            write_benchmark(root, benchmark, build_toy_parabench(preset))
            return read_benchmark(root, benchmark)
    if os.path.isdir(benchmark):
        return read_parabench(benchmark, columns)
    raise ValueError(f"benchmark={benchmark!r} is neither {TOY_BENCHMARK!r} nor a local ParaBench folder; "
                     f"download tyfeld/ParaBench to a folder and pass its path")


def _bench_name(benchmark: str) -> str:
    return benchmark if benchmark == TOY_BENCHMARK else os.path.basename(os.path.normpath(benchmark))


@task(name="sample-outputs", persist_result=False)
def sample_outputs(checkpoint: str, items: list, root: str, run_id: str, bench: str, mode: str, seed: int,
                   sampler: dict, batch_size: int, device: str = "auto", dtype: str = "auto") -> list:
    """Outputs for every item in this mode; those already stored for (run, mode, seed) are reused."""
    import pyarrow.compute as pc

    from model.sampling import SamplerConfig
    from storage.parquet import read_table, write_rows
    from tasks.evaluate.evaluate import sample_items

    tbl = read_table(root, "eval_outputs", run=run_id, filter=(pc.field("mode") == mode) &
                     (pc.field("seed") == seed) & (pc.field("benchmark") == bench))
    stored = tbl.to_pylist()
    others = {r["checkpoint"] for r in stored if os.path.realpath(r["checkpoint"]) != os.path.realpath(checkpoint)}
    if others:  # reusing them would score that checkpoint's outputs as this one's
        raise ValueError(f"eval run {run_id!r} already holds {mode} outputs of checkpoint {sorted(others)[0]!r}; "
                         f"pass a new run_id (--run-id) to evaluate {checkpoint!r}")
    have = {r["item_id"]: EvalOutput(r["item_id"], r["text"] or "", r["image"], r["error"]) for r in stored}
    todo = [i for i in items if i.item_id not in have]
    if todo:
        cfg = SamplerConfig(**{**sampler, "mode": mode})
        outs, nfe = sample_items(checkpoint, todo, cfg, seed=seed, batch_size=batch_size, device=device, dtype=dtype)
        now = dt.datetime.now(dt.timezone.utc)
        write_rows(root, "eval_outputs", [
            {"run_id": run_id, "benchmark": bench, "item_id": o.item_id, "mode": mode, "seed": seed,
             "checkpoint": checkpoint, "kind": i.kind, "category": i.category, "instruction": i.instruction,
             "text": o.text, "image": o.image, "error": o.error, "nfe": n, "time": now}
            for i, o, n in zip(todo, outs, nfe)], run=run_id)
        have.update({o.item_id: o for o in outs})
    print(f"{mode}: {len(items) - len(todo)} outputs reused, {len(todo)} sampled")
    return [have[i.item_id] for i in items]


@task(name="judge-outputs", persist_result=False)
def judge_outputs(items: list, outputs: list, judge_name: str, root: str, run_id: str, bench: str, mode: str,
                  seed: int, judge_args: dict | None) -> list:
    from storage.parquet import write_rows

    import time

    judge = _judge(judge_name, items, judge_args)
    t0 = time.perf_counter()
    judgments = judge.judge(items, outputs)
    seconds = time.perf_counter() - t0
    now = dt.datetime.now(dt.timezone.utc)
    write_rows(root, "eval_judgments", [
        {"run_id": run_id, "benchmark": bench, "item_id": i.item_id, "mode": mode, "seed": seed, "judge": j.judge,
         "judge_version": j.version, "kind": i.kind, "category": i.category,
         **{m: j.scores.get(m) for m in METRICS}, "overall": _overall(j), "failed": j.failed, "reason": j.reason,
         "time": now} for i, j in zip(items, judgments)], run=run_id)
    failed = sum(j.failed for j in judgments)
    print(f"{mode}: judged {len(judgments)} outputs with {judge.name} v{judge.version} in {seconds:.2f} s "
          f"({len(judgments) / max(seconds, 1e-9):.0f} samples/s); {failed} failed")
    return judgments


def _overall(j) -> float | None:
    from tasks.evaluate.judges import overall

    return None if j.failed else overall(j.scores)


def _judge(name: str, items: list, args: dict | None):
    if name == "exact":
        from tasks.evaluate.judge_exact import ExactToyJudge

        presets = {i.extra.get("preset") for i in items}
        if None in presets or len(presets) != 1:
            raise ValueError("judge='exact' scores toy-world items only; use judge='vlm' on other benchmarks")
        return ExactToyJudge(presets.pop())
    if name == "vlm":
        from tasks.evaluate.judge_vlm import VLMJudge

        if not args:
            raise ValueError("judge='vlm' needs judge_args={'base_url': ..., 'model': ...} (any OpenAI-compatible "
                             "server)")
        return VLMJudge(**args)
    if name == "clip":
        from tasks.evaluate.judge_clip import ClipProxyJudge

        return ClipProxyJudge(**(args or {}))
    raise ValueError(f"judge={name!r}; choose 'exact' (toy world), 'vlm' (OpenAI-compatible server) or 'clip' "
                     f"(CLIP-score proxies)")


def write_grid(items: list, outputs: list, judgments: list, path: str, n: int) -> str:
    """The first n items per kind (edits, then generations) as a PNG grid of sample outputs."""
    from tasks.evaluate.eval_report import sample_grid

    pick = [k for kind in ("edit", "generate") for k in [i for i, it in enumerate(items) if it.kind == kind][:n // 2]]
    rows = [{"instruction": items[k].instruction, "input_image": items[k].input_image,
             "output_image": outputs[k].image, "target_image": items[k].target_image, "text": outputs[k].text,
             "scores": judgments[k].scores, "failed": judgments[k].failed, "reason": judgments[k].reason} for k in pick]
    return sample_grid(rows, path)


def table2_markdown(rows: dict, title: str) -> str:
    """The paper's Table 2 layout: ours (one row per mode) under its published rows."""
    from tasks.evaluate.evaluate import PAPER_TABLE2

    head = "| model | " + " | ".join(m.replace("_", " ") for m in METRICS) + " | overall |"
    lines = [f"# {title}", "", head, "|---" * (len(METRICS) + 2) + "|"]
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    for name, vals in rows.items():
        lines.append(f"| **{name}** | " + " | ".join(fmt(vals.get(m)) for m in (*METRICS, "overall")) + " |")
    for name, vals in PAPER_TABLE2.items():
        lines.append(f"| {name} (paper, real ParaBench) | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


DEFAULT_SAMPLER = {"steps": 20, "image_steps": 10, "text_block_length": 1 << 30, "text_temperature": 0.0,
                   "image_temperature": 0.0, "image_noise": 0.0}  # the toy recipe's timeline, greedy


def same_settings(root: str, run_id: str, config: dict) -> None:
    """A run id's stored outputs are reused by (item, mode, seed): refuse to mix in other sampling settings."""
    import pyarrow.compute as pc

    from storage.parquet import read_table

    rows = read_table(root, "runs", filter=(pc.field("run_id") == run_id) & (pc.field("stage") == "eval")).to_pylist()
    if not rows:
        return
    last = json.loads(max(rows, key=lambda r: r["start_time"])["config_json"])
    now = json.loads(json.dumps({k: config[k] for k in ("sampler", "dtype")}))
    was = {"sampler": last.get("sampler"), "dtype": last.get("dtype", "float32")}
    if was != now:
        raise ValueError(f"eval run {run_id!r} was sampled with {was}; these settings are {now}. Its stored outputs "
                         f"would be reused, so pass a new run_id (--run-id) to compare settings")


def label_of(checkpoint: str) -> str:
    """A short name: the folder, with its parent when the folder name is generic (final, round-NNNNN)."""
    parts = os.path.normpath(checkpoint).split(os.sep)
    generic = parts[-1] == "final" or parts[-1].startswith("round-")
    return "/".join(parts[-2:]) if generic and len(parts) > 1 else parts[-1]


def score_checkpoint(checkpoint: str, items: list, root: str, run_id: str, bench: str, mode: str, seed: int,
                     sampler: dict, batch_size: int, judge: str, judge_args: dict | None, grid: str, n: int,
                     device: str = "auto", dtype: str = "auto") -> dict:
    """Outputs -> judgments -> aggregates (written to eval_results) and a sample grid for one checkpoint and mode."""
    from storage.parquet import write_rows
    from tasks.evaluate.evaluate import aggregate

    outputs = sample_outputs(checkpoint, items, root, run_id, bench, mode, seed, sampler, batch_size, device, dtype)
    judgments = judge_outputs(items, outputs, judge, root, run_id, bench, mode, seed, judge_args)
    agg = aggregate(items, outputs, judgments)
    write_rows(root, "eval_results", [
        {"run_id": run_id, "checkpoint": checkpoint, "step": None, "suite": f"{bench}/{judge}/{mode}",
         "metric": f"{m}/{g}", "value": v, "num_samples": agg["counts"][g]["items"]}
        for g, vals in agg["table"].items() for m, v in vals.items() if v is not None], run=run_id)
    return {**agg, "grid": write_grid(items, outputs, judgments, grid, n)}


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoints: list[str], benchmark: str = TOY_BENCHMARK, root: str = "data", run_id: str = "eval",
             modes: list[str] = ("parallel",), judge: str = "exact", seed: int = 0, sampler: dict | None = None,
             batch_size: int = 16, limit: int | None = None, judge_args: dict | None = None,
             columns: dict | None = None, report_dir: str | None = None, grid_items: int = 12,
             device: str = "auto", dtype: str = "auto") -> dict:
    """Every checkpoint x decoding mode on one benchmark, side by side: the ablations are one call
    (SFT vs ParaRL checkpoints, trajectory vs output-level runs, K, parallel vs sequential).
    device / dtype: "auto" samples on cuda in bf16 when torch sees a GPU, else on cpu in fp32."""
    from tasks.common.generate import inference_device

    device, weights = inference_device(device, dtype)  # a wrong value fails here, before any work
    checkpoints = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints)
    for c in checkpoints:
        if not os.path.isfile(os.path.join(c, "config.json")):
            raise ValueError(f"checkpoint {c!r} is not a checkpoint folder (no config.json)")
    bad = [m for m in modes if m not in ("parallel", "sequential")]
    if bad:
        raise ValueError(f"modes={list(modes)}: {bad} unknown; use parallel and/or sequential")
    items = load_benchmark(root, benchmark, columns=columns)[:limit]
    bench, sampler = _bench_name(benchmark), sampler or DEFAULT_SAMPLER
    report_dir = report_dir or os.path.join("runs", "eval", run_id)
    os.makedirs(report_dir, exist_ok=True)
    results, pngs = {}, []
    shown_args = {k: v for k, v in (judge_args or {}).items() if k != "api_key"}  # no credentials in tables
    config = {"checkpoints": checkpoints, "benchmark": benchmark, "items": len(items), "modes": list(modes),
              "judge": judge, "judge_args": shown_args, "seed": seed, "sampler": sampler, "batch_size": batch_size,
              "device": device, "dtype": str(weights).removeprefix("torch.")}
    same_settings(root, run_id, config)
    with recorded(root, run_id, "eval", config) as timings:
        for c in checkpoints:
            run = run_id if len(checkpoints) == 1 else f"{run_id}-{label_of(c).replace('/', '-')}"
            for mode in modes:
                name = f"{label_of(c)} ({mode})"
                grid = os.path.join(report_dir, f"samples-{label_of(c).replace('/', '-')}-{mode}.png")
                t0 = time.perf_counter()
                results[name] = score_checkpoint(c, items, root, run, bench, mode, seed, sampler, batch_size, judge,
                                                 judge_args, grid, grid_items, device, dtype)
                timings[f"{name}_s"] = round(time.perf_counter() - t0, 3)
                pngs.append(results[name]["grid"])
    from tasks.evaluate.eval_report import metric_chart
    from tasks.pipeline.ui_artifacts import embed_pngs

    rows = {name: r["table"]["overall"] for name, r in results.items()}
    pngs.append(metric_chart(rows, os.path.join(report_dir, "metrics.png"), f"{bench} ({judge} judge)"))
    md = table2_markdown(rows, f"{bench} ({judge} judge, seed {seed}, {len(items)} items)")
    md += "\n\nreport files: " + ", ".join(f"`{os.path.abspath(p)}`" for p in pngs)
    counts = {name: r["counts"]["overall"] for name, r in results.items()}
    shown = embed_pngs([("metrics", pngs[-1])] + [(f"samples: {n}", r["grid"]) for n, r in results.items()])
    create_markdown_artifact(md + f"\n\nfailures: `{json.dumps(counts)}`\n\n" + "\n\n".join(shown),
                             key="eval-" + "".join(ch if ch.isalnum() else "-" for ch in run_id.lower())[:90])
    print(md)
    return {"items": len(items), "results": results, "markdown": md, "reports": pngs}
