"""`parapipe`: one subcommand per stage (aggregate, traces, sft, rl, eval), `run` for the whole pipeline, and
`generate`, `query`, `inspect` to look at what was made.

Each subcommand checks its arguments (paths exist, JSON parses, values allowed) before it imports Prefect or a flow,
so a mistake costs a fraction of a second and reads as one line; `--debug` shows the traceback instead.
The argument checks and human formatting live in flows/cli_support.py; the parser in flows/cli_parser.py.
"""
import json
import os
import sys

from flows.cli_support import (CLIError, check_checkpoint, check_dataset, check_fields, check_root,
                               console_tracebacks_off, format_summary, load_object, one_line)

ONE_BLOCK = 1 << 30  # a block length above any text length: the whole text is one block (tasks/common/generate.py)
SAMPLER_DEFAULTS = dict(steps=32, image_steps=16, text_block_length=ONE_BLOCK, text_cfg=0.0, image_cfg=0.0,
                        text_temperature=0.0, image_temperature=1.0, text_tokens=None)
SAMPLER_FLAGS = dict(steps="--steps", image_steps="--image-steps", text_block_length="--block-length",
                     text_cfg="--text-cfg", image_cfg="--image-cfg", text_temperature="--text-temperature",
                     image_temperature="--image-temperature", text_tokens="--text-length", cache="--cache",
                     cache_refresh="--cache-refresh", text_threshold="--text-threshold",
                     image_threshold="--image-threshold", image_cache_ratio="--image-cache-ratio")


def _print_result(a, result: dict) -> None:
    print(json.dumps(result, indent=2, default=str) if a.json else format_summary(result))


def _positive(a, *names: str) -> None:
    for name in names:
        v = getattr(a, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} {v} must be at least 1")


# ------------------------------------------------------------------------------------------------ generate

def _sampler_config(a):
    """SamplerConfig and text length: the checkpoint's recorded sampler (or --settings) < explicit flags.
    Prints a warning for every explicit flag that departs from what the checkpoint was evaluated with."""
    from model.sampling import SamplerConfig
    from tasks.common.generate import RELEASED_SETTINGS, recorded_sampler

    recorded, source = recorded_sampler(a.checkpoint)
    base = RELEASED_SETTINGS[a.settings] if a.settings else recorded
    v = {**SAMPLER_DEFAULTS, **base}
    given = {k: getattr(a, flag.lstrip("-").replace("-", "_")) for k, flag in SAMPLER_FLAGS.items()}
    given = {k: x for k, x in given.items() if x is not None}
    for k, x in given.items():
        if recorded and k in recorded and recorded[k] != x:
            print(f"warning: {SAMPLER_FLAGS[k]} {x} departs from the sampler {a.checkpoint} was evaluated with "
                  f"({k}={recorded[k]}); outputs may be worse", file=sys.stderr)
    v.update(given)
    text_tokens = v.pop("text_tokens")
    known = SamplerConfig.__dataclass_fields__
    print(f"sampler: {'--settings ' + a.settings if a.settings else source}"
          + (f", flags {', '.join(SAMPLER_FLAGS[k] for k in given)}" if given else ""), file=sys.stderr)
    try:
        return SamplerConfig(**{k: x for k, x in v.items() if k in known}, mode=a.mode), text_tokens
    except ValueError as e:  # a flag's value: a usage error
        raise CLIError(str(e)) from None


def _check_device(a) -> None:
    from tasks.common.generate import inference_device

    try:
        inference_device(a.device, a.dtype)
    except ValueError as e:
        raise CLIError(str(e)) from None


def cmd_generate(a) -> None:
    check_checkpoint(a.checkpoint)
    if a.image is not None and not os.path.isfile(a.image):
        raise CLIError(f"--image {a.image!r} does not exist; give a PNG or JPEG file, or drop --image to generate")
    from tasks.common.generate import generate_to_files

    _check_device(a)
    sampler, text_tokens = _sampler_config(a)
    meta = generate_to_files(a.checkpoint, a.prompt, a.out, sampler, text_tokens=text_tokens,
                             image_path=a.image, seed=a.seed, device=a.device, resize=a.resize,
                             image_tokenizer=a.image_tokenizer, dtype=a.dtype)
    print(f"wrote {a.out}: text={meta['text']!r} nfe={meta['nfe']} ({meta['device']}, {meta['dtype']})")


def cmd_init_tiny(a) -> None:
    from tasks.common.generate import make_tiny_checkpoint

    make_tiny_checkpoint(a.out, seed=a.seed)
    print(f"tiny random checkpoint in {a.out}")


# ------------------------------------------------------------------------------------------------ run

