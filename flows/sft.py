"""`sft`: supervised fine-tuning of the parallel model on Ray Train, then a held-out evaluation.

recipe (preset for the data, or the caller's) -> image tokenizer (fit, or a folder) -> prepare
(tokenise, cached by content hash; drops reported per reason; base checkpoint) -> Ray TorchTrainer
fit (resumes a run of the same name) -> held-out evaluation: exact toy metrics next to two
baselines on the toy world, held-out loss per modality (+ CLIP alignment when the recipe names
CLIP weights) everywhere -> a summary artifact.
"""
import json
import os
import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.common.runs import recorded
from tasks.sft.image_codes import fit_image_tokenizer
from tasks.sft.recipe import PRESETS, Recipe, default_preset
from tasks.sft.sft import evaluate_checkpoint, prepare_sft, run_sft
from tasks.sft.sft_eval import evaluate_heldout
from tasks.sft.sft_data import is_toy_dataset
from tasks.pipeline.ui_artifacts import publish_markdown, sft_loss_markdown, stable_key


@task(name="choose-image-tokenizer")
def image_tokenizer_for(recipe: dict, root: str, dataset: str, out: str) -> str:
    """The folder of the image tokenizer the run uses (fitted here when the recipe says 'fit')."""
    if recipe["image_tokenizer"] != "fit":
        folder = os.path.abspath(recipe["image_tokenizer"])
        if not os.path.isdir(folder):
            raise ValueError(f"recipe image_tokenizer={recipe['image_tokenizer']!r} is not a folder; pass a PatchVQ, "
                             f"MAGVIT-v2 or aMUSEd VQ folder, or 'fit' to fit a patch VQ on the dataset")
        return folder
    if recipe["init_from"]:  # ours keep image_tokenizer/; a released A folder ships vqvae/ beside the weights
        own = os.path.join(recipe["init_from"], "image_tokenizer")
        return recipe["init_from"] if not os.path.isdir(own) and os.path.isdir(
            os.path.join(recipe["init_from"], "vqvae")) else own
    return fit_image_tokenizer(root, dataset, os.path.join(out, "image_tokenizer"))


def fit_batch(sft: dict, paths: dict, dataset: str, num_workers: int) -> dict:
    """The SFT settings with a batch the prepared data can fill; refuses data too small to train at all."""
    n = paths["train_size"]
    if n == 0:
        raise ValueError(f"every training sample of {dataset!r} was dropped ({paths['dropped']}); raise "
                         f"seq.text_tokens / seq.instruction_tokens or check the traces table")
    if n < num_workers:
        raise ValueError(f"{n} training sequences of {dataset!r} cannot feed {num_workers} workers; "
                         f"pass --workers {max(n, 1)} or add data")
    if sft["batch_size"] <= n:
        return sft
    fitted = n // num_workers * num_workers  # a small dataset: one full-data batch per step, said aloud
    print(f"WARNING: sft.batch_size={sft['batch_size']} is larger than the {n} training sequences of {dataset!r}; "
          f"training with batch_size={fitted} (set --sft.batch_size to choose)")
    return {**sft, "batch_size": fitted}


