"""`sft`: supervised fine-tuning of the parallel model on Ray Train, then a held-out evaluation.

prepare (tokenise, cached by content hash; base checkpoint) -> Ray TorchTrainer fit (resumes a
run of the same name) -> score the final checkpoint on the test split next to two baselines.
"""
import dataclasses
import os

from prefect import flow

from tasks.image_codes import fit_image_tokenizer
from tasks.sft import evaluate_checkpoint, prepare_sft, run_sft
from tasks.sft_loop import TOY_TINY_RECIPE


def default_recipe() -> dict:
    r = TOY_TINY_RECIPE
    return {"model": dict(r.model), "sft": dataclasses.asdict(r.sft), "seq": dataclasses.asdict(r.seq),
            "tokenizer_vocab": r.tokenizer_vocab, "categories": r.categories,
            "sampler": {"steps": r.sampler_steps, "image_steps": r.sampler_image_steps,
                        "text_block_length": r.seq.text_tokens, "text_temperature": 0.0,
                        "image_temperature": 0.0, "image_noise": 0.0},
            "eval_per_category": r.eval_per_category, "train_samples": r.train_samples}


@flow(name="sft", log_prints=True)
def sft(root: str = "data", dataset: str = "toy-tiny", out: str = "runs/sft", run_id: str = "sft-toy-tiny",
        recipe: dict | None = None, total_steps: int | None = None, num_workers: int = 2, use_gpu: bool = False,
        init_from: str | None = None, image_tokenizer_dir: str | None = None, checkpoint_every: int = 100,
        eval_interval: int = 500, max_failures: int = 2, fsdp: bool = False) -> dict:
    # Ray workers run in their own working directory: local paths must be absolute
    root = root if "://" in root else os.path.abspath(root)
    out = os.path.abspath(out)
    init_from = os.path.abspath(init_from) if init_from else None
    recipe = recipe or default_recipe()
    if total_steps:
        warmup = min(recipe["sft"]["warmup_steps"], total_steps // 5)  # short runs keep a proportionate warm-up
        recipe = {**recipe, "sft": {**recipe["sft"], "total_steps": total_steps, "warmup_steps": warmup}}
    if not init_from and not image_tokenizer_dir:
        image_tokenizer_dir = fit_image_tokenizer(root, dataset, os.path.join(out, "image_tokenizer"))
    paths = prepare_sft(root, dataset, out, recipe, init_from, image_tokenizer_dir,
                        eval_per_category=max(4, recipe.get("eval_per_category", 16) // 4))
    # the recipe's batch_size is the global batch: each data-parallel worker takes its share
    per_worker = dict(recipe["sft"], batch_size=max(1, recipe["sft"]["batch_size"] // num_workers))
    cfg = {"base": paths["base"], "train_data": paths["train_data"], "seq": recipe["seq"], "sft": per_worker,
           "root": root, "run_id": run_id, "out": out, "checkpoint_every": checkpoint_every, "fsdp": fsdp}
    if "val_data" in paths:
        cfg["eval"] = {"val_data": paths["val_data"], "scenes": paths["scenes"], "preset": paths["preset"],
                       "interval": eval_interval, "sampler": recipe["sampler"]}
    fit = run_sft(cfg, num_workers, use_gpu, os.path.join(out, "ray"), max_failures)
    print(f"{run_id}: {paths['train_size']} training sequences (dropped {paths['dropped']}), "
          f"final metrics {fit['metrics']}")
    tables = evaluate_checkpoint(fit["checkpoint"], root, dataset, run_id, "test",
                                 recipe.get("eval_per_category", 32), recipe["sampler"], recipe["seq"],
                                 recipe.get("categories"))
    for category, methods in sorted(tables["exact_image"].items()):
        print(f"  exact image {category:>12s}: " + "  ".join(f"{m}={v:.2f}" for m, v in methods.items()))
    return {"checkpoint": fit["checkpoint"], "fit_s": fit["fit_s"], "train_size": paths["train_size"],
            "eval": tables}
