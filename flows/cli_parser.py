"""The `parapipe` argument parser: every option documented with its default, examples per subcommand, `--version`,
`--debug`, and `--config FILE` (YAML or JSON) for the subcommands with many options. Imports nothing heavy: the sft
recipe flags (which need torch) are added only when the command is `sft`.
"""
import argparse
import sys

from flows.cli_support import CLIError, default_root, load_object

EXAMPLES = {
    "generate": ["parapipe generate --checkpoint runs/default/sft/final \\\n"
                 "    --prompt 'paint the blue square green' --image input.png --out out/",
                 "parapipe init-tiny --out tiny && parapipe generate --checkpoint tiny --prompt 'a red circle' "
                 "--out out/"],
    "init-tiny": ["parapipe init-tiny --out runs/tiny-ckpt --seed 1"],
    "run": ["parapipe run                      # the whole pipeline into runs/default (~27 min on 2 cores)",
            "parapipe run --out runs/quick --toy-samples 200 --sft-steps 50",
            "parapipe run --config run.yaml --gpu   # run.yaml: PipelineConfig fields "
            "(tasks/pipeline/pipeline_config.py)"],
    "aggregate": ["parapipe aggregate --root data --dataset toy-tiny      # the toy world",
                  "parapipe aggregate --sources sources.yaml --dataset magicbrush --resolution 256"],
    "traces": ["parapipe traces --dataset toy-tiny",
               "parapipe traces --generator '{\"kind\": \"http\", \"model\": \"qwen\", "
               "\"base_url\": \"http://gpu:8000/v1\"}'",
               "parapipe traces --generator vllm.yaml --filters '{\"min_words\": 5}'"],
    "sft": ["parapipe sft --dataset toy-tiny --steps 200",
            "parapipe sft --recipe small --dataset magicbrush --gpu --workers 8 --sft.lr 3e-4",
            "parapipe sft --config sft.yaml     # sft.yaml: {dataset: magicbrush, workers: 8, gpu: true}"],
    "rl": ["parapipe rl --checkpoint runs/default/sft/final --rounds 4",
           "parapipe rl --checkpoint CKPT --config rl.yaml   # RLConfig fields and/or rl options"],
    "eval": ["parapipe eval --checkpoint runs/default/sft/final --limit 30",
             "parapipe eval --checkpoint runs/default/sft/final runs/default/rl/final --modes parallel sequential"],
    "ablate": ["parapipe ablate decoding --checkpoint runs/default/sft/final",
               "parapipe ablate reward-level --checkpoint SFT_CKPT --clip-folder runs/default/reward --config "
               "'{\"rounds\": 8}'",
               "parapipe ablate sampled-steps --checkpoint SFT_CKPT --ks 1 3 5 --limit 100"],
    "fit-reward": ["parapipe fit-reward --out runs/reward"],
    "query": ["parapipe query 'SELECT * FROM samples_by_source'",
              "parapipe query --format csv --max-rows 0 'SELECT * FROM traces' > traces.csv",
              "parapipe query --max-width 0 'SELECT instruction, text FROM traces JOIN samples USING (sample_id)'"],
    "inspect": ["parapipe inspect                  # SQL prompt; .tables lists the views",
                "echo 'SELECT * FROM trace_stats;' | parapipe inspect --root runs/default/data",
                "parapipe inspect --write-sql views.sql"],
}
DESCRIPTION = """ParaPipe: data -> reasoning traces -> SFT -> ParaRL -> evaluation for MMaDA-Parallel-style models.

Stages one by one: aggregate, traces, sft, rl, eval; all of them: run. Look at the results: query, inspect,
generate. Errors print one line; add --debug for the traceback. Storage root: --root, else $PARAPIPE_ROOT, else
runs/default/data when it exists, else data."""
OPTION_FILE = ("aggregate", "traces", "sft", "eval")  # --config FILE of the subcommand's own options


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' after every option that has a real default, and keeps the examples' line breaks."""

    def _get_help_string(self, action):
        h = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in h or hidden or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("parapipe")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def _sub(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.get(name, []))
    import textwrap

    p = sub.add_parser(name, help=help, description=textwrap.fill(description or help, 100), epilog=epilog,
                       formatter_class=HelpFormatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors (also PARAPIPE_DEBUG=1)")
    return p


def _root(p, what: str = "storage root: a folder or s3://bucket/prefix") -> None:
    root, why = default_root()
    p.add_argument("--root", default=None, help=f"{what}. Default: $PARAPIPE_ROOT, else runs/default/data when it "
                   f"exists (where `parapipe run` writes), else data; here: {root}")


def _dataset(p, help: str = "dataset name: the run partition of the samples table (`parapipe aggregate "
             "--dataset`)") -> None:
    p.add_argument("--dataset", default="toy-tiny", help=help)


def _json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a readable summary")


def _option_file(p) -> None:
    p.add_argument("--config", dest="options_file", default=None, metavar="FILE",
                   help="YAML or JSON file of this command's options (keys as the long options, e.g. batch_size: 8); "
                   "flags given on the command line win")


def _sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default=None, choices=("mmada-parallel-m", "mmada-parallel-a"),
                   help="upstream's published inference settings for released checkpoints "
                   "(tasks/common/generate.RELEASED_SETTINGS, bugs fixed); explicit flags still win")
    g = p.add_argument_group("sampler", "Default: the sampler the checkpoint records (its evaluation's); a flag that "
                             "departs from it prints a warning.\nA checkpoint that records none gets [the value in "
                             "brackets].")
    g.add_argument("--steps", type=int, default=None, help="text denoising steps on the shared timeline (S) [32]")
    g.add_argument("--image-steps", type=int, default=None, help="image decoding steps [16]")
    g.add_argument("--text-length", type=int, default=None, help="output text slots [what the checkpoint was "
                   "trained with, else 64]")
    g.add_argument("--block-length", type=int, default=None, help="semi-autoregressive text block length, in tokens "
                   "[the whole text is one block]")
    g.add_argument("--text-cfg", type=float, default=None, help="classifier-free guidance scale on text logits [0]")
    g.add_argument("--image-cfg", type=float, default=None, help="classifier-free guidance scale on image logits [0]")
    g.add_argument("--text-temperature", type=float, default=None, help="0 = greedy text [0]")
    g.add_argument("--image-temperature", type=float, default=None, help="0 = greedy image codes [1]")
    f = p.add_argument_group("fast sampling", "Approximate speed-ups, off by default (figures: benchmarks/sampler.py)")
    f.add_argument("--cache", choices=("none", "prefix", "dual"), default=None,
                   help="approximate KV cache: prefix (prompt) or dual (prompt + settled output slots) [none]")
    f.add_argument("--cache-refresh", type=int, default=None, metavar="N",
                   help="a full pass every N passes with --cache [4]")
    f.add_argument("--text-threshold", type=float, default=None, metavar="P",
                   help="commit every text token more confident than P at once (Fast-dLLM) [off]")
    f.add_argument("--image-threshold", type=float, default=None, metavar="P",
                   help="keep every image code more confident than P at once [off]")
    f.add_argument("--image-cache-ratio", type=float, default=None, metavar="R",
                   help="with --cache dual: reuse the last logits of the share R of masked image codes that were "
                        "surest, recompute the rest (Lumina-DiMOO's ML-Cache; it uses 0.9) [0 = off]")
    p.add_argument("--mode", choices=("parallel", "sequential"), default="parallel",
                   help="decode text and image together (parallel) or text first, then image (sequential)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same files)")


def _device_args(p) -> None:
    p.add_argument("--device", default="auto", help="torch device: cpu, cuda, cuda:1; auto = cuda when torch sees "
                   "one, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights while sampling; auto = bfloat16 on cuda (as upstream), float32 on cpu")


def _generate_parsers(sub, cli) -> None:
    g = _sub(sub, "generate", "sample reasoning text + image from a checkpoint folder")
    g.add_argument("--checkpoint", required=True, help="folder with config.json, model.safetensors, tokenizer.json")
    g.add_argument("--prompt", required=True, help="instruction (editing, with --image) or prompt (generation)")
    g.add_argument("--image", default=None, help="input image (PNG/JPEG) to edit; needs an image tokenizer")
    g.add_argument("--out", required=True, help="output folder: text.txt, image.png (or image_codes.txt), meta.json")
    _device_args(g)
    g.add_argument("--image-tokenizer", default=None, help="image tokenizer folder when the checkpoint has no "
                   "image_tokenizer/ (e.g. showlab/magvitv2 for MMaDA-Parallel-M)")
    g.add_argument("--resize", choices=("squash", "center_crop"), default="squash",
                   help="how an input image of another size is fitted to the tokenizer's (as aggregation)")
    _sampler_args(g)
    g.set_defaults(fn=cli.cmd_generate)

    t = _sub(sub, "init-tiny", "write a tiny random checkpoint folder (for trying generate)")
    t.add_argument("--out", required=True, help="folder to write")
    t.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    t.set_defaults(fn=cli.cmd_init_tiny)



def _run_parser(sub, cli) -> None:
    r = _sub(sub, "run", "the whole pipeline on the embedded default: aggregate, reward, traces, SFT, ParaRL, eval",
             "Runs every stage into --out (data/, sft/, rl/, eval/, examples/). Unchanged stages are skipped on a "
             "re-run. Options below override --config (PipelineConfig fields, tasks/pipeline/pipeline_config.py).")
    r.add_argument("--config", default=None, metavar="FILE", help="YAML or JSON file (or inline JSON) of "
                   "PipelineConfig fields: out, dataset, seed, recipe, toy_samples, sft_steps, num_workers, gpu, "
                   "reward_steps, rl, eval_modes, eval_limit, examples")
    r.add_argument("--out", default=None, help="run folder [default: runs/default]")
    r.add_argument("--dataset", default=None, help="dataset name inside the run's lake [default: toy-tiny]")
    r.add_argument("--recipe", default=None, help="SFT recipe: preset (toy-tiny, toy-all, small) or JSON file "
                   "[default: toy-tiny]")
    r.add_argument("--toy-samples", type=int, default=None, help="toy-world tasks to generate [default: the recipe's]")
    r.add_argument("--sft-steps", type=int, default=None, help="SFT optimiser steps [default: PipelineConfig's]")
    r.add_argument("--workers", type=int, default=None, help="Ray Train workers for SFT, one CPU (or GPU) each "
                   "[default: 2]")
    r.add_argument("--gpu", action="store_true", help="SFT workers and ParaRL actors on GPUs (one GPU per worker)")
    r.add_argument("--seed", type=int, default=None, help="seeds data, traces, reward, RL, sampling [default: 0]")
    _json_flag(r)
    r.set_defaults(fn=cli.cmd_run)


def _stage_parsers(sub, cli, command: str | None) -> None:
    ag = _sub(sub, "aggregate", "aggregate sources into a validated, deduplicated samples table (resumable)")
    ag.add_argument("--sources", default=None, metavar="FILE|JSON", help="JSON or YAML file (or inline JSON): a list "
                    "of source dicts, tasks/aggregate/sources.SourceSpec fields [default: the toy world, 2000 tasks]")
    _root(ag, "storage root to write into: a folder (created) or s3://bucket/prefix")
    _dataset(ag, "dataset name to write (the run partition of the samples and quarantine tables)")
    ag.add_argument("--resolution", type=int, default=32, help="output image side in pixels")
    ag.add_argument("--resize", choices=("squash", "center_crop"), default="squash",
                    help="how images of another size are fitted to --resolution")
    _option_file(ag), _json_flag(ag)
    ag.set_defaults(fn=cli.cmd_aggregate)

    tr = _sub(sub, "traces", "write a reasoning trace for every sample (resumable: re-run to continue)")
    _root(tr), _dataset(tr)
    tr.add_argument("--generator", default='{"kind": "teacher"}', metavar="JSON|FILE",
                    help=f"JSON object or JSON/YAML file of GeneratorSpec fields (tasks/traces/generators.py); "
                    f"kind is one of teacher, vllm, http, ray, e.g. {{\"kind\": \"vllm\", \"model\": FOLDER}}")
    tr.add_argument("--filters", default=None, metavar="JSON|FILE",
                    help="FilterConfig fields (tasks/traces/traces.py), e.g. {\"min_words\": 5}; [default: FilterConfig's]")
    tr.add_argument("--batch-size", type=int, default=16, help="samples per generator call")
    tr.add_argument("--commit-every-s", type=float, default=10.0,
                    help="commit finished traces at least this often, in seconds (0: after every batch)")
    tr.add_argument("--max-failed-fraction", type=float, default=0.25, help="the run ends failed when more than "
                    "this share of its traces failed (a run whose traces all failed always fails)")
    _option_file(tr), _json_flag(tr)
    tr.set_defaults(fn=cli.cmd_traces)

    sf = _sub(sub, "sft", "supervised fine-tuning on Ray Train (re-run the same --run-id to resume)",
              "Trains on any aggregated dataset. The recipe is a preset or JSON file (--recipe); every recipe field "
              "can then be overridden by its own flag (shown with `parapipe sft --help`).")
    _root(sf), _dataset(sf)
    sf.add_argument("--out", default="runs/sft", help="output folder: checkpoints/RUN_ID/final, image_tokenizer/, ray/")
    sf.add_argument("--run-id", default=None, help="run name: checkpoint folder and metric rows [default: "
                    "sft-DATASET]")
    sf.add_argument("--recipe", default=None, help="preset (toy-tiny, toy-all, small) or JSON file of recipe fields "
                    "(tasks/sft/recipe.py; {'preset': ...} picks the base) [default: toy-tiny on toy data, else small]")
    sf.add_argument("--steps", type=int, default=None, help="optimiser steps (shortcut for --sft.total_steps, with a "
                    "proportionate warm-up) [default: the recipe's]")
    sf.add_argument("--workers", type=int, default=2, help="Ray Train data-parallel workers")
    sf.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    sf.add_argument("--fsdp", action="store_true", help="FSDP2 per block with bf16 compute (GPUs)")
    sf.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N optimiser steps")
    _option_file(sf), _json_flag(sf)
    if command == "sft":  # ~100 recipe flags; they import torch, so only when asked for
        from tasks.sft.recipe import recipe_flags

        recipe_flags(sf)
    sf.set_defaults(fn=cli.cmd_sft)


def _rl_eval_parsers(sub, cli) -> None:
    rl = _sub(sub, "rl", "ParaRL from an SFT checkpoint (re-run the same --run-id to resume)",
              "Fields not given keep rl/learner.RLConfig's defaults; --config sets any of them (and any rl option).")
    rl.add_argument("--checkpoint", required=True, help="SFT checkpoint folder (e.g. runs/default/sft/final, make "
                    "run's)")
    _root(rl), _dataset(rl, "dataset whose train split gives the prompts")
    rl.add_argument("--out", default="runs/rl", help="output folder: checkpoints/RUN_ID/, reward/PRESET/ (the toy "
                    "CLIP fitted when no --clip-folder is given)")
    rl.add_argument("--run-id", default="rl-toy-tiny", help="run name: checkpoint folder and metric rows")
    rl.add_argument("--config", default=None, metavar="JSON|FILE", help="inline JSON or a JSON/YAML file: RLConfig "
                    "fields (rl/learner.py) and/or rl options (root, dataset, sampler, ...); flags win")
    rl.add_argument("--rounds", type=int, default=None, help="RL rounds [RLConfig.rounds]")
    rl.add_argument("--prompts", type=int, default=None, help="prompts per round (B) [RLConfig.prompts_per_round]")
    rl.add_argument("--group-size", type=int, default=None, help="samples per prompt (G) [RLConfig.group_size]")
    rl.add_argument("--k", type=int, default=None, help="sampled (rewarded) denoising steps per rollout (K) "
                    "[RLConfig.sampled_steps]")
    rl.add_argument("--reward", choices=("clip", "exact", "graded"), default=None,
                    help="reward model [RLConfig.reward]")
    rl.add_argument("--mode", choices=("trajectory", "output"), default=None,
                    help="reward every sampled step (trajectory) or the final output only [RLConfig.reward_mode]")
    rl.add_argument("--lr", type=float, default=None, help="learning rate [RLConfig.lr]")
    rl.add_argument("--beta", type=float, default=None, help="KL weight [RLConfig.beta]")
    rl.add_argument("--seed", type=int, default=None, help="seed [RLConfig.seed]")
    rl.add_argument("--sampler", default=None, metavar="JSON|FILE", help='rollout SamplerConfig fields, e.g. '
                    '{"steps": 20, "image_steps": 10} [default: the toy recipe\'s]')
    rl.add_argument("--clip-folder", default=None, help="reward folder written by `parapipe fit-reward` [default: "
                    "fitted into OUT/reward on toy data]")
    rl.add_argument("--clip-model", default=None, help="open_clip architecture, e.g. ViT-L-14 (real data)")
    rl.add_argument("--clip-pretrained", default=None, help="local weights file for --clip-model")
    rl.add_argument("--rollout-workers", type=int, default=1, help="Ray rollout actors")
    rl.add_argument("--reward-workers", type=int, default=1, help="Ray reward actors")
    rl.add_argument("--learner-workers", type=int, default=1, help="1: the learner runs in this process; N > 1: a "
                    "data-parallel group of N Ray learner actors (gloo on CPU, NCCL with --gpu)")
    rl.add_argument("--fsdp", action="store_true", help="shard the learner group's policy with FSDP2 (needs "
                    "--learner-workers 2 or more; what an 8B policy with its optimiser state needs)")
    rl.add_argument("--gpu", action="store_true", help="one GPU per rollout actor and per learner actor, 0.25 GPU "
                    "per reward actor")
    _json_flag(rl)
    rl.set_defaults(fn=cli.cmd_rl)

    fr = _sub(sub, "fit-reward", "train the toy world's tiny CLIP reward model (open_clip)")
    fr.add_argument("--out", required=True, help="folder for the reward model (pass it to rl --clip-folder)")
    fr.add_argument("--preset", default="tiny", help="toy-world preset the reward is fitted on")
    fr.add_argument("--seed", type=int, default=0, help="training seed")
    _json_flag(fr)
    fr.set_defaults(fn=cli.cmd_fit_reward)

    ev = _sub(sub, "eval", "score checkpoints on ParaBench's six metrics (toy ParaBench or a local copy)")
    ev.add_argument("--checkpoint", required=True, nargs="+",
                    help="one or more checkpoint folders, scored side by side (e.g. SFT and ParaRL)")
    ev.add_argument("--benchmark", default="toy-parabench",
                    help="toy-parabench (300 pinned toy tasks) or a local ParaBench folder (Hugging Face layout)")
    _root(ev, "storage root for the benchmark and the evaluation tables (created)")
    ev.add_argument("--run-id", default="eval", help="run name of the evaluation rows")
    ev.add_argument("--modes", nargs="+", default=["parallel"], choices=("parallel", "sequential"),
                    help="decoding modes to score")
    ev.add_argument("--judge", default="exact", choices=("exact", "vlm", "clip"),
                    help="exact: toy-world facts; vlm: an OpenAI-compatible VLM server; clip: CLIP-score proxy")
    ev.add_argument("--judge-args", default=None, metavar="JSON|FILE", help='vlm {"base_url": "http://host:8000/v1", '
                    '"model": "qwen", ...} (tasks/evaluate/judge_vlm.py); clip {"clip_folder": DIR} or {"model_name", '
                    '"pretrained"}')
    ev.add_argument("--sampler", default=None, metavar="JSON|FILE",
                    help="SamplerConfig fields [default: the toy recipe's, greedy]")
    ev.add_argument("--columns", default=None, metavar="JSON|FILE", help="column mapping of a local ParaBench folder")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed")
    _device_args(ev)
    ev.add_argument("--batch-size", type=int, default=16, help="items sampled per model call")
    ev.add_argument("--limit", type=int, default=None, help="first N items only (smoke runs) [default: all]")
    ev.add_argument("--report-dir", default=None, help="where the PNG sample grids and chart go [default: "
                    "runs/eval/RUN_ID]")
    _option_file(ev), _json_flag(ev)
    ev.set_defaults(fn=cli.cmd_eval)

    ab = _sub(sub, "ablate", "one of the paper's ablation tables: train the arms it needs, score them side by side",
              "decoding (Table 3): parallel vs sequential on --checkpoint; sft-vs-rl (Table 2): ParaRL from it; "
              "reward-level (Table 4): trajectory- vs output-level reward; sampled-steps (Table 5): K in --ks. "
              "Re-running the same --run-id resumes every arm.")
    ab.add_argument("study", choices=("decoding", "sft-vs-rl", "reward-level", "sampled-steps"), help="the ablation")
    ab.add_argument("--checkpoint", required=True, help="the SFT checkpoint every arm starts from")
    _root(ab), _dataset(ab, "dataset whose train split gives the ParaRL prompts")
    ab.add_argument("--out", default="runs/ablations", help="output folder: STUDY/ (chart, grids, rl/ checkpoints)")
    ab.add_argument("--run-id", default="ablation", help="prefix of the arms' run ids")
    ab.add_argument("--config", default=None, metavar="JSON|FILE", help="RLConfig fields shared by every arm "
                    "(rounds, lr, reward, ...); the arm's own field wins")
    ab.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5], help="K values of sampled-steps")
    ab.add_argument("--limit", type=int, default=None, help="first N benchmark items only [default: all]")
    ab.add_argument("--clip-folder", default=None, help="reward folder from `parapipe fit-reward` [default: fitted "
                    "into each arm's folder on toy data]")
    _json_flag(ab)
    ab.set_defaults(fn=cli.cmd_ablate)


def _look_parsers(sub, cli) -> None:
    q = _sub(sub, "query", "run one SQL statement over the tables and canned views",
             "Tables: samples, quarantine, traces, trajectories, rewards, runs, train_metrics, eval_results, "
             "rl_metrics, ... (storage/schema.py), each with a `run` column. Canned views: samples_by_source, "
             "quarantine_reasons, trace_stats, trajectories_by_step, reward_by_step, best_and_worst_groups, "
             "rl_progress (storage/query.py).")
    q.add_argument("sql", help="one SQL statement (DuckDB dialect); quote it")
    _root(q)
    q.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="table: aligned text; csv / json: full cell values for other tools")
    q.add_argument("--max-rows", type=int, default=40, help="rows printed (0: all)")
    q.add_argument("--max-width", "--width", type=int, default=40, help="characters per table cell before it is cut "
                   "with '…' (0: no limit)")
    q.set_defaults(fn=cli.cmd_query)

    i = _sub(sub, "inspect", "interactive SQL session over the tables (read-only)",
             "A small SQL prompt over the same views as `parapipe query` (statements end with ';'; .tables, "
             ".schema NAME, .quit). Works piped too.")
    _root(i)
    i.add_argument("--write-sql", default=None, metavar="FILE", help="write the view definitions to this .sql file "
                   "and exit; load it in Python with duckdb.connect().execute(open(FILE).read()), or in the DuckDB "
                   "CLI (installed separately) with duckdb -init FILE")
    i.set_defaults(fn=cli.cmd_inspect)


def build(cli, command: str | None = None) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="parapipe", description=DESCRIPTION, formatter_class=HelpFormatter,
                                     epilog="run `parapipe COMMAND --help` for a command's options and examples")
    parser.add_argument("--version", action="version", version=f"parapipe {_version()}")
    parser.add_argument("--debug", action="store_true", default=False, help="show the full traceback on errors (also "
                        "PARAPIPE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_parser(sub, cli)
    _stage_parsers(sub, cli, command)
    _rl_eval_parsers(sub, cli)
    _generate_parsers(sub, cli)
    _look_parsers(sub, cli)
    return parser, dict(sub.choices)


def _command(argv: list[str]) -> str | None:
    return next((x for x in argv if not x.startswith("-")), None)


def _option_defaults(sub: argparse.ArgumentParser, values: dict, source: str) -> tuple[dict, dict]:
    """Split a config file's keys into this subcommand's options (checked against choices) and the rest."""
    actions = {a.dest: a for a in sub._actions if a.option_strings}
    options, rest = {}, {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if f"recipe:{key}" in actions:  # sft: recipe fields as their flags name them (lr, sft.lr, seq.text_tokens)
            dest = f"recipe:{key}"
        if dest not in actions or dest in ("help", "debug", "options_file", "config"):
            rest[key] = value
            continue
        choices = actions[dest].choices
        if choices and any(v not in choices for v in (value if isinstance(value, list) else [value])):
            raise CLIError(f"{source}: {key}={value!r} is not allowed; choose from {', '.join(map(str, choices))}")
        if dest.startswith("recipe:") and not isinstance(value, str):  # recipe flags parse their own text
            import json

            value = ",".join(map(str, value)) if isinstance(value, list) else json.dumps(value)
        elif isinstance(value, (dict, list)) and actions[dest].nargs is None:
            import json

            value = json.dumps(value)  # JSON options (--generator, --sampler, ...) take text
        options[dest] = value
    return options, rest


def parse(argv: list[str], cli) -> argparse.Namespace:
    """Parse argv; fold in --config files (flags win); fill in the storage root and say which one is used."""
    command = _command(argv)
    parser, subs = build(cli, command)
    a = parser.parse_args(argv)
    sub = subs[a.command]
    a.rl_fields = {}
    path = getattr(a, "options_file", None) if a.command in OPTION_FILE else None
    if a.command == "rl":
        path = a.config
    if path is not None:
        options, rest = _option_defaults(sub, load_object("--config", path), f"--config {path!r}")
        if rest and a.command != "rl":
            raise CLIError(f"--config {path!r}: {sorted(rest)} are not options of `parapipe {a.command}`; "
                           f"see `parapipe {a.command} --help`")
        sub.set_defaults(**options)
        a = parser.parse_args(argv)
        a.rl_fields = rest
    if getattr(a, "root", "given") is None:
        a.root, why = default_root()
        print(f"root: {a.root} ({why})", file=sys.stderr)
    return a
