"""A tiny CLIP for the toy world: the reward model ParaRL scores partial (trace, image) pairs with.

fit_tiny_clip() trains an open_clip CLIP (custom tiny config: 32 px images, 8 px patches = the
image tokenizer's patches, short text context) from scratch on CPU with open_clip's ClipLoss and
AdamW, on (render(task output), compact teacher trace) pairs over all task categories, writes the
folder rl.reward.ClipScorer.from_folder loads, and evaluates it on test-split tasks: retrieval
(top-1 among 100 candidates, both directions) and correlation with the exact graded agreement
rl.reward.toy_agreement.

Data design. Each batch is half plain tasks and half their "twins": the same task with the trace
written with error_rate=1.0 (one object's colour or cell changed, or a phantom object added) and
the image rendered from that changed scene. The twin shares the hint, so only the result phrase and
one object tell the pair apart: these in-batch hard negatives make the model bind colour, shape and
cell instead of counting colours. Partial states: with probability partial_rate a pair is shown
half-denoised: each word is dropped with probability t_text and each 8x8 cell is painted flat grey
(rl.reward.GREY, what partial_image shows for masked patches) with probability t_image, where
t_text and t_image ~ U(0, max_mask) are drawn independently, and so are the masked positions (the
sampler does not unmask matching text and image parts together). One shared ratio per pair was
tried first: the model then matched "how much is masked" on both sides instead of content (a
half-masked pair scored 0.75, nearly a full match, while image-only or text-only partial pairs
scored 0.45). Partial pairs stay positives, so a partial view embeds near its full pair and its
score falls as evidence disappears (held-out partial pairs use one ratio for both sides, as at a
ParaRL step). More of them (partial_rate 0.75 vs 0.25) trades a little
full-pair retrieval (0.80 vs 0.85 top-1) for a closer match to toy_agreement (Pearson 0.60 vs 0.53).

Preprocessing (training and ClipScorer): uint8 / 255, then (x - mean) / std with open_clip's
mean / std, no resize (images are already at the model's 32 px). Texts are tokenised word by word
with open_clip's tokenizer (it never merges across whitespace, so this equals tokenising the joined
text). Leaves out the CLI / Prefect wiring and anything beyond the toy world.
"""
import argparse
import json
import logging
import math
import os
import time

import numpy as np
import torch

from rl.reward import GREY, REWARD_FILE, ClipScorer, save_clip_folder, toy_agreement
from tasks.pipeline.progress import bar
from tasks.toy import PRESETS, render, sample_tasks, write_trace
from tasks.toy.scene import ToyPreset

TOY_CLIP = "ParaPipe-Toy-CLIP"
CONTEXT_LENGTH = 48  # compact traces of the tiny preset: at most 41 tokens (twins 46), with start / end
CANDIDATES = 100  # retrieval: top-1 among this many
WARMUP = 0.05  # fraction of steps with linear warm-up, then cosine decay to 0
MAX_LOGIT_SCALE = math.log(100)
STEPS = 700  # default budget: under 4 minutes on one busy CPU core
LR = 1e-3


def toy_clip_config(preset: ToyPreset, context_length: int = CONTEXT_LENGTH, width: int = 64,
                    layers: int = 2, embed_dim: int = 64) -> dict:
    """open_clip config of the toy CLIP: ViT over token_px patches of the preset's images."""
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": preset.image_size, "patch_size": preset.token_px, "width": width,
                           "layers": layers, "head_width": 32, "mlp_ratio": 4.0},
            "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                         "heads": width // 32, "layers": layers}}


# ---------------------------------------------------------------------------------------------
# data

def build_pairs(preset: ToyPreset, n: int, split: str, seed: int) -> dict:
    """n tasks of a split as pairs: images / twin_images uint8 (n, H, W, 3), texts / twin_texts."""
    images, texts, twin_images, twin_texts = [], [], [], []
    for task in sample_tasks(preset, n, split, seed):
        twin = write_trace(task, preset, seed=seed, error_rate=1.0, compact=True)
        images.append(render(task.output_scene, preset))
        texts.append(write_trace(task, preset, seed=seed, compact=True).text)
        twin_images.append(render(twin.stated_scene, preset))
        twin_texts.append(twin.text)
    return {"images": np.stack(images), "texts": texts, "twin_images": np.stack(twin_images),
            "twin_texts": twin_texts}


