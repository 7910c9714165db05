"""The toy tiny SFT recipe end to end on CPU: data, speed (fp32 vs bf16, MFU), learning curve, final table.

    python benchmarks/sft_recipe.py                      # TOY_TINY_RECIPE as is (~15 min of training)
    python benchmarks/sft_recipe.py --budget-s 120 --eval-n 16 --lr 3e-3 --layers 6
    python benchmarks/sft_recipe.py --speed-only --batch 32   # one Ray worker's step: fp32, bf16, SDPA

Builds the toy world's tiny preset in memory (tasks/sft/toy_eval.toy_rows), fits the patch-VQ and the
text tokenizer on the train split, tokenises through the cache (tasks/sft/sft_data.load_or_tokenise),
times a large fp32 and bf16 matmul (the machine's peak) and a few train steps in each precision,
trains with tasks/sft/sft_loop.train under a time budget, evaluates held-out edits with
tasks/sft/toy_eval.evaluate every --eval-every steps, and prints the learning curve and the final
per-category table next to the copy-input and most-common-output baselines.
"""
import argparse
import dataclasses
import json
import time

import torch

from model import transformer
from model.image_tokenizer import PatchVQ
from model.tokens import tiny_vocab
from model.transformer import DiffusionLM, ModelConfig
from tasks.common.tokenizer import build_tiny_tokenizer
from tasks.sft.image_codes import png_to_tensor
from tasks.sft.sft_data import SequenceConfig, batch_stream, load_or_tokenise
from tasks.sft.sft_loop import TOY_TINY_RECIPE, SFTConfig, ToyRecipe, make_optimizer, train, train_step
from tasks.sft.toy_eval import evaluate, greedy_sampler, select_per_category, table, toy_rows, toy_scenes
from tasks.toy import PRESETS

SIMPLE = ("recolour", "remove", "replace")
MATMUL_N = 2048
VQ_FIT_IMAGES = 2000


