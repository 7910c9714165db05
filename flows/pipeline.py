"""`pipeline`: the whole ParaPipe job on one dataset, stage by stage.

aggregate -> the reward model (a tiny CLIP fitted on the toy world) -> reasoning traces (the toy
teacher by default) -> SFT on Ray Train -> ParaRL on Ray actors -> evaluate SFT and ParaRL, parallel
and sequential decoding, on the pinned toy ParaBench -> a few examples a person can look at.

One frozen, validated `PipelineConfig` per run (a typed form in the Prefect UI), written to
`{out}/config.json` and the `runs` table. Every stage is a Prefect task whose cache key is the stage's
arguments, the code version and a fingerprint of its inputs (tasks/pipeline/stage_cache.py): a re-run skips
the stages whose inputs did not change (state `Cached`), and a crashed run redoes only from the
stage that crashed, which itself resumes (aggregation chunks, traces rows, SFT and ParaRL checkpoints,
stored evaluation outputs).
"""
import datetime as dt
import json
import os

from prefect import flow, task
from prefect.runtime import flow_run
from prefect.artifacts import create_markdown_artifact

from flows.aggregate import aggregate
from flows.evaluate import evaluate, label_of
from flows.pararl import pararl
from flows.sft import sft
from flows.traces import traces
from model.sampling import SamplerConfig
from tasks.common.generate import generate_examples_fn
from tasks.pipeline.pipeline_config import PipelineConfig
from tasks.pipeline.stage_cache import CACHED, fingerprint, run_stage, stage_key

generate_examples = task(generate_examples_fn, name="generate-examples")


@task(name="aggregate-stage", **CACHED)
def aggregate_stage(key: str, kw: dict) -> dict:
    return aggregate.with_options(persist_result=False)(**kw)


@task(name="fit-reward-stage", **CACHED)
def fit_reward_stage(key: str, out: str, preset: str, steps: int, seed: int) -> str:
    from tasks.pararl.fit_reward import fit_tiny_clip

    fit_tiny_clip(out, preset=preset, seed=seed, steps=steps, threads=None)  # alone on the machine: every core
    return out


@task(name="traces-stage", **CACHED)
def traces_stage(key: str, kw: dict) -> dict:
    return traces.with_options(persist_result=False)(**kw)


@task(name="sft-stage", **CACHED)
def sft_stage(key: str, kw: dict) -> dict:
    result = sft.with_options(persist_result=False)(**kw)
    return {"checkpoint": result["checkpoint"], "eval": result["eval"]}


@task(name="pararl-stage", **CACHED)
def pararl_stage(key: str, kw: dict) -> dict:
    result = pararl.with_options(persist_result=False)(**kw)
    return {"checkpoint": result["checkpoint"], "rounds": result["rounds"], "last": result["last"]}


@task(name="evaluate-stage", **CACHED)
def evaluate_stage(key: str, kw: dict) -> dict:
    result = evaluate.with_options(persist_result=False)(**kw)
    return {"items": result["items"], "markdown": result["markdown"], "reports": result["reports"],
            "table": {name: r["table"]["overall"] for name, r in result["results"].items()}}


@task(name="record-config")
def record_config(c: PipelineConfig) -> str:
    """The frozen config beside the outputs, so a checkpoint's config can be read back (record_run: `runs`)."""
    os.makedirs(c.out, exist_ok=True)
    path = os.path.join(c.out, "config.json")
    with open(path, "w") as f:
        json.dump(c.model_dump(mode="json"), f, indent=2)
    return path


@task(name="record-run")
def record_run(c: PipelineConfig, root: str, start: dt.datetime, states: dict, seconds: dict) -> str:
    """The finished run's row in the `runs` table: config, code version, start/end, each stage's state and seconds."""
    from tasks.common.runs import record, stage_row

    run_id = f"pipeline-{c.dataset}-{start:%Y%m%dT%H%M%S}"
    timings = {k: {"state": states[k], "seconds": seconds.get(k)} for k in states}
    record(root, stage_row(run_id, "pipeline", c.model_dump(mode="json"), start, timings))
    return run_id


