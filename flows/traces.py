"""`traces`: a reasoning trace for every sample of a dataset, resumable and auditable.

Finds the samples without an ok / filtered trace of this generator (failed ones are retried),
generates batch by batch (each batch committed before the next), marks post-filter failures,
and reports progress (done/total, samples/s, output tokens/s) as a Prefect artifact.
"""
from dataclasses import asdict

from prefect import flow
from prefect.artifacts import create_progress_artifact
from prefect.runtime import flow_run

from tasks.generators import GeneratorSpec
from tasks.traces import find_pending, generate_traces, generator_key


@flow(name="traces", log_prints=True)
def traces(root: str = "data", dataset: str = "toy-tiny", generator: dict | None = None, batch_size: int = 16,
           filters: dict | None = None, run_id: str | None = None, commit_every_s: float = 10.0) -> dict:
    spec = asdict(GeneratorSpec(**(generator or {})))  # validates; fills in the defaults
    key = generator_key(spec)
    pending = find_pending(root, dataset, key)
    progress = create_progress_artifact(0.0, key="traces-progress", description=f"{len(pending)} traces to write")
    stats = generate_traces(root, dataset, spec, pending, run_id or flow_run.get_name() or "manual",
                            batch_size, filters, progress, commit_every_s)
    print(f"{dataset}: generator {key} ({spec['kind']} {spec['model']}): {stats}")
    return {"pending": len(pending), **stats}