def matmul_peak(dtype: torch.dtype, n: int = MATMUL_N, reps: int = 10) -> float:
    """Best-of-reps FLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def build_data(recipe: ToyRecipe, cache_dir: str, seed: int):
    preset = PRESETS["tiny"]
    t0 = time.perf_counter()
    train_rows = toy_rows(preset, recipe.train_samples, "train", seed, recipe.categories)
    cats = recipe.eval_categories or recipe.categories
    n_cats = len(cats) if cats else 11
    val_rows = toy_rows(preset, recipe.eval_per_category * n_cats, "val", seed, cats)
    t_rows = time.perf_counter() - t0
    images = torch.stack([png_to_tensor(r["output_image"]) for r in train_rows[:VQ_FIT_IMAGES]])
    vq = PatchVQ.fit(images, patch_size=preset.token_px, codebook_size=16, seed=seed)
    tok = build_tiny_tokenizer([r["instruction"] for r in train_rows] + [r["reference_trace"] for r in train_rows],
                               vocab_size=recipe.tokenizer_vocab)
    vocab = tiny_vocab(len(tok), vq.codebook_size)
    t1 = time.perf_counter()
    train_set = load_or_tokenise(train_rows, tok, vq, vocab, recipe.seq, cache_dir)
    val_set = load_or_tokenise(val_rows, tok, vq, vocab, recipe.seq, cache_dir)
    print(f"data: {len(train_rows)} train rows -> {len(train_set)} sequences (dropped {train_set.dropped}), "
          f"{len(val_set)} val (dropped {val_set.dropped}); rows {t_rows:.1f}s, tokenise "
          f"{time.perf_counter() - t1:.1f}s (cache hit: {train_set.from_cache}); text vocab {len(tok)}")
    return preset, tok, vq, vocab, train_set, val_set, toy_scenes(val_rows)


def precision_speed(model_cfg: ModelConfig, cfg: SFTConfig, stream, mask_id: int, steps: int = 8) -> dict:
    """Median tokens/s of train_step in fp32, in bf16, and in bf16 with every attention through SDPA (the CPU
    flash kernel) instead of model/transformer.attention's explicit fp32 form; steps alternate between the
    variants (so load from other processes hits all alike), after one warm-up step each."""
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True), ("bf16 sdpa", True)):
        c = dataclasses.replace(cfg, bf16=bf16)
        model = DiffusionLM(model_cfg).init_weights(cfg.seed)
        runs[name] = (c, model, make_optimizer(model, c), torch.Generator().manual_seed(0), [])
    explicit_max = transformer.EXPLICIT_ATTENTION_MAX_KEYS
    for i in range(steps + 1):
        batch = next(stream)
        for name, (c, model, opt, gen, rates) in runs.items():
            transformer.EXPLICIT_ATTENTION_MAX_KEYS = 0 if name == "bf16 sdpa" else explicit_max
            t0 = time.perf_counter()
            tokens = train_step(model, opt, [batch], c, gen, 1, mask_id)["tokens"]
            if i:
                rates.append(tokens / (time.perf_counter() - t0))
    transformer.EXPLICIT_ATTENTION_MAX_KEYS = explicit_max
    return {k: sorted(v[4])[len(v[4]) // 2] for k, v in runs.items()}


def print_curve(history: list[dict]) -> None:
    print("\nlearning curve (exact image on held-out val edits)")
    print(f"{'step':>6} {'train_s':>8} {'loss':>7} {'l_text':>7} {'l_img':>7} " +
          " ".join(f"{c[:8]:>8}" for c in SIMPLE) + f" {'overall':>8} {'text':>6} {'agree':>6}")
    for r in history:
        if "exact_image/overall" in r:
            print(f"{r['step']:6d} {r['train_s']:8.0f} {r['loss']:7.3f} {r['loss_text']:7.3f} {r['loss_image']:7.3f} "
                  + " ".join(f"{r.get(f'exact_image/{c}', float('nan')):8.2f}" for c in SIMPLE)
                  + f" {r['exact_image/overall']:8.2f} {r['text_correct/overall']:6.2f} {r['agreement/overall']:6.2f}")


def print_final(rows: list[dict]) -> None:
    model = {(r["metric"], r["category"]): r for r in rows if r["method"] == "model"}
    base = table(rows)
    print(f"\n{'category':12s} {'n':>4} {'exact_img':>9} {'text':>6} {'agree':>6} | {'copy_in':>7} {'common':>7}")
    for cat in sorted({c for _, c in model}, key=lambda c: (c == "overall", c)):
        m = lambda k: model[(k, cat)]["value"]  # noqa: E731
        print(f"{cat:12s} {model[('exact_image', cat)]['n']:4d} {m('exact_image'):9.2f} {m('text_correct'):6.2f} "
              f"{m('agreement'):6.2f} | {base[cat].get('copy_input', 0):7.2f} {base[cat].get('common_output', 0):7.2f}")


def parse_args() -> argparse.Namespace:
    r = TOY_TINY_RECIPE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=r.time_budget_s, help="training seconds (eval excluded)")
    ap.add_argument("--steps", type=int, default=r.sft.total_steps, help="optimiser steps (cosine length)")
    ap.add_argument("--eval-every", type=int, default=r.sft.eval_interval)
    ap.add_argument("--eval-n", type=int, default=r.eval_per_category, help="val samples per category")
    ap.add_argument("--train-samples", type=int, default=r.train_samples)
    ap.add_argument("--categories", default=",".join(r.categories or ()), help="comma list; empty = all")
    ap.add_argument("--d-model", type=int, default=r.model["d_model"])
    ap.add_argument("--layers", type=int, default=r.model["n_layers"])
    ap.add_argument("--heads", type=int, default=r.model["n_heads"])
    ap.add_argument("--mlp", type=int, default=r.model["mlp_hidden_size"])
    ap.add_argument("--lr", type=float, default=r.sft.lr)
    ap.add_argument("--batch", type=int, default=r.sft.batch_size)
    ap.add_argument("--warmup", type=int, default=r.sft.warmup_steps)
    ap.add_argument("--objective", default=r.sft.objective)
    ap.add_argument("--image-coeff", type=float, default=r.sft.image_coeff)
    ap.add_argument("--dropout", type=float, default=r.sft.cond_dropout)
    ap.add_argument("--text-tokens", type=int, default=r.seq.text_tokens)
    ap.add_argument("--instr-tokens", type=int, default=r.seq.instruction_tokens, help="0 = unpadded prompts")
    ap.add_argument("--image-pos", action="store_true", help="learned row/column embeddings on image blocks")
    ap.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    ap.add_argument("--seed", type=int, default=r.sft.seed)
    ap.add_argument("--cache-dir", default="runs/sft_cache")
    ap.add_argument("--skip-speed", action="store_true", help="skip the matmul peak and fp32/bf16 comparison")
    ap.add_argument("--speed-only", action="store_true", help="stop after the speed comparison")
    ap.add_argument("--json", default="", help="write history + final rows to this file")
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    torch.manual_seed(a.seed)
    r = TOY_TINY_RECIPE
    cats = tuple(c for c in a.categories.split(",") if c) or None
    recipe = dataclasses.replace(
        r, train_samples=a.train_samples, categories=cats, eval_per_category=a.eval_n, time_budget_s=a.budget_s,
        seq=SequenceConfig(text_tokens=a.text_tokens, instruction_tokens=a.instr_tokens),
        model={**r.model, "d_model": a.d_model, "n_layers": a.layers, "n_heads": a.heads, "mlp_hidden_size": a.mlp},
        sft=dataclasses.replace(r.sft, lr=a.lr, batch_size=a.batch, total_steps=a.steps, warmup_steps=a.warmup,
                                objective=a.objective, image_coeff=a.image_coeff, cond_dropout=a.dropout,
                                bf16=not a.fp32, seed=a.seed, eval_interval=a.eval_every))
    preset, tok, vq, vocab, train_set, val_set, scenes = build_data(recipe, a.cache_dir, a.seed)
    pos = dict(image_pos_grid=tuple(vq.grid), soi_id=vocab.soi_id) if a.image_pos else {}
    model_cfg = ModelConfig(**recipe.model, vocab_size=vocab.vocab_size, embedding_size=vocab.vocab_size, **pos)
    cfg, seq = recipe.sft, recipe.seq
    stream = batch_stream(train_set, vocab, seq, cfg.batch_size, cfg.seed, cond_dropout=cfg.cond_dropout)
    model = DiffusionLM(model_cfg).init_weights(cfg.seed)
    n_params = model.num_params()
    print(f"model {n_params / 1e6:.2f}M params {recipe.model}; threads {torch.get_num_threads()}")
    print(f"recipe: {json.dumps(dataclasses.asdict(recipe), default=str)}")
    if not a.skip_speed:
        peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
        speed = precision_speed(model_cfg, cfg, stream, vocab.mask_id)
        for k in ("fp32", "bf16"):
            flops = 6 * n_params * speed[k]
            print(f"{k}: matmul peak {peak[k] / 1e9:6.1f} GFLOP/s, train {speed[k]:7.0f} tokens/s = "
                  f"{flops / 1e9:5.2f} model GFLOP/s, MFU {flops / peak[k]:.1%} (of the {k} peak)")
        print(f"bf16 / fp32 train tokens/s: {speed['bf16'] / speed['fp32']:.2f}x; explicit / SDPA attention (bf16): "
              f"{speed['bf16'] / speed['bf16 sdpa']:.2f}x ({speed['bf16 sdpa']:.0f} tokens/s with SDPA)")
        if a.speed_only:
            return
    eval_set = select_per_category(val_set, recipe.eval_per_category)
    sampler = greedy_sampler(seq.text_tokens, recipe.sampler_steps, recipe.sampler_image_steps)

    def eval_fn(step: int, m) -> dict:
        t0 = time.perf_counter()
        rows = evaluate(m, eval_set, scenes, train_set, vocab, seq, tok, vq, preset, sampler, baselines=False)
        out = {f"{x['metric']}/{x['category']}": x["value"] for x in rows}
        out["eval_s"] = time.perf_counter() - t0
        return out

    def log_fn(row: dict) -> None:
        extra = (f" exact_image {row['exact_image/overall']:.2f} text {row['text_correct/overall']:.2f} agreement "
                 f"{row['agreement/overall']:.2f}" if "exact_image/overall" in row else "")
        print(f"step {row['step']:5d} {row['train_s']:6.0f}s loss {row['loss']:.3f} (text {row['loss_text']:.3f} "
              f"image {row['loss_image']:.3f}) gnorm {row['grad_norm']:.2f} lr {row['lr']:.2e} "
              f"{row['tokens_per_s']:.0f} tok/s{extra}", flush=True)

    history = train(model, stream, cfg, vocab.mask_id, time_budget_s=recipe.time_budget_s, eval_fn=eval_fn,
                    log_fn=log_fn)
    last = history[-1]
    steps_s = last["step"] / last["train_s"]
    tps = sum(h["tokens"] for h in history) / last["train_s"]
    print(f"\ntrained {last['step']} steps in {last['train_s']:.0f}s: {steps_s:.2f} steps/s, {tps:.0f} tokens/s, "
          f"{6 * n_params * tps / 1e9:.2f} model GFLOP/s")
    print_curve(history)
    rows = evaluate(model, eval_set, scenes, train_set, vocab, seq, tok, vq, preset, sampler)
    print_final(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"recipe": dataclasses.asdict(recipe), "history": history, "final": rows}, f, default=str)


if __name__ == "__main__":
    main()