RUN_FLAGS = dict(out="out", toy_samples="toy_samples", sft_steps="sft_steps", workers="num_workers", seed="seed",
                 gpu="gpu", recipe="recipe", dataset="dataset")


def _pipeline_config(a):
    """The run's PipelineConfig: --config file < flags given; validated (pydantic) before Prefect starts."""
    from pydantic import ValidationError

    from tasks.pipeline.pipeline_config import PipelineConfig

    fields = load_object("--config", a.config) or {}
    fields.update({f: getattr(a, flag) for flag, f in RUN_FLAGS.items() if getattr(a, flag) not in (None, False)})
    try:
        return PipelineConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        where = ".".join(str(x) for x in err["loc"])
        what = f"{where}={err.get('input')!r}: " if where else ""
        raise CLIError(f"run config: {what}{msg} (the fields: tasks/pipeline/pipeline_config.py)") from None


def cmd_run(a) -> None:
    """The whole pipeline on the embedded default (the toy world, tiny models, local storage)."""
    _positive(a, "workers", "toy_samples", "sft_steps")
    config = _pipeline_config(a)  # validated before Prefect starts
    from flows.runtime import install_process_guard

    install_process_guard(tmp_dir=os.path.join(config.out, "tmp"))  # temporary files live under the run
    from tasks.pipeline.progress import quiet_internals

    if not a.debug:
        quiet_internals()  # progress bars and warnings; Ray and Prefect chatter off (the UI keeps every log)
    from flows.pipeline import pipeline, summary_text

    _quiet(a)
    result = pipeline(config=config)
    print(json.dumps(result, indent=2, default=str) if a.json else summary_text(result))


# ------------------------------------------------------------------------------------------------ stages

def _quiet(a) -> None:
    if not a.debug:
        console_tracebacks_off()


def _load_sources(path: str | None) -> list[dict] | None:
    if path is None:
        return None
    if path.lstrip().startswith("["):  # inline JSON
        try:
            return _check_sources(path, json.loads(path))
        except json.JSONDecodeError as e:
            raise CLIError(f"--sources {path!r} is not valid JSON ({e.msg} at character {e.pos})") from None
    if not os.path.isfile(path):
        raise CLIError(f"--sources {path!r} does not exist; give a JSON or YAML file (or inline JSON) of a list "
                       f"of source dicts, e.g. [{{\"type\": \"toy\", \"name\": \"toy-tiny\", \"n\": 200}}]")
    import yaml

    with open(path) as f:
        try:
            sources = yaml.safe_load(f)  # JSON is YAML
        except yaml.YAMLError as e:
            raise CLIError(f"--sources {path!r} is neither JSON nor YAML: {str(e).splitlines()[0]}") from None
    return _check_sources(path, sources["sources"] if isinstance(sources, dict) and "sources" in sources else sources)


def _check_sources(path: str, sources) -> list[dict]:
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise CLIError(f"--sources {path!r} must hold a list of source dicts (or {{\"sources\": [...]}}), "
                       f"got {type(sources).__name__}")
    from tasks.aggregate.sources import SourceSpec

    for i, spec in enumerate(sources):
        try:
            SourceSpec.from_dict(spec)
        except (TypeError, ValueError) as e:
            raise CLIError(f"--sources {path!r}, source {i} {json.dumps(spec)}: {one_line(e)} (fields: "
                           f"tasks/aggregate/sources.SourceSpec)") from None
    return sources


def cmd_aggregate(a) -> None:
    sources = _load_sources(a.sources)
    _positive(a, "resolution")
    from flows.aggregate import aggregate

    _quiet(a)
    summary = aggregate(sources=sources, root=a.root, dataset=a.dataset, resolution=a.resolution, resize=a.resize)
    _print_result(a, {k: v for k, v in summary.items() if k != "sources"})


def cmd_traces(a) -> None:
    check_dataset(a.root, a.dataset)
    from tasks.traces.generators import GENERATOR_KINDS, GeneratorSpec
    from tasks.traces.traces import FilterConfig

    generator = load_object("--generator", a.generator)
    if generator.get("kind", "teacher") not in GENERATOR_KINDS:
        raise CLIError(f"--generator kind {generator.get('kind')!r} is unknown; use one of "
                       f"{', '.join(GENERATOR_KINDS)}")
    check_fields("--generator", generator, GeneratorSpec)
    filters = load_object("--filters", a.filters)
    if filters is not None:
        check_fields("--filters", filters, FilterConfig)
    _positive(a, "batch_size")
    from flows.traces import traces

    _quiet(a)
    _print_result(a, traces(root=a.root, dataset=a.dataset, generator=generator, batch_size=a.batch_size,
                            filters=filters, commit_every_s=a.commit_every_s,
                            max_failed_fraction=a.max_failed_fraction))


