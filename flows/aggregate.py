"""`aggregate`: editing / generation sources -> one validated, deduplicated samples table.

One task per source (read -> normalise -> validate -> deduplicate -> write, chunk by chunk), then a
summary. Bad records land in the quarantine table with a reason; the Prefect UI shows a progress
artifact while it runs and a summary table at the end. Re-running with the same dataset name
resumes: committed samples are skipped, never duplicated. Every source is checked before any is read
(a broken configuration fails at once); a source that still fails (storage, a bug) does not stop
the sources after it: the flow ingests them, summarises, then fails naming the failed sources.
"""
from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.aggregate.aggregate import ingest_source, summarise
from tasks.aggregate.sources import SourceSpec, check_source
from tasks.common.runs import recorded
from tasks.pipeline.ui_artifacts import run_key

TOY_DEFAULT = [{"type": "toy", "name": "toy-tiny", "preset": "tiny", "n": 2000, "seed": 0}]


def check_sources(sources: list[dict]) -> None:
    """Raises on an unknown key or type, a missing path or mapping, or two sources with one name."""
    names = []
    for spec in map(SourceSpec.from_dict, sources):
        check_source(spec)
        names.append(spec.name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"sources {repeated} are named more than once; give each source a distinct name "
                         f"(its records are keyed by source name and file:line)")


@flow(name="aggregate", log_prints=True)
def aggregate(sources: list[dict] | None = None, root: str = "data", dataset: str = "toy-tiny",
              resolution: int = 32, resize: str = "squash", min_side: int = 16, max_aspect: float = 3.0,
              near_duplicate_bits: int = 2, max_pixels: int = 40_000_000) -> dict:
    """Writes `{root}/samples/run={dataset}` and `{root}/quarantine/run={dataset}`; returns the summary.

    summary["sources"] holds one dict per source: {source, read, accepted, already_present, quarantined,
    reasons, samples_per_s, status}, with read = accepted + already_present + quarantined and status "ok"
    or "failed: <error>".
    """
    sources = sources or TOY_DEFAULT
    check_sources(sources)
    curate = dict(resolution=resolution, resize=resize, min_side=min_side, max_aspect=max_aspect,
                  near_duplicate_bits=near_duplicate_bits, max_pixels=max_pixels)
    progress = create_progress_artifact(0.0, key=run_key("aggregate", dataset, "progress"),
                                        description=f"aggregating {dataset}")
    config = {"dataset": dataset, "sources": sources, **curate}
    with recorded(root, dataset, "aggregate", config) as timings:
        per_source = []
        for i, spec in enumerate(sources):
            span = (100.0 * i / len(sources), 100.0 * (i + 1) / len(sources))
            state = ingest_source(spec, root, dataset, curate, progress, span, return_state=True)
            per_source.append(_source_row(spec, state))
        summary = summarise(root, dataset, per_source)
        timings.update(samples=summary["samples"], quarantined=summary["quarantined"],
                       accepted=sum(s["accepted"] for s in per_source))
        for s in per_source:
            print(f"{s['source']}: read {s['read']}, accepted {s['accepted']}, already present {s['already_present']}, "
                  f"quarantined {s['quarantined']} ({s['reasons']}) - {s['status']}")
        print(f"{dataset}: {summary['samples']} samples, {summary['quarantined']} quarantined "
              f"{summary['quarantine_reasons']}")
        failed = [s for s in per_source if s["status"] != "ok"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(sources)} sources failed: "
                               + "; ".join(f"{s['source']}: {s['status']}" for s in failed))
    new = sum(s["accepted"] for s in per_source)
    update_progress_artifact(progress, 100.0, description=f"{dataset}: {new} new samples, {summary['samples']} in all"
                             + ("" if new else " (nothing to do: every sample was already present)"))
    return summary


def _source_row(spec: dict, state) -> dict:
    if state.is_completed():
        return {**state.result(), "status": "ok"}
    try:
        state.result()
        error = state.message or "failed"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"source": spec.get("name", spec.get("type")), "read": 0, "accepted": 0, "already_present": 0,
            "quarantined": 0, "reasons": "-", "samples_per_s": 0.0, "status": f"failed: {error}"}
