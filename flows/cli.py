"""`parapipe` command line: each subcommand calls one flow or task. Heavy imports stay inside them."""
import argparse
import sys


ONE_BLOCK = 1 << 30  # a block length above any text length: the whole text is one block


SAMPLER_DEFAULTS = dict(steps=32, image_steps=16, text_block_length=ONE_BLOCK, text_cfg=0.0, image_cfg=0.0,
                        text_temperature=0.0, image_temperature=1.0, text_tokens=None)


def _sampler_args(p: argparse.ArgumentParser) -> None:
    d = SAMPLER_DEFAULTS
    p.add_argument("--settings", default=None, choices=("mmada-parallel-m", "mmada-parallel-a"),
                   help="upstream's published inference settings (tasks/generate.RELEASED_SETTINGS, bugs fixed); "
                   "flags given explicitly still win")
    p.add_argument("--steps", type=int, default=None, help=f"text steps on the shared timeline (S) [{d['steps']}]")
    p.add_argument("--image-steps", type=int, default=None, help=f"image decoding steps [{d['image_steps']}]")
    p.add_argument("--text-length", type=int, default=None,
                   help="output text slots (default: what the checkpoint was trained with, else 64)")
    p.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive text block length (default: one block over the whole text)")
    p.add_argument("--text-cfg", type=float, default=None, help="guidance scale on text logits [0]")
    p.add_argument("--image-cfg", type=float, default=None, help="guidance scale on image logits [0]")
    p.add_argument("--text-temperature", type=float, default=None, help="0 = greedy text [0]")
    p.add_argument("--image-temperature", type=float, default=None, help="0 = greedy image codes [1]")
    p.add_argument("--mode", choices=("parallel", "sequential"), default="parallel")
    p.add_argument("--seed", type=int, default=0)


def _sampler_config(a):
    """SamplerConfig and text length: defaults < --settings < explicit flags."""
    from model.sampling import SamplerConfig
    from tasks.generate import RELEASED_SETTINGS

    v = {**SAMPLER_DEFAULTS, **(RELEASED_SETTINGS[a.settings] if a.settings else {})}
    given = dict(steps=a.steps, image_steps=a.image_steps, text_block_length=a.block_length, text_cfg=a.text_cfg,
                 image_cfg=a.image_cfg, text_temperature=a.text_temperature, image_temperature=a.image_temperature,
                 text_tokens=a.text_length)
    v.update({k: x for k, x in given.items() if x is not None})
    text_tokens = v.pop("text_tokens")
    return SamplerConfig(**v, mode=a.mode), text_tokens


def cmd_generate(a) -> None:
    from tasks.generate import generate_to_files

    sampler, text_tokens = _sampler_config(a)
    meta = generate_to_files(a.checkpoint, a.prompt, a.out, sampler, text_tokens=text_tokens,
                             image_path=a.image, seed=a.seed, device=a.device, resize=a.resize,
                             image_tokenizer=a.image_tokenizer)
    print(f"wrote {a.out}: text={meta['text']!r} nfe={meta['nfe']}")


def cmd_init_tiny(a) -> None:
    from tasks.generate import make_tiny_checkpoint

    make_tiny_checkpoint(a.out, seed=a.seed)
    print(f"tiny random checkpoint in {a.out}")


def cmd_run(a) -> None:
    """The whole pipeline on the embedded default (the toy world, tiny models, local storage)."""
    from flows.pipeline import pipeline

    result = pipeline(out=a.out, toy_samples=a.toy_samples, seed=a.seed, sft_steps=a.sft_steps,
                      num_workers=a.workers)
    exact = result["eval"]["exact_image"]
    print(f"run finished in {a.out}: {result['samples']} samples, {result['quarantined']} quarantined, "
          f"checkpoint {result['checkpoint']}, {len(result['examples'])} examples in {a.out}/examples")
    print("held-out exact output images (model / copy input / most common output):")
    for category, m in sorted(exact.items()):
        print(f"  {category:>12s}: {m.get('model', 0):.2f} / {m.get('copy_input', 0):.2f} / "
              f"{m.get('common_output', 0):.2f}")


