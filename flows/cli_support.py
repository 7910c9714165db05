"""What `parapipe` checks and prints before and after a flow runs, with no heavy imports (no prefect, torch, ray).

Holds: `CLIError` (a user-facing one-line error: what, which value, the fix), the default storage root, checks that a
root / dataset / checkpoint exists (listing what does exist), JSON-or-YAML options given as text or as a file (errors
name the option), and human formatting of the flows' summary dicts and of `parapipe run`'s closing report.
Leaves out: the parser and the subcommands (flows/cli.py), SQL output (storage/query.py).
"""
import glob
import json
import math
import os

ROOT_ENV = "PARAPIPE_ROOT"
RUN_ROOT = os.path.join("runs", "default", "data")  # where `make run` / `parapipe run` write
PLAIN_ROOT = "data"


class CLIError(ValueError):
    """A mistake in what the user asked for: printed as one line (no traceback without --debug), exit code 2."""


# ------------------------------------------------------------------------------------------------ storage root

def default_root() -> tuple[str, str]:
    """(root, why): $PARAPIPE_ROOT if set, else runs/default/data if `make run` wrote it here, else data."""
    if os.environ.get(ROOT_ENV):
        return os.environ[ROOT_ENV], f"${ROOT_ENV}"
    if os.path.isdir(RUN_ROOT):
        return RUN_ROOT, f"{RUN_ROOT} exists"
    return PLAIN_ROOT, "default"


def found_roots() -> list[str]:
    """Folders near the working directory that look like ParaPipe roots (hold a samples/ or traces/ table)."""
    cands = [os.environ.get(ROOT_ENV, ""), PLAIN_ROOT, *sorted(glob.glob(os.path.join("runs", "*", "data")))]
    return [c for c in dict.fromkeys(cands)
            if c and any(os.path.isdir(os.path.join(c, t)) for t in ("samples", "traces", "eval_results"))]


def _roots_hint() -> str:
    roots = found_roots()
    return (f"roots found here: {', '.join(roots)}" if roots
            else "no ParaPipe root found here; run `parapipe run` (or `make run`) or `parapipe aggregate` first")


def check_root(root: str) -> None:
    """A local root must be a folder; S3 roots are checked by the flow itself."""
    if "://" in root:
        return
    if not os.path.isdir(root):
        raise CLIError(f"--root {root!r} does not exist; {_roots_hint()} (or set ${ROOT_ENV})")


def datasets_in(root: str) -> list[str]:
    """Dataset names (run partitions of the samples table) with a committed manifest under a local root."""
    from storage.parquet import list_runs  # pyarrow only

    return list_runs(root, "samples") if os.path.isdir(os.path.join(root, "samples")) else []


def check_dataset(root: str, dataset: str) -> None:
    """The root exists and its samples table has a committed `dataset` partition."""
    check_root(root)
    if "://" in root:
        return
    have = datasets_in(root)
    if dataset not in have:
        listing = f"datasets under {root}: {', '.join(have)}" if have else f"{root} holds no aggregated dataset"
        raise CLIError(f"--dataset {dataset!r} is not under --root {root!r} ({listing}); pick one of those, or "
                       f"write it first with `parapipe aggregate --root {root} --dataset {dataset}`")


def check_checkpoint(path: str, option: str = "--checkpoint") -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        what = "does not exist" if not os.path.exists(path) else "is not a checkpoint folder (no config.json)"
        links = sorted(glob.glob(os.path.join("runs", "*", "*", "final")))  # make run's sft/final and rl/final
        found = (links + sorted(glob.glob(os.path.join("runs", "*", "*", "checkpoints", "*", "final"))))[:6]
        hint = f"checkpoints found here: {', '.join(found)}" if found else "train one with `parapipe sft` first"
        raise CLIError(f"{option} {path!r} {what}; {hint}")


# ------------------------------------------------------------------------------------------------ JSON / YAML