@flow(name="pipeline", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    c = config
    root, recipe, out = os.path.join(c.out, "data"), c.resolved_recipe(), os.path.abspath(c.out)
    start = dt.datetime.now(dt.timezone.utc)
    record_config(c)
    states, seconds = {}, {}  # stage -> "ran" | "cached"; stage -> wall seconds
    sources = [{"type": "toy", "name": c.dataset, "preset": "tiny", "n": c.toy_samples or recipe.toy_samples,
                "seed": c.seed, "categories": list(recipe.categories or [])}]
    agg = dict(sources=sources, root=root, dataset=c.dataset, resolution=32)
    summary = run_stage(states, aggregate_stage, out, stage_key("aggregate", agg), agg,
                        must_exist=(os.path.join(root, "samples", f"run={c.dataset}"),), seconds=seconds)
    reward = run_stage(states, fit_reward_stage, out, stage_key("fit-reward", c.reward_steps, c.seed),
                       os.path.join(out, "reward"), "tiny", c.reward_steps, c.seed, seconds=seconds)
    tr = dict(root=root, dataset=c.dataset, generator={"kind": "teacher", "seed": c.seed})
    key = stage_key("traces", tr, fingerprint(root, "samples", c.dataset))
    trace_stats = run_stage(states, traces_stage, out, key, tr, seconds=seconds)
    # run ids carry the stage key: changed inputs start a fresh run, a crashed run resumes its own
    st = dict(root=root, dataset=c.dataset, out=os.path.join(out, "sft"), recipe=recipe, total_steps=c.sft_steps,
              num_workers=c.num_workers, use_gpu=c.gpu)
    key = stage_key("sft", st, fingerprint(root, "traces", c.dataset))
    trained = run_stage(states, sft_stage, out, key, {**st, "run_id": f"sft-{c.dataset}-{key[-8:]}"},
                        seconds=seconds)
    rl = dict(checkpoint=trained["checkpoint"], root=root, dataset=c.dataset, out=os.path.join(out, "rl"),
              config=c.rl, clip_folder=reward, use_gpu=c.gpu)
    key = stage_key("pararl", rl, fingerprint(trained["checkpoint"]), fingerprint(reward))
    tuned = run_stage(states, pararl_stage, out, key, {**rl, "run_id": f"rl-{c.dataset}-{key[-8:]}"},
                      seconds=seconds)
    ev = dict(checkpoints=[trained["checkpoint"], tuned["checkpoint"]], root=root, modes=list(c.eval_modes),
              sampler=recipe.sampler, limit=c.eval_limit, report_dir=os.path.join(out, "eval"),
              device="cuda" if c.gpu else "cpu")
    key = stage_key("evaluate", ev, fingerprint(trained["checkpoint"]), fingerprint(tuned["checkpoint"]))
    scores = run_stage(states, evaluate_stage, out, key, {**ev, "run_id": f"eval-{c.dataset}-{key[-8:]}"},
                       seconds=seconds)
    shown = generate_examples(tuned["checkpoint"], root, c.dataset, os.path.join(out, "examples"),
                              SamplerConfig(**recipe.sampler), n=c.examples, split="test", seed=c.seed,
                              device="cuda" if c.gpu else "cpu")
    links = {"sft": link_final(os.path.join(out, "sft", "final"), trained["checkpoint"]),
             "rl": link_final(os.path.join(out, "rl", "final"), tuned["checkpoint"])}
    record_run(c, root, start, states, seconds)
    create_markdown_artifact(scores["markdown"], key="pipeline-" + c.dataset.lower().replace("_", "-")[:80])
    return {"out": out, "root": os.path.abspath(root), "samples": summary["samples"],
            "quarantined": summary["quarantined"], "traces": trace_stats, "sft": trained, "rl": tuned,
            "eval": scores, "examples": shown, "reward": reward, "links": links, "stages": states, "seconds": seconds,
            "flow_run_id": str(flow_run.id), "config": os.path.join(out, "config.json")}


def link_final(link: str, target: str) -> str:
    """Points `link` (e.g. runs/default/sft/final) at a stage's final checkpoint with a relative symlink,
    replaced atomically: one path to pass to `parapipe rl / eval / generate` and to prefect.yaml, whatever run
    id the stage key gave the checkpoint. Returns the link, or the target where `link` is a real folder."""
    if os.path.exists(link) and not os.path.islink(link):
        print(f"warning: {link} exists and is not a link; use the checkpoint's own path {target}")
        return target
    tmp = f"{link}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.relpath(target, os.path.dirname(link)), tmp)
    os.replace(tmp, link)
    return link


def _checkpoint_line(r: dict, stage: str, rel) -> str:
    link, target = r.get("links", {}).get(stage, r[stage]["checkpoint"]), r[stage]["checkpoint"]
    return rel(link) if link == target else f"{rel(link)} (-> {rel(target)})"


METRIC_ABBREV = {"text_quality": "TQ", "text_alignment": "TA", "image_consistency": "IC", "image_alignment": "IA",
                 "image_quality": "IQ", "output_alignment": "OA", "overall": "overall"}


def _traces_line(samples: int, t: dict) -> str:
    """Dataset totals (a resumed run may write few or none of the traces) and this run's own rows."""
    missing = t.get("without_trace", t.get("failed", 0))
    return (f"traces: {samples - missing} of {samples} samples have one; this run wrote ok {t.get('ok', 0)}, "
            f"failed {t.get('failed', 0)}")


def summary_text(r: dict) -> str:
    """What a person reads at the end of `parapipe run`: scores, where everything is, how to look at it."""
    rel = lambda p: os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p  # noqa: E731
    stages = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
    text = r["sft"]["eval"].get("text_correct", {}).get("overall", {}).get("model")
    minutes = ", ".join(f"{k} {v / 60:.1f}" for k, v in r.get("seconds", {}).items())
    lines = [f"ParaPipe run finished in {rel(r['out'])} (config: {rel(r['config'])})", f"stages: {stages}",
             f"minutes per stage: {minutes}",
             f"{r['samples']} samples, {r['quarantined']} quarantined; {_traces_line(r['samples'], r['traces'])}", "",
             f"toy ParaBench, {r['eval']['items']} items, exact judge (0-100; TQ/TA text quality/alignment, "
             "IC/IA/IQ image consistency/alignment/quality, OA output alignment):",
             f"  {'checkpoint (decoding)':24s} " + " ".join(f"{a:>7s}" for a in METRIC_ABBREV.values())]
    names = {label_of(r["sft"]["checkpoint"]): "SFT", label_of(r["rl"]["checkpoint"]): "ParaRL"}
    for name, row in r["eval"]["table"].items():
        ckpt, _, mode = name.rpartition(" (")
        label = f"{names.get(ckpt, ckpt)} ({mode}"
        lines.append(f"  {label[:24]:24s} " + " ".join(
            f"{row[m]:7.1f}" if row.get(m) is not None else f"{'-':>7s}" for m in METRIC_ABBREV))
    if text is not None:
        lines.append(f"SFT held-out check: reasoning text right {100 * text:.0f}% of the time")
    lines += ["", "outputs:", f"  lake (Parquet)     {rel(r['root'])}",
              f"  SFT checkpoint     {_checkpoint_line(r, 'sft', rel)}",
              f"  ParaRL checkpoint  {_checkpoint_line(r, 'rl', rel)}",
              f"  reports (PNG)      {rel(os.path.dirname(r['eval']['reports'][-1]))}/",
              f"  examples           {rel(os.path.join(r['out'], 'examples'))}/", "",
              "inspect with DuckDB:",
              f"  .venv/bin/parapipe query --root {rel(r['root'])} \"SELECT * FROM eval_results WHERE metric LIKE "
              f"'%/overall'\"",
              f"  .venv/bin/parapipe inspect --root {rel(r['root'])}",
              "Prefect UI on this run: .venv/bin/prefect server start, then open "
              f"http://127.0.0.1:4200/runs/flow-run/{r['flow_run_id']}"]
    return "\n".join(lines)