def grey_cells(images: np.ndarray, ratios: np.ndarray, rng: np.random.Generator, cell: int) -> np.ndarray:
    """Copy of uint8 images (B, H, W, 3) with each cell x cell block painted GREY with prob ratios[b]."""
    B, H, W, _ = images.shape
    masked = rng.random((B, H // cell, W // cell)) < ratios[:, None, None]
    px = masked.repeat(cell, 1).repeat(cell, 2)  # (B, H, W)
    out = images.copy()
    out[px] = GREY
    return out


def drop_words(text: str, ratio: float, rng: np.random.Generator) -> list[str]:
    """The words of text, each dropped with probability ratio."""
    words = text.split()
    return [w for w, keep in zip(words, rng.random(len(words)) >= ratio) if keep]


class WordTokens:
    """open_clip token ids of word lists, cached per word; (B, context) long like the tokenizer."""

    def __init__(self, tokenizer, context_length: int):
        self.tok, self.context, self.cache = tokenizer, context_length, {}

    def __call__(self, word_lists: list[list[str]]) -> torch.Tensor:
        out = torch.zeros(len(word_lists), self.context, dtype=torch.long)
        for i, words in enumerate(word_lists):
            ids = [self.tok.sot_token_id]
            for w in words:
                if w not in self.cache:
                    self.cache[w] = self.tok.encode(w)
                ids += self.cache[w]
            ids = ids[:self.context - 1] + [self.tok.eot_token_id]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def train_batch(pairs: dict, batch_size: int, rng: np.random.Generator, hard_negatives: float,
                partial_rate: float, max_mask: float, cell: int) -> tuple[np.ndarray, list[list[str]]]:
    """A batch: plain pairs plus twins of the first ones, some shown partially. (B, H, W, 3), words."""
    n_twin = int(batch_size * hard_negatives)
    idx = rng.choice(len(pairs["texts"]), batch_size - n_twin, replace=False)
    images = np.concatenate([pairs["images"][idx], pairs["twin_images"][idx[:n_twin]]])
    texts = [pairs["texts"][i] for i in idx] + [pairs["twin_texts"][i] for i in idx[:n_twin]]
    partial = rng.random(len(texts)) < partial_rate
    ratios = np.where(partial, rng.uniform(0, max_mask, (2, len(texts))), 0.0)  # (image, text) ratios per pair
    return grey_cells(images, ratios[0], rng, cell), [drop_words(t, r, rng) for t, r in zip(texts, ratios[1])]


def to_pixels(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W): / 255, then (x - mean) / std (as ClipScorer.pixels)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# evaluation

def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / max(1e-12, math.sqrt((a * a).sum() * (b * b).sum())))


def retrieval(scorer: ClipScorer, pairs: dict, candidates: int = CANDIDATES) -> dict:
    """Top-1 accuracy image->text and text->image within groups of `candidates` held-out pairs."""
    img = scorer.embed_images(pairs["images"])
    txt, _ = scorer.embed_texts(pairs["texts"])
    hits_i2t = hits_t2i = total = 0
    for s in range(0, len(img) - candidates + 1, candidates):
        sim = img[s:s + candidates] @ txt[s:s + candidates].T  # (C, C)
        target = torch.arange(candidates)
        hits_i2t += int((sim.argmax(1) == target).sum())
        hits_t2i += int((sim.argmax(0) == target).sum())
        total += candidates
    if total == 0:
        raise ValueError(f"retrieval needs >= {candidates} held-out pairs, got {len(img)}; raise eval_tasks")
    return {"candidates": candidates, "pairs": total, "chance": 1 / candidates, "i2t_top1": hits_i2t / total,
            "t2i_top1": hits_t2i / total}


def agreement_pairs(pairs: dict, preset: ToyPreset, seed: int) -> tuple[list, list[str], list[str]]:
    """Held-out scoring pairs per task: match, twin (1 object changed), other (another task's trace),
    partial (true pair, mask ratio U(0.1, 0.9) on both sides), partial_twin. Returns images, texts, kinds."""
    rng = np.random.default_rng(seed + 1)
    n, cell = len(pairs["texts"]), preset.token_px
    images, texts, kinds = [], [], []
    ratios = rng.uniform(0.1, 0.9, (2, n))
    partial = grey_cells(pairs["images"], ratios[0], rng, cell)
    partial_twin = grey_cells(pairs["images"], ratios[1], rng, cell)
    for i in range(n):
        for kind, image, text in (
                ("match", pairs["images"][i], pairs["texts"][i]),
                ("twin", pairs["images"][i], pairs["twin_texts"][i]),
                ("other", pairs["images"][i], pairs["texts"][(i + 1) % n]),
                ("partial", partial[i], " ".join(drop_words(pairs["texts"][i], ratios[0, i], rng))),
                ("partial_twin", partial_twin[i], " ".join(drop_words(pairs["twin_texts"][i], ratios[1, i], rng)))):
            images.append(image)
            texts.append(text)
            kinds.append(kind)
    return images, texts, kinds


def agreement_eval(scorer: ClipScorer, pairs: dict, preset: ToyPreset, seed: int) -> dict:
    """Pearson / Spearman between CLIP score and toy_agreement over agreement_pairs, means per kind."""
    images, texts, kinds = agreement_pairs(pairs, preset, seed)
    clip = np.asarray(scorer.score(images, texts))
    exact = np.asarray([toy_agreement(t, im, preset) for im, t in zip(images, texts)])
    kinds = np.asarray(kinds)
    by_kind = {k: {"n": int((kinds == k).sum()), "clip_mean": float(clip[kinds == k].mean()),
                   "exact_mean": float(exact[kinds == k].mean())} for k in dict.fromkeys(kinds)}
    hard = kinds != "other"
    return {"pairs": len(texts), "pearson": _pearson(clip, exact), "spearman": _pearson(_ranks(clip), _ranks(exact)),
            "pearson_without_other": _pearson(clip[hard], exact[hard]),
            "matched_mean": by_kind["match"]["clip_mean"],
            "mismatched_mean": float(clip[(kinds == "other") | (kinds == "twin")].mean()), "by_kind": by_kind}


# ---------------------------------------------------------------------------------------------
# training

def train_clip(model, train: dict, preset: ToyPreset, steps: int, batch_size: int, lr: float, seed: int,
               hard_negatives: float, partial_rate: float, max_mask: float, log_every: int = 100) -> list[float]:
    """AdamW (weight decay 0.1 on matrices, linear warm-up, cosine to 0) with open_clip's ClipLoss.

    Returns the loss of every step; the model is left in eval mode.
    """
    import open_clip
    from open_clip.loss import ClipLoss

    rng = np.random.default_rng(seed)
    pp = model.visual.preprocess_cfg
    words = WordTokens(open_clip.get_tokenizer(TOY_CLIP), model.context_length)
    is_matrix = {n: q.ndim >= 2 and "embedding" not in n for n, q in model.named_parameters()}
    groups = [{"params": [q for n, q in model.named_parameters() if is_matrix[n] == m], "weight_decay": wd}
              for m, wd in ((True, 0.1), (False, 0.0))]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, int(WARMUP * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    loss_fn, losses, t0 = ClipLoss(), [], time.perf_counter()
    model.train()
    progress = bar("reward CLIP", steps, unit="step")
    for step in range(steps):
        images, word_lists = train_batch(train, batch_size, rng, hard_negatives, partial_rate, max_mask,
                                         preset.token_px)
        img = model.encode_image(to_pixels(images, pp["mean"], pp["std"]), normalize=True)  # (B, D)
        txt = model.encode_text(words(word_lists), normalize=True)  # (B, D)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        progress.update(1)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.3f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    progress.close()
    model.eval()
    return losses


def fit_tiny_clip(out_folder: str, preset: str = "tiny", train_pairs: int = 20000, steps: int = STEPS,
                  batch_size: int = 256, seed: int = 0, lr: float = LR, eval_tasks: int = 500,
                  hard_negatives: float = 0.5, partial_rate: float = 0.75, max_mask: float = 0.9,
                  width: int = 64, layers: int = 2, threads: int | None = 1, log_every: int = 100) -> dict:
    """Trains the toy CLIP, writes out_folder (config, weights, reward.json) and returns its metrics.

    Args:
        out_folder: written with rl.reward.save_clip_folder; load with ClipScorer.from_folder.
        preset: key of PRESETS.
        train_pairs: train-split tasks (each also gives a twin pair).
        steps / batch_size / lr: AdamW steps, pairs per step, peak learning rate.
        seed: tasks, traces, batches and weights.
        eval_tasks: test-split tasks for retrieval (groups of 100) and the agreement correlation.
        hard_negatives: fraction of each batch that are twins of its other pairs (<= 0.5).
        partial_rate / max_mask: fraction of pairs shown partially, largest mask ratio.
        width / layers: both towers' width and depth (also the embedding size).
        threads: torch threads while fitting (restored after); 1 by default because on small shared
            machines OpenMP threads that wait on busy cores made steps 20x slower. None keeps torch's.
    Returns:
        reward.json's "metrics": retrieval, agreement (pearson, spearman, means by kind), timings.
    """
    import open_clip

    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; use one of {sorted(PRESETS)}")
    if not 0.0 <= hard_negatives <= 0.5:
        raise ValueError(f"hard_negatives={hard_negatives} must lie in [0, 0.5] (twins of the batch's own pairs)")
    if batch_size > train_pairs:
        raise ValueError(f"batch_size={batch_size} exceeds train_pairs={train_pairs}; lower it or add pairs")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        p, t0 = PRESETS[preset], time.perf_counter()
        torch.manual_seed(seed)
        config = toy_clip_config(p, width=width, layers=layers, embed_dim=width)
        os.makedirs(out_folder, exist_ok=True)
        config_path = os.path.join(out_folder, f"{TOY_CLIP}.json")
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        open_clip.add_model_config(config_path)
        root_log = logging.getLogger()
        level, _ = root_log.level, root_log.setLevel(logging.ERROR)  # "no pretrained weights": we train it here
        model = open_clip.create_model(TOY_CLIP, pretrained=None)
        root_log.setLevel(level)
        train = build_pairs(p, train_pairs, "train", seed)
        t1 = time.perf_counter()
        losses = train_clip(model, train, p, steps, batch_size, lr, seed, hard_negatives, partial_rate, max_mask,
                            log_every)
        metrics = {"preset": preset, "train_pairs": train_pairs, "steps": steps, "batch_size": batch_size,
                   "lr": lr, "seed": seed, "hard_negatives": hard_negatives, "partial_rate": partial_rate,
                   "max_mask": max_mask, "width": width, "layers": layers,
                   "final_loss": float(np.mean(losses[-max(1, steps // 20):])), "seconds_data": t1 - t0,
                   "seconds_train": time.perf_counter() - t1}
        save_clip_folder(out_folder, model, TOY_CLIP, config, {"metrics": metrics})
        t2 = time.perf_counter()
        scorer = ClipScorer.from_folder(out_folder)
        test = build_pairs(p, eval_tasks, "test", seed)
        metrics["retrieval"] = retrieval(scorer, test)
        metrics["agreement"] = agreement_eval(scorer, test, p, seed)
        metrics["seconds_eval"] = time.perf_counter() - t2
        metrics["seconds_total"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    with open(os.path.join(out_folder, REWARD_FILE)) as f:
        info = json.load(f)
    with open(os.path.join(out_folder, REWARD_FILE), "w") as f:
        json.dump({**info, "metrics": metrics}, f, indent=2)
    print(summary(out_folder, metrics), flush=True)
    return metrics


def summary(out_folder: str, metrics: dict) -> str:
    """One line: time, loss, retrieval and agreement correlation."""
    r, a = metrics["retrieval"], metrics["agreement"]
    return (f"tiny clip {out_folder}: {metrics['steps']} steps in {metrics['seconds_train']:.0f}s (total "
            f"{metrics['seconds_total']:.0f}s), loss {metrics['final_loss']:.3f}, retrieval@{r['candidates']} i2t "
            f"{r['i2t_top1']:.3f} t2i {r['t2i_top1']:.3f} (chance {r['chance']:.3f}), agreement pearson "
            f"{a['pearson']:.3f} spearman {a['spearman']:.3f}, clip matched {a['matched_mean']:.3f} vs "
            f"mismatched {a['mismatched_mean']:.3f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Train the toy-world CLIP reward model (CPU, minutes).")
    ap.add_argument("--out", required=True, help="output folder (ClipScorer.from_folder reads it)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-pairs", type=int, default=20000)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args(argv)
    return fit_tiny_clip(args.out, preset=args.preset, train_pairs=args.train_pairs, steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    main()
