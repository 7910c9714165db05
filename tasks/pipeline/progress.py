"""Terminal progress bars for long stages: tqdm on stderr, with rate and ETA.

Shown when stderr is a terminal (or PARAPIPE_PROGRESS=1), hidden in logs and tests (PARAPIPE_PROGRESS=0
forces them off). Ray Train workers cannot draw on the driver's terminal, so rank 0 writes its step to a
small JSON file (`write_step`) and the driver follows it (`follow_steps`).
"""
import json
import os
import sys
import threading
import time


def enabled() -> bool:
    flag = os.environ.get("PARAPIPE_PROGRESS")
    return flag == "1" if flag in ("0", "1") else sys.stderr.isatty()


def bar(desc: str, total: int | None, unit: str = "it", initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True,
                disable=not enabled(), leave=True, smoothing=0.1)


def write_step(path: str, step: int, total: int, **extra) -> None:
    """Atomically records a worker's progress (rank 0 of an SFT run)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "total": total, **extra}, f)
    os.replace(tmp, path)


def follow_steps(path: str, desc: str, total: int, interval_s: float = 1.0):
    """A bar that follows write_step's file from a background thread; returns a stop() function."""
    b, stop = bar(desc, total, unit="step"), threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                with open(path) as f:
                    s = json.load(f)
            except (OSError, ValueError):
                continue
            b.update(max(0, s["step"] - b.n))
            if "loss" in s:
                b.set_postfix(loss=f"{s['loss']:.3f}", refresh=False)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def done() -> None:
        stop.set()
        thread.join()
        b.close()

    return done


QUIET_ENV = {  # Prefect's console handlers (the UI still gets every log line through the API handler)
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL": "WARNING",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PARAPIPE_QUIET": "1",
}


def quiet_internals() -> None:
    """Call before importing prefect: progress bars and warnings on the terminal, Ray and Prefect chatter off."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def ray_init_kwargs() -> dict:
    """ray.init options: in quiet mode no worker log forwarding (failures still raise with their traceback)."""
    import logging

    return dict(log_to_driver=False, logging_level=logging.ERROR) if os.environ.get("PARAPIPE_QUIET") == "1" else {}


def start_ray(num_cpus: int | None, **options) -> None:
    """Joins the cluster RAY_ADDRESS names, else starts a private local one: never silently attaches to
    some other `ray start` cluster on this machine (which refuses num_cpus and shares its resources)."""
    import ray

    if ray.is_initialized():
        return
    options = {**options, **ray_init_kwargs(), "ignore_reinit_error": True}
    if os.environ.get("RAY_ADDRESS"):
        options.pop("include_dashboard", None)
        ray.init(address=os.environ["RAY_ADDRESS"], **options)
    else:
        ray.init(address="local", num_cpus=num_cpus, **options)