def _summary(run_id: str, recipe: dict, paths: dict, fit: dict, heldout: dict, toy: dict | None) -> str:
    drops = paths["dropped"]
    lines = [f"# SFT {run_id}", "", f"recipe `{recipe['name']}`; checkpoint `{fit['checkpoint']}`; "
             f"{paths['train_size']} training sequences, batch {recipe['sft']['batch_size']}, in {fit['fit_s']:.0f} s", "",
             "dropped while preparing (never silently): " + ", ".join(f"{k} {v}" for k, v in drops.items()), "",
             "held-out: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in heldout.items())]
    if toy:
        lines += ["", "toy exact images (model): " + ", ".join(f"{c} {m.get('model', 0):.2f}"
                                                         for c, m in sorted(toy["exact_image"].items()))]
    lines += ["", f"recipe: `{json.dumps(recipe)}`"]
    return "\n".join(lines)


@flow(name="sft", log_prints=True)
def sft(root: str = "data", dataset: str = "toy-tiny", out: str = "runs/sft", run_id: str = "sft-toy-tiny",
        recipe: Recipe | None = None, total_steps: int | None = None, num_workers: int = 2, use_gpu: bool = False,
        checkpoint_every: int = 100, eval_interval: int = 500, max_failures: int = 2, fsdp: bool = False) -> dict:
    # Ray workers run in their own working directory: local paths must be absolute
    root = root if "://" in root else os.path.abspath(root)
    out = os.path.abspath(out)
    toy = is_toy_dataset(root, dataset)
    r = (recipe or PRESETS[default_preset(toy)]).to_dict()
    r["init_from"] = os.path.abspath(r["init_from"]) if r["init_from"] else None
    if total_steps:
        warmup = min(r["sft"]["warmup_steps"], total_steps // 5)  # short runs keep a proportionate warm-up
        r["sft"] = {**r["sft"], "total_steps": total_steps, "warmup_steps": warmup}
    run = {"recipe": r, "dataset": dataset, "root": root, "out": out, "num_workers": num_workers, "use_gpu": use_gpu,
           "fsdp": fsdp, "checkpoint_every": checkpoint_every, "eval_interval": eval_interval}
    with recorded(root, run_id, "sft", run) as timings:  # the runs row, with r as resolved below
        return _train(r, toy, root, dataset, out, run_id, num_workers, use_gpu, checkpoint_every, eval_interval,
                      max_failures, fsdp, timings)


def _train(r: dict, toy: bool, root: str, dataset: str, out: str, run_id: str, num_workers: int, use_gpu: bool,
           checkpoint_every: int, eval_interval: int, max_failures: int, fsdp: bool, timings: dict) -> dict:
    t0 = time.perf_counter()
    vq = image_tokenizer_for(r, root, dataset, out)
    paths = prepare_sft(root, dataset, out, r, r["init_from"], vq, eval_per_category=max(4, r["eval_per_category"] // 4))
    r["seq"] = paths["seq"]  # resolved: the layout and image grid of the base checkpoint and tokenizer
    print(f"{run_id}: {paths['train_size']} training sequences; dropped per reason {paths['dropped']}")
    r["sft"] = fit_batch(r["sft"], paths, dataset, num_workers)
    # the recipe's batch_size is the global batch: each data-parallel worker takes its share
    per_worker = dict(r["sft"], batch_size=max(1, r["sft"]["batch_size"] // num_workers))
    cfg = {"base": paths["base"], "train_data": paths["train_data"], "seq": r["seq"], "sft": per_worker,
           "root": root, "run_id": run_id, "out": out, "checkpoint_every": checkpoint_every, "fsdp": fsdp,
           "image_tokenizer": paths["image_tokenizer"], "sampler": r["sampler"]}
    if "val_data" in paths:
        cfg["eval"] = {"val_data": paths["val_data"], "scenes": paths["scenes"], "preset": paths["preset"],
                       "interval": eval_interval, "sampler": r["sampler"]}
    timings["prepare_s"], t0 = round(time.perf_counter() - t0, 3), time.perf_counter()
    fit = run_sft(cfg, num_workers, use_gpu, os.path.join(out, "ray"), max_failures)
    timings["fit_s"], t0 = round(time.perf_counter() - t0, 3), time.perf_counter()
    heldout = evaluate_heldout(fit["checkpoint"], root, dataset, run_id, r, "cuda" if use_gpu else "cpu")
    tables = None
    if toy:
        tables = evaluate_checkpoint(fit["checkpoint"], root, dataset, run_id, "test", r["eval_per_category"],
                                     r["sampler"], r["seq"], r["categories"])
        for category, methods in sorted(tables["exact_image"].items()):
            print(f"  exact image {category:>12s}: " + "  ".join(f"{m}={v:.2f}" for m, v in methods.items()))
    print(f"  held-out: {heldout}")
    timings["eval_s"] = round(time.perf_counter() - t0, 3)
    create_markdown_artifact(_summary(run_id, r, paths, fit, heldout, tables),
                             key="sft-" + "".join(c if c.isalnum() else "-" for c in run_id.lower())[:90])
    publish_markdown(stable_key("sft", run_id, "loss"), sft_loss_markdown, root, run_id, out,
                     description=f"SFT {run_id}: loss per step")
    return {"checkpoint": fit["checkpoint"], "fit_s": fit["fit_s"], "train_size": paths["train_size"],
            "batch_size": r["sft"]["batch_size"], "dropped": paths["dropped"], "heldout": heldout, "eval": tables}