def cmd_aggregate(a) -> None:
    import json

    from flows.aggregate import aggregate

    sources = json.loads(open(a.sources).read()) if a.sources else None
    summary = aggregate(sources=sources, root=a.root, dataset=a.dataset, resolution=a.resolution, resize=a.resize)
    print(json.dumps({k: v for k, v in summary.items() if k != "sources"}, indent=2))


def cmd_sft(a) -> None:
    import json

    from flows.sft import sft
    from tasks.recipe import PRESETS, default_preset, load_recipe, recipe_from_args
    from tasks.sft_data import is_toy_dataset

    base = load_recipe(a.recipe) if a.recipe else PRESETS[default_preset(is_toy_dataset(a.root, a.dataset))]
    recipe = recipe_from_args(a, base)
    out = sft(root=a.root, dataset=a.dataset, out=a.out, run_id=a.run_id or f"sft-{a.dataset}", recipe=recipe,
              total_steps=a.steps, num_workers=a.workers, use_gpu=a.gpu, checkpoint_every=a.checkpoint_every,
              fsdp=a.fsdp)
    print(json.dumps({k: v for k, v in out.items() if k != "eval"}, indent=2, default=str))


def cmd_traces(a) -> None:
    import json

    from flows.traces import traces

    generator = json.loads(a.generator) if a.generator.lstrip().startswith("{") else json.load(open(a.generator))
    filters = json.loads(a.filters) if a.filters else None
    print(json.dumps(traces(root=a.root, dataset=a.dataset, generator=generator, batch_size=a.batch_size,
                            filters=filters, commit_every_s=a.commit_every_s), indent=2))


def cmd_rl(a) -> None:
    import json

    from flows.pararl import pararl

    config = json.loads(a.config) if a.config else {}
    for flag, field in (("rounds", "rounds"), ("prompts", "prompts_per_round"), ("group_size", "group_size"),
                        ("k", "sampled_steps"), ("reward", "reward"), ("mode", "reward_mode"), ("lr", "lr"),
                        ("beta", "beta"), ("seed", "seed")):
        if getattr(a, flag) is not None:
            config[field] = getattr(a, flag)
    out = pararl(checkpoint=a.checkpoint, root=a.root, dataset=a.dataset, out=a.out, run_id=a.run_id, config=config,
                 sampler=json.loads(a.sampler) if a.sampler else None, clip_folder=a.clip_folder,
                 clip_model=a.clip_model, clip_pretrained=a.clip_pretrained, rollout_workers=a.rollout_workers,
                 reward_workers=a.reward_workers, use_gpu=a.gpu)
    print(json.dumps(out, indent=2, default=str))


def cmd_eval(a) -> None:
    import json

    from flows.evaluate import evaluate

    sampler = json.loads(a.sampler) if a.sampler else None
    out = evaluate(checkpoints=a.checkpoint, benchmark=a.benchmark, root=a.root, run_id=a.run_id, modes=a.modes,
                   judge=a.judge, seed=a.seed, sampler=sampler, batch_size=a.batch_size, limit=a.limit,
                   judge_args=json.loads(a.judge_args) if a.judge_args else None, report_dir=a.report_dir,
                   columns=json.loads(a.columns) if a.columns else None)
    counts = {m: r["counts"]["overall"] for m, r in out["results"].items()}
    print(json.dumps({"items": out["items"], "failures": counts, "reports": out["reports"]}, indent=2))


def cmd_fit_reward(a) -> None:
    import json

    from tasks.fit_reward import fit_tiny_clip

    print(json.dumps(fit_tiny_clip(a.out, preset=a.preset, seed=a.seed), indent=2, default=str))


def cmd_query(a) -> None:
    from storage.query import format_table, query

    print(format_table(query(a.root, a.sql), max_rows=a.max_rows))


def cmd_inspect(a) -> None:
    from storage.query import interactive, write_views_sql

    if a.write_sql:
        print(f"wrote {write_views_sql(a.root, a.write_sql)}")
        return
    sys.exit(interactive(a.root))


