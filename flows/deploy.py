"""Deployment helpers for `prefect.yaml`: the work pools it names, and its pull step.

`prefect deploy --all` refuses a deployment whose work pool does not exist, and Prefect runs a
`prefect.yaml`'s build steps only after that check, so the pools are made beforehand by one command:

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy pools    # or: make pools

It creates each missing pool and leaves existing ones (and their settings) alone. Both pools are
Prefect *process* pools: a worker on the machine (or, for parapipe-gpu, on a Ray cluster's head node)
runs each flow in a subprocess. prefect.yaml documents the job variables and the Kubernetes variant.

`enter_home` is prefect.yaml's pull step: a worker's flow-run process starts in a temporary folder,
and this step moves it into the ParaPipe checkout (PARAPIPE_HOME) so entrypoints such as
`flows/aggregate.py:aggregate` and relative paths such as `data/` resolve there.
"""
import os
import sys

POOLS = {
    "parapipe-local": "ParaPipe on one machine: a process worker runs each flow in a subprocess (CPU or local GPUs).",
    "parapipe-gpu": "ParaPipe on a GPU cluster: a process worker on the Ray head node (RAY_ADDRESS, S3 lake); "
                    "see prefect.yaml for the job variables and the Kubernetes variant.",
}
HOME_VAR = "PARAPIPE_HOME"


def ensure_pools(pools: dict[str, str] = POOLS) -> list[str]:
    """Creates every missing work pool as a process pool; returns one line per pool saying what happened.

    Raises:
        RuntimeError: PREFECT_API_URL is unset (the pools would land in a throwaway ephemeral server).
    """
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings
    from prefect.workers.process import ProcessWorker

    api = get_current_settings().api.url
    if not api:
        raise RuntimeError("PREFECT_API_URL is not set, so there is no server to create the work pools on: start one "
                           "with `prefect server start` and run `prefect config set "
                           "PREFECT_API_URL=http://127.0.0.1:4200/api` (or export it) first")
    lines = []
    with get_client(sync_client=True) as client:
        for name, description in pools.items():
            try:
                pool = client.read_work_pool(name)
                lines.append(f"work pool {name!r} exists (type {pool.type}); left as it is")
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", description=description,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                lines.append(f"work pool {name!r} created (type process) on {api}")
    return lines


def enter_home() -> dict:
    """prefect.yaml's pull step: chdir into PARAPIPE_HOME, or into this checkout when it is unset.

    Returns {"directory": the folder}, like Prefect's own set_working_directory step.

    Raises:
        FileNotFoundError: PARAPIPE_HOME names no ParaPipe checkout, or it is unset and this module is
            not running from one (a non-editable install).
    """
    home = os.environ.get(HOME_VAR)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if home is None and os.path.isfile(os.path.join(here, "prefect.yaml")):
        home = here
    if home is None or not os.path.isfile(os.path.join(home, "flows", "pipeline.py")):
        raise FileNotFoundError(
            f"{HOME_VAR}={home!r} is not a ParaPipe checkout (no flows/pipeline.py there): set {HOME_VAR} to the "
            f"folder holding prefect.yaml in the environment of the worker, e.g. "
            f"`{HOME_VAR}=/path/to/parapipe prefect worker start --pool parapipe-local`")
    os.chdir(home)
    return {"directory": home}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["pools"]:
        print("usage: python -m flows.deploy pools   (creates the work pools prefect.yaml uses)", file=sys.stderr)
        return 2
    for line in ensure_pools():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