def _parse_text(option: str, text: str, source: str):
    import yaml  # a YAML superset of JSON; errors still name the option

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if source != "text":
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as ye:
                raise CLIError(f"{option}: {source} is neither JSON nor YAML ({ye.__class__.__name__}: "
                               f"{str(ye).splitlines()[0]})") from None
        raise CLIError(f"{option} {text!r} is not valid JSON ({e.msg} at character {e.pos}) and is not a file; "
                       f"give a JSON object like '{{\"key\": 1}}' or a path to a .json / .yaml file") from None


def load_object(option: str, text: str | None) -> dict | None:
    """A dict from an option that takes inline JSON or a path to a JSON / YAML file; None stays None."""
    if text is None:
        return None
    stripped = text.strip()
    if stripped.startswith("{"):
        value = _parse_text(option, stripped, "text")
    elif os.path.isfile(text):
        with open(text) as f:
            value = _parse_text(option, f.read(), f"file {text!r}")
    else:
        raise CLIError(f"{option} {text!r} is neither a JSON object (it would start with '{{') nor an existing "
                       f"file; give inline JSON like '{{\"key\": 1}}' or a path to a .json / .yaml file")
    if not isinstance(value, dict):
        raise CLIError(f"{option}: expected a JSON object ({{...}}), got {type(value).__name__} {value!r}")
    return value


def check_fields(option: str, value: dict, cls) -> None:
    """Keys of `value` must be fields of dataclass `cls` and construct it; the message names the option."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    bad = [k for k in value if k not in names]
    if bad:
        raise CLIError(f"{option}: unknown field(s) {bad}; {cls.__name__} has {', '.join(names)}")
    try:
        cls(**value)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{option} {json.dumps(value)}: {e}") from None


# ------------------------------------------------------------------------------------------------ human output

def human_seconds(s: float) -> str:
    """1.3569 -> '1.4 s', 125 -> '2 min 5 s', 7322 -> '2 h 2 min'."""
    if s < 0.01:
        return f"{s * 1000:.1f} ms"
    if s < 60:
        return f"{s:.3g} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h < 48 else f"{h // 24} d {h % 24} h"


def human_value(key: str, v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "-"}[v]
    if isinstance(v, float):
        if (key.endswith(("_s", "seconds")) and "per_s" not in key) or key in ("s", "time"):
            return human_seconds(v)
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(human_value(key, x) for x in v) if v else "none"
    return str(v)


def format_summary(d: dict, indent: int = 0) -> str:
    """A flow's summary dict as aligned 'key: value' lines; nested dicts indent, empty ones read 'none'."""
    pad, lines = " " * indent, []
    width = max((len(str(k)) for k in d), default=0)
    for k, v in d.items():
        label = f"{pad}{str(k).replace('_', ' ')}:".ljust(width + indent + 2)
        if isinstance(v, dict) and v:
            lines += [label.rstrip(), format_summary(v, indent + 2)]
        elif isinstance(v, dict):
            lines.append(f"{label}none")
        else:
            lines.append(f"{label}{human_value(str(k), v)}")
    return "\n".join(lines)


def one_line(exc: BaseException) -> str:
    """The user-facing line for an exception: a Ray / Prefect wrapper's cause, the message's first line."""
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    if isinstance(exc, (CLIError, ValueError, FileNotFoundError)) and msg:
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class _NoTraceback:
    """A console-handler filter: the line stays, its traceback goes (the Prefect API log keeps it)."""

    def filter(self, record) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def console_tracebacks_off() -> None:
    """Prefect prints a failed flow's traceback on the console before re-raising; the CLI prints one line instead.
    Call after prefect is imported (its logging is configured on import). --debug skips this."""
    import logging

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
                                       if n.startswith("prefect")]
    for logger in loggers:
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not any(isinstance(f, _NoTraceback) for f in h.filters):
                h.addFilter(_NoTraceback())