def main(argv: list[str] | None = None) -> None:
    import os

    # Prefect's ephemeral server: allow a slow first start on a fresh database, send no telemetry
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = argparse.ArgumentParser(prog="parapipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample reasoning text + image from a checkpoint folder")
    g.add_argument("--checkpoint", required=True, help="folder with config.json, safetensors, tokenizer.json")
    g.add_argument("--prompt", required=True, help="instruction (editing) or prompt (generation)")
    g.add_argument("--image", default=None, help="input image for editing (needs image_tokenizer/)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--device", default="cpu")
    g.add_argument("--image-tokenizer", default=None, help="image tokenizer folder when the checkpoint has no "
                   "image_tokenizer/ (e.g. showlab/magvitv2 for MMaDA-Parallel-M)")
    g.add_argument("--resize", choices=("squash", "center_crop"), default="squash",
                   help="how an input image of another size is fitted to the tokenizer's (as aggregation)")
    _sampler_args(g)
    g.set_defaults(fn=cmd_generate)

    t = sub.add_parser("init-tiny", help="write a tiny random checkpoint folder")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_init_tiny)

    r = sub.add_parser("run", help="the whole pipeline on the embedded default")
    r.add_argument("--out", default="runs/default")
    r.add_argument("--toy-samples", type=int, default=None, help="toy-world samples (default: the recipe's)")
    r.add_argument("--sft-steps", type=int, default=None, help="SFT optimiser steps (default: the recipe's)")
    r.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=cmd_run)

    ag = sub.add_parser("aggregate", help="aggregate sources into a validated, deduplicated samples table")
    ag.add_argument("--sources", default=None, help="JSON file: a list of source dicts (default: the toy world)")
    ag.add_argument("--root", default="data", help="storage root: a folder or s3://bucket/prefix")
    ag.add_argument("--dataset", default="toy-tiny", help="dataset name (the run partition)")
    ag.add_argument("--resolution", type=int, default=32)
    ag.add_argument("--resize", choices=("squash", "center_crop"), default="squash")
    ag.set_defaults(fn=cmd_aggregate)

    tr = sub.add_parser("traces", help="write a reasoning trace for every sample (resumable)")
    tr.add_argument("--root", default="data")
    tr.add_argument("--dataset", default="toy-tiny")
    tr.add_argument("--generator", default='{"kind": "teacher"}',
                    help='JSON object or file: {"kind": "vllm", "model": FOLDER, ...} (tasks/generators.py)')
    tr.add_argument("--filters", default=None, help="JSON object of FilterConfig fields (tasks/traces.py)")
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--commit-every-s", type=float, default=10.0,
                    help="commit finished traces at least this often (0: after every batch)")
    tr.set_defaults(fn=cmd_traces)

    sf = sub.add_parser("sft", help="supervised fine-tuning on Ray Train (re-run the same --run-id to resume)",
                        description="Trains on any aggregated dataset. The recipe is a preset or JSON file (--recipe), "
                        "then every recipe field below can be overridden; defaults shown are the 'small' preset's.")
    sf.add_argument("--root", default="data")
    sf.add_argument("--dataset", default="toy-tiny")
    sf.add_argument("--out", default="runs/sft")
    sf.add_argument("--run-id", default=None, help="run name (default: sft-<dataset>)")
    sf.add_argument("--recipe", default=None, help="preset (toy-tiny, small) or JSON file of recipe fields "
                    "(tasks/recipe.py; {'preset': ...} picks the base); default: toy-tiny on toy data, else small")
    sf.add_argument("--steps", type=int, default=None, help="optimiser steps (shortcut for --sft.total_steps, "
                    "with a proportionate warm-up)")
    sf.add_argument("--workers", type=int, default=2)
    sf.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    sf.add_argument("--fsdp", action="store_true", help="FSDP2 per block with bf16 compute (GPUs)")
    sf.add_argument("--checkpoint-every", type=int, default=100)
    from tasks.recipe import recipe_flags
    recipe_flags(sf)
    sf.set_defaults(fn=cmd_sft)

    rl = sub.add_parser("rl", help="ParaRL from an SFT checkpoint (re-run the same --run-id to resume)",
                        description="Fields not given keep rl/learner.RLConfig's defaults; --config sets any of them.")
    rl.add_argument("--checkpoint", required=True, help="SFT checkpoint folder (e.g. runs/default/sft/checkpoints/"
                    "sft-toy-tiny/final)")
    rl.add_argument("--root", default="data")
    rl.add_argument("--dataset", default="toy-tiny", help="dataset whose train split gives the prompts")
    rl.add_argument("--out", default="runs/rl")
    rl.add_argument("--run-id", default="rl-toy-tiny")
    rl.add_argument("--rounds", type=int, default=None)
    rl.add_argument("--prompts", type=int, default=None, help="prompts per round (B)")
    rl.add_argument("--group-size", type=int, default=None, help="samples per prompt (G)")
    rl.add_argument("--k", type=int, default=None, help="sampled (rewarded) denoising steps per rollout (K)")
    rl.add_argument("--reward", choices=("clip", "exact"), default=None)
    rl.add_argument("--mode", choices=("trajectory", "output"), default=None, help="where the reward is taken")
    rl.add_argument("--lr", type=float, default=None)
    rl.add_argument("--beta", type=float, default=None, help="KL weight")
    rl.add_argument("--seed", type=int, default=None)
    rl.add_argument("--config", default=None, help="JSON object of RLConfig fields (rl/learner.py)")
    rl.add_argument("--sampler", default=None, help='JSON object of rollout SamplerConfig fields, e.g. '
                    '{"steps": 20, "image_steps": 10}')
    rl.add_argument("--clip-folder", default=None, help="reward folder written by `parapipe fit-reward`")
    rl.add_argument("--clip-model", default=None, help="open_clip architecture, e.g. ViT-L-14 (real data)")
    rl.add_argument("--clip-pretrained", default=None, help="local weights file for --clip-model")
    rl.add_argument("--rollout-workers", type=int, default=1)
    rl.add_argument("--reward-workers", type=int, default=1)
    rl.add_argument("--gpu", action="store_true", help="one GPU per rollout actor, 0.25 GPU per reward actor")
    rl.set_defaults(fn=cmd_rl)

    ev = sub.add_parser("eval", help="score a checkpoint on ParaBench's six metrics (toy ParaBench or a local copy)")
    ev.add_argument("--checkpoint", required=True, nargs="+",
                    help="one or more checkpoint folders, scored side by side (e.g. SFT and ParaRL)")
    ev.add_argument("--benchmark", default="toy-parabench",
                    help="toy-parabench (300 pinned toy tasks) or a local ParaBench folder (Hugging Face layout)")
    ev.add_argument("--root", default="data", help="storage root for the benchmark and the evaluation tables")
    ev.add_argument("--run-id", default="eval")
    ev.add_argument("--modes", nargs="+", default=["parallel"], choices=("parallel", "sequential"))
    ev.add_argument("--judge", default="exact", choices=("exact", "vlm", "clip"))
    ev.add_argument("--judge-args", default=None, help='JSON: vlm {"base_url": "http://host:8000/v1", "model": '
                    '"qwen", ...} (tasks/judge_vlm.py); clip {"clip_folder": DIR} or {"model_name", "pretrained"}')
    ev.add_argument("--sampler", default=None, help="JSON of SamplerConfig fields (default: the toy recipe's, greedy)")
    ev.add_argument("--columns", default=None, help="JSON column mapping of a local ParaBench folder")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--limit", type=int, default=None, help="first N items only (smoke runs)")
    ev.add_argument("--report-dir", default=None, help="where the PNG sample grids and chart go (default runs/eval/RUN_ID)")
    ev.set_defaults(fn=cmd_eval)

    fr = sub.add_parser("fit-reward", help="train the toy world's tiny CLIP reward model (open_clip)")
    fr.add_argument("--out", required=True)
    fr.add_argument("--preset", default="tiny")
    fr.add_argument("--seed", type=int, default=0)
    fr.set_defaults(fn=cmd_fit_reward)

    q = sub.add_parser("query", help="run one SQL statement over the tables and canned views")
    q.add_argument("sql")
    q.add_argument("--root", default="data")
    q.add_argument("--max-rows", type=int, default=40)
    q.set_defaults(fn=cmd_query)

    i = sub.add_parser("inspect", help="interactive DuckDB session over the tables (read-only)")
    i.add_argument("--root", default="data")
    i.add_argument("--write-sql", default=None, help="write the view definitions to this .sql file and exit "
                   "(open the same views from any DuckDB client: duckdb -init FILE)")
    i.set_defaults(fn=cmd_inspect)

    a = parser.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main(sys.argv[1:])
