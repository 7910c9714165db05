"""`aggregate`: editing / generation sources -> one validated, deduplicated samples table.

One task per source (read -> normalise -> validate -> deduplicate -> write, chunk by chunk), then a
summary. Bad records land in the quarantine table with a reason; the Prefect UI shows a progress
artifact while it runs and a summary table at the end. Re-running with the same dataset name
resumes: committed samples are skipped, never duplicated.
"""
from prefect import flow
from prefect.artifacts import create_progress_artifact

from tasks.aggregate import ingest_source, summarise

TOY_DEFAULT = [{"type": "toy", "name": "toy-tiny", "preset": "tiny", "n": 2000, "seed": 0}]


@flow(name="aggregate", log_prints=True)
def aggregate(sources: list[dict] | None = None, root: str = "data", dataset: str = "toy-tiny",
              resolution: int = 32, resize: str = "squash", min_side: int = 16, max_aspect: float = 3.0,
              near_duplicate_bits: int = 2) -> dict:
    """Writes `{root}/samples/run={dataset}` and `{root}/quarantine/run={dataset}`; returns the summary."""
    sources = sources or TOY_DEFAULT
    curate = dict(resolution=resolution, resize=resize, min_side=min_side, max_aspect=max_aspect,
                  near_duplicate_bits=near_duplicate_bits)
    progress = create_progress_artifact(0.0, key="aggregate-progress", description=f"aggregating {dataset}")
    per_source = []
    for i, spec in enumerate(sources):
        span = (100.0 * i / len(sources), 100.0 * (i + 1) / len(sources))
        per_source.append(ingest_source(spec, root, dataset, curate, progress, span))
    summary = summarise(root, dataset, per_source)
    print(f"{dataset}: {summary['samples']} samples, {summary['quarantined']} quarantined "
          f"{summary['quarantine_reasons']}")
    return summary
