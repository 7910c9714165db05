"""Skipping pipeline stages whose inputs did not change, with Prefect's own task caching.

Each stage of flows/pipeline.py is a task with `cache_key_fn` = its `key` argument and a JSON result
persisted under the run's folder. `stage_key` hashes the stage name, its arguments, the code version
(every .py file of the package) and fingerprints of its inputs: a table partition's commit manifest
(local or S3), or a folder's file names, sizes and mtimes. Same key -> Prefect returns the stored
result (state `Cached`) without running the stage. `run_stage` reruns a cached stage whose output
folder has since been deleted.
"""
import hashlib
import json
import os
import time


PACKAGES = ("flows", "tasks", "model", "rl", "storage")
HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: tasks/pipeline/ -> ../..


def _key_param(_context, parameters: dict) -> str:
    return parameters["key"]


CACHED = dict(cache_key_fn=_key_param, persist_result=True, result_serializer="json")


def code_version() -> str:
    """sha256 over the package's source files (names and bytes), 12 hex digits."""
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for folder, dirs, files in sorted(os.walk(os.path.join(HERE, pkg))):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, HERE).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:12]


def fingerprint(path: str, table: str | None = None, run: str | None = None) -> str:
    """A table partition's commit manifest (path = the lake root), or a local folder's files."""
    if table is not None:
        from storage.parquet import read_manifest

        return hashlib.sha256(json.dumps(read_manifest(path, table, run), sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(folder, name))
            h.update(f"{os.path.relpath(os.path.join(folder, name), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def stage_key(stage: str, *inputs) -> str:
    blob = json.dumps([stage, code_version(), *inputs], sort_keys=True, default=repr)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def _outputs(result) -> list[str]:
    if isinstance(result, str):
        return [result]
    return [result["checkpoint"]] if isinstance(result, dict) and "checkpoint" in result else []


def run_stage(states: dict, stage_task, out: str, key: str, *args, must_exist: tuple[str, ...] = (),
              seconds: dict | None = None):
    """Runs (or takes from the cache under {out}/.cache) one stage and records in `states` whether it ran
    or came from the cache (and in `seconds` its wall time); a cached result whose checkpoint or
    `must_exist` paths are gone is recomputed."""
    from prefect.filesystems import LocalFileSystem

    t0 = time.perf_counter()
    base = os.path.join(os.path.abspath(out), ".cache", "stages")
    name = "parapipe-" + hashlib.sha256(base.encode()).hexdigest()[:16]  # Prefect needs a saved block
    LocalFileSystem(basepath=base).save(name, overwrite=True)
    options = dict(result_storage=f"local-file-system/{name}")
    state = stage_task.with_options(**options)(key, *args, return_state=True)
    result = state.result()
    if state.name == "Cached" and any(not os.path.exists(p) for p in (*_outputs(result), *must_exist)):
        state = stage_task.with_options(**options, refresh_cache=True)(key, *args, return_state=True)
        result = state.result()
    name = stage_task.name.removesuffix("-stage")
    states[name] = "cached" if state.name == "Cached" else "ran"
    if seconds is not None:
        seconds[name] = round(time.perf_counter() - t0, 1)
    return result
