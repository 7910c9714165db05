"""`traces`: a reasoning trace for every sample of a dataset, resumable and auditable.

Finds the samples without an ok / filtered trace of this generator (failed ones are retried),
generates batch by batch (each batch committed before the next), marks post-filter failures,
and reports progress (done/total, ok / filtered / failed, samples/s, output tokens/s) as a Prefect
progress artifact keyed by this flow run. The run ends Failed, with the counts, when more than
`max_failed_fraction` of the rows it wrote failed (every row failing always fails the run).
"""
import re
from dataclasses import asdict

from prefect import flow
from prefect.artifacts import create_progress_artifact
from prefect.runtime import flow_run

from tasks.common.runs import recorded
from tasks.traces.generators import GeneratorSpec
from tasks.traces.traces import find_pending, generate_traces, generator_key

MAX_FAILED_FRACTION = 0.25


class TracesFailed(RuntimeError):
    """Too many traces of one run failed; their rows (with the errors) are committed."""


def progress_key(stage: str) -> str:
    """A progress artifact key per flow run (artifact keys: lowercase letters, digits and dashes)."""
    name, run_id = flow_run.get_name() or "manual", (flow_run.get_id() or "")[:8]
    return re.sub(r"[^a-z0-9-]+", "-", f"{stage}-progress-{name}-{run_id}".lower()).strip("-")


def check_failures(stats: dict, max_failed_fraction: float) -> None:
    """Raises TracesFailed when the failed share of the rows written passes the threshold."""
    done = stats["ok"] + stats["filtered"] + stats["failed"]
    if done and (stats["failed"] == done or stats["failed"] > max_failed_fraction * done):
        raise TracesFailed(f"{stats['failed']} of {done} traces failed (more than max_failed_fraction="
                           f"{max_failed_fraction}); the failed rows and their errors are in the traces table "
                           f"(status 'failed'), e.g. `parapipe query \"SELECT error, count(*) FROM traces WHERE "
                           f"status = 'failed' GROUP BY error\"`; fix the cause and re-run to retry only them")


@flow(name="traces", log_prints=True)
def traces(root: str = "data", dataset: str = "toy-tiny", generator: dict | None = None, batch_size: int = 16,
           filters: dict | None = None, run_id: str | None = None, commit_every_s: float = 10.0,
           max_failed_fraction: float = MAX_FAILED_FRACTION) -> dict:
    """max_failed_fraction: the run fails when more than this share of its rows failed (0 fails on any)."""
    if not 0.0 <= max_failed_fraction <= 1.0:
        raise ValueError(f"max_failed_fraction={max_failed_fraction} must be in [0, 1]")
    spec = asdict(GeneratorSpec(**(generator or {})))  # validates; fills in the defaults
    key = generator_key(spec)
    pending = find_pending(root, dataset, key)
    if pending:
        progress = create_progress_artifact(0.0, key=progress_key("traces"),
                                            description=f"{len(pending)} traces to write")
    else:
        progress = None
        create_progress_artifact(100.0, key=progress_key("traces"),
                                 description=f"nothing to do: every sample of {dataset} has a trace of generator {key}")
    run = run_id or flow_run.get_name() or "manual"
    config = {"dataset": dataset, "generator": spec, "filters": filters,
              "batch_size": batch_size, "pending": len(pending)}
    with recorded(root, run, "traces", config) as timings:
        stats = generate_traces(root, dataset, spec, pending, run, batch_size, filters, progress, commit_every_s)
        timings.update(stats)  # rows ok / filtered / failed beside the seconds
        print(f"{dataset}: generator {key} ({spec['kind']} {spec['model']}): {stats}")
        check_failures(stats, max_failed_fraction)
    missing = len(find_pending(root, dataset, key)) if pending else 0  # dataset totals, not only this run's rows
    return {"pending": len(pending), **stats, "without_trace": missing}