def cmd_sft(a) -> None:
    check_dataset(a.root, a.dataset)
    _positive(a, "workers", "steps", "checkpoint_every")
    from tasks.sft.recipe import PRESETS, default_preset, load_recipe, recipe_from_args
    from tasks.sft.sft_data import is_toy_dataset

    try:
        base = load_recipe(a.recipe) if a.recipe else PRESETS[default_preset(is_toy_dataset(a.root, a.dataset))]
        recipe = recipe_from_args(a, base)
    except (ValueError, json.JSONDecodeError) as e:
        raise CLIError(f"--recipe {a.recipe!r}: {one_line(e)}" if a.recipe else one_line(e)) from None
    from flows.sft import sft

    _quiet(a)
    out = sft(root=a.root, dataset=a.dataset, out=a.out, run_id=a.run_id or f"sft-{a.dataset}", recipe=recipe,
              total_steps=a.steps, num_workers=a.workers, use_gpu=a.gpu, checkpoint_every=a.checkpoint_every,
              fsdp=a.fsdp)
    _print_result(a, {k: v for k, v in out.items() if k != "eval"})


RL_FLAGS = (("rounds", "rounds"), ("prompts", "prompts_per_round"), ("group_size", "group_size"),
            ("k", "sampled_steps"), ("reward", "reward"), ("mode", "reward_mode"), ("lr", "lr"), ("beta", "beta"),
            ("seed", "seed"))


def cmd_rl(a) -> None:
    check_checkpoint(a.checkpoint)
    check_dataset(a.root, a.dataset)
    from model.sampling import SamplerConfig
    from rl.learner import RLConfig

    config = dict(a.rl_fields)  # --config keys that are RLConfig fields (flows/cli_parser.apply_config_file)
    config.update({field: getattr(a, flag) for flag, field in RL_FLAGS if getattr(a, flag) is not None})
    check_fields("--config", config, RLConfig)
    _positive(a, "rollout_workers", "reward_workers", "learner_workers")
    if a.fsdp and a.learner_workers < 2:
        raise CLIError(f"--fsdp shards a learner group; add --learner-workers 2 (or more), not {a.learner_workers}")
    sampler = load_object("--sampler", a.sampler)
    if sampler is not None:
        check_fields("--sampler", sampler, SamplerConfig)
    if a.clip_folder is not None and not os.path.isdir(a.clip_folder):
        raise CLIError(f"--clip-folder {a.clip_folder!r} does not exist; write one with "
                       f"`parapipe fit-reward --out DIR`")
    from flows.pararl import pararl

    _quiet(a)
    out = pararl(checkpoint=a.checkpoint, root=a.root, dataset=a.dataset, out=a.out, run_id=a.run_id, config=config,
                 sampler=sampler, clip_folder=a.clip_folder, clip_model=a.clip_model,
                 clip_pretrained=a.clip_pretrained, rollout_workers=a.rollout_workers,
                 reward_workers=a.reward_workers, use_gpu=a.gpu, learner_workers=a.learner_workers,
                 fsdp=a.fsdp)
    _print_result(a, out)


def cmd_eval(a) -> None:
    for c in a.checkpoint:
        check_checkpoint(c)
    if a.benchmark != "toy-parabench" and not os.path.isdir(a.benchmark):
        raise CLIError(f"--benchmark {a.benchmark!r} is neither toy-parabench nor a folder; download tyfeld/ParaBench "
                       f"to a folder and pass its path")
    from model.sampling import SamplerConfig

    sampler = load_object("--sampler", a.sampler)
    if sampler is not None:
        check_fields("--sampler", sampler, SamplerConfig)
    judge_args, columns = load_object("--judge-args", a.judge_args), load_object("--columns", a.columns)
    _positive(a, "batch_size", "limit")
    _check_device(a)
    from flows.evaluate import evaluate

    _quiet(a)
    out = evaluate(checkpoints=a.checkpoint, benchmark=a.benchmark, root=a.root, run_id=a.run_id, modes=a.modes,
                   judge=a.judge, seed=a.seed, sampler=sampler, batch_size=a.batch_size, limit=a.limit,
                   judge_args=judge_args, report_dir=a.report_dir, columns=columns, device=a.device, dtype=a.dtype)
    if a.json:
        print(json.dumps({"items": out["items"], "results": out["results"], "reports": out["reports"]},
                         indent=2, default=str))
        return
    print(out["markdown"])
    counts = {m: r["counts"]["overall"] for m, r in out["results"].items()}
    print(format_summary({"items": out["items"], "failed judgments": counts, "reports": out["reports"]}))


def cmd_ablate(a) -> None:
    check_checkpoint(a.checkpoint)
    check_dataset(a.root, a.dataset)
    from rl.learner import RLConfig

    config = load_object("--config", a.config) or {}
    check_fields("--config", config, RLConfig)
    _positive(a, "limit")
    if a.clip_folder is not None and not os.path.isdir(a.clip_folder):
        raise CLIError(f"--clip-folder {a.clip_folder!r} does not exist; write one with `parapipe fit-reward --out DIR`")
    from flows.ablate import ablate

    _quiet(a)
    out = ablate(study=a.study, checkpoint=a.checkpoint, root=a.root, dataset=a.dataset, out=a.out, run_id=a.run_id,
                 rl=config, ks=a.ks, limit=a.limit, clip_folder=a.clip_folder)
    if a.json:
        print(json.dumps(out, indent=2, default=str))
        return
    print(out["markdown"])
    print(format_summary({"checkpoints": out["checkpoints"], "reports": out["reports"]}))


def cmd_fit_reward(a) -> None:
    from tasks.pararl.fit_reward import fit_tiny_clip

    _print_result(a, fit_tiny_clip(a.out, preset=a.preset, seed=a.seed))


# ------------------------------------------------------------------------------------------------ look

def _check_tables(root: str) -> None:
    check_root(root)
    from storage.schema import TABLES

    if "://" not in root and not any(os.path.isdir(os.path.join(root, t)) for t in TABLES):
        from flows.cli_support import _roots_hint

        raise CLIError(f"--root {root!r} holds no ParaPipe tables ({', '.join(TABLES)}); {_roots_hint()}")


def cmd_query(a) -> None:
    _check_tables(a.root)
    from storage.query import format_csv, format_json, format_table, query

    if a.max_width < 0 or a.max_rows < 0:
        raise CLIError(f"--max-width {a.max_width} / --max-rows {a.max_rows} must be >= 0 (0: no limit)")
    import duckdb

    try:
        tbl = query(a.root, a.sql)
    except duckdb.Error as e:
        head = []
        for line in str(e).splitlines():  # the message and DuckDB's "Did you mean", not the SQL excerpt
            if not line.strip() or line.startswith("LINE "):
                break
            head.append(line.strip())
        raise CLIError(f"SQL: {' '.join(head)} (`parapipe inspect` then .tables lists the tables and views)") from None
    if a.format == "csv":
        sys.stdout.write(format_csv(tbl, max_rows=a.max_rows))
    elif a.format == "json":
        print(format_json(tbl, max_rows=a.max_rows))
    else:
        print(format_table(tbl, max_rows=a.max_rows, max_cell=a.max_width))


def cmd_inspect(a) -> None:
    _check_tables(a.root)
    from storage.query import interactive, write_views_sql

    if a.write_sql:
        print(f"wrote {write_views_sql(a.root, a.write_sql)}")
        print(f"open it with: python -c \"import duckdb; c = duckdb.connect(); "
              f"c.execute(open('{a.write_sql}').read()); print(c.sql('FROM samples_by_source'))\"\n"
              f"  (or the DuckDB CLI, if installed: duckdb -init {a.write_sql})")
        return
    sys.exit(interactive(a.root))


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None, console: bool | None = None) -> None:
    """The `parapipe` console script. As a console (argv None: the installed script, `python -m flows.cli`), an error
    prints one line and exits 2 (a mistake in the arguments) or 1; `--debug` or PARAPIPE_DEBUG=1 re-raises instead.
    Called with an argv list (from Python, tests), errors propagate as exceptions unless console=True."""
    from flows.cli_parser import parse

    # Prefect's ephemeral server: allow a slow first start on a fresh database, send no telemetry
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    console = argv is None if console is None else console
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("PARAPIPE_DEBUG") == "1" or not console  # raise, print tracebacks
    try:
        a = parse(argv, sys.modules[__name__])
        a.debug = debug
        if console:  # nothing this run starts (Prefect's server, Ray, vLLM) outlives it, even on SIGKILL
            from flows.runtime import install_process_guard

            install_process_guard()
        a.fn(a)
    except KeyboardInterrupt:
        print("parapipe: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 (the boundary: one line for people, the traceback with --debug)
        if debug:
            raise
        command = argv[0] if argv and not argv[0].startswith("-") else ""
        print(f"parapipe {command}: error: {one_line(e)}".replace("  ", " "), file=sys.stderr)
        print("(run again with --debug for the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(e, CLIError) else 1)


if __name__ == "__main__":
    main()
