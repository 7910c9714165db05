"""Sampler speed: each exact and approximate mode against an upstream-equivalent sampler, side by side.

    python benchmarks/sampler.py [--items 100] [--repeats 2] [--skip-speed] [--skip-toy] [--skip-drift]
    python benchmarks/sampler.py --gpu        # 8B-shaped random model, 1024 codes, 256 text, 128 steps
    python benchmarks/sampler.py --paper-layout --skip-toy --skip-drift   # that layout on CPU, toy width

Upstream-equivalent = the same algorithm as upstream MMaDA-Parallel runs it: one prompt at a time,
a full forward pass per step over the whole sequence (the head on every position), no cache, the
unconditional CFG rows as separate passes. Every other row is measured in the same process right
after it, so the ratios hold on a shared machine even when the absolute numbers move.
1. speed: a ~100M-parameter random model (random weights are enough for speed), output tokens/s.
2. toy: the trained toy checkpoint on the toy ParaBench (exact judge): tokens/s and Output
   Alignment (OA) per mode; exact modes must give OA identical to the reference, approximate ones
   print their OA change.
3. drift: how far rollout-time behaviour log-probs under each approximate mode are from the
   learner's full-pass replay (benchmarks/sampler_drift.py), i.e. which modes RL may use.

Latest figures (2026-11-25, 2 CPU cores, idle machine; earlier runs are in the git history of this file;
the paper-layout ones predate the last two changes, which do not touch batch 1 at L > 512):
- Paper layout (`--paper-layout --skip-toy --skip-drift`, threshold rows skipped, 6.4 min; then
  `--repeats 2` of three rows): upstream 33-38 tokens/s; exact joined CFG rows 1.30x, separate CFG
  passes 1.37-1.45x; dual r8 2.64x; bf16 + dual r8 2.55-2.83x; + image logit cache 0.9 3.16-3.32x;
  dual r8 + text blocks of 32 + image logit cache 0.9 3.38x. Random weights: no OA column, and the
  threshold rows are left out (a random model is never confident).
- Toy, make run's checkpoint since the toy-tiny recipe's learning rate was halved (`--checkpoint
  <make run's sft/final> --items 300 --skip-speed --threads 1`; 190 of the 300 items fit its layout;
  3.5 min): upstream 466 tokens/s at 26.4 OA; exact 1.25-1.28x (100% same rows); bf16 + dual r8 4.20x
  (+0.7); threshold decoding now pays on this checkpoint: bf16 + dual 6 + text & image threshold 0.9
  6.15x (+0.9). With `--batch 64` (a row's tokens do not depend on its batch, so the OA column is the
  same): bf16 + dual 6 + text & image threshold 0.9 6.50x (+0.9), and in three runs of only a few rows
  (`--modes ...`) 7.54x, 8.09x and 8.13x (+0.9 OA, -1.0 TQ): the 8x target within 1 point, on this
  checkpoint, in two runs of four. With `--toy-repeats 3` (each timing the fastest of three; upstream's own
  rate still moved 423-481 tokens/s between runs): bf16 + dual 20 + text & image threshold 0.9 8.16x, 8.24x,
  8.30x, 8.69x (+2.2 OA, +0.7 TQ), dual 6 7.30-8.15x; at `--batch 16` 7.22x and 6.60x. Thresholds 0.8 ran
  7.90-9.75x at -0.6 OA but -11.6 TQ (garbled words), which OA alone does not show; hence the dTQ column.
  Other checkpoints fall short: on the seed 1 and seed 2 checkpoints of the same recipe the same rows ran
  6.2-7.8x and 6.2-7.4x (seed 1's best within 1 point 7.51x at +1.5; seed 2 lost 4.4-5.8 in every row; dual 20
  7.00x / 7.22x), and the earlier 3e-3 checkpoint lost 3.2-11.5. Threshold decoding pays when the model is
  sure of itself; a less sure checkpoint commits fewer slots per step (slower) and errs where it does.
- Toy, the earlier 3e-3 checkpoint (same command, 4 min): upstream 449 tokens/s at 32.2 OA; exact 1.40x;
  prefix r4 2.15x (-0.1); dual r4 3.18x (-0.2); bf16 + dual r4 4.31x (+0.6, its best within 1 point);
  bf16 + dual r8 4.77x (-1.6); bf16 + dual r8 + image logit cache 0.9 4.63x (-1.0); threshold decoding
  cost it 3-24 points. With `--batch 64`: bf16 + dual r4 + image logit cache 0.9 4.99x (-0.1);
  `--batch 96`: 5.36-5.42x, but the modes' own rate stays at ~2,100-2,200
  tokens/s and upstream's moved between 397 and 496 tokens/s across these runs (batch 1 on a shared
  machine), which is most of the difference. OA moves by ~0.5 per item, and settings whose tokens differ from the
  reference's in most rows move it by up to +-2.5 between neighbours, so read single differences
  below ~2 points as noise. Per sample, upstream runs 1,760 columns through the blocks (20 full passes
  of 88); a batched dual cache runs 751 at refresh 4, 612 at r8, 479 refreshing only once: without
  threshold decoding (fewer steps) a cache cannot take this 20-step, 48-slot timeline below ~3.7x
  less work, and bf16 adds ~1.4x.
- Drift (RL): exact mode 0, threshold modes ~3e-9 (rollouts use the SDPA kernel, the learner's
  autograd replay the explicit form); prefix r4 2.6e-2, dual r4 3.1e-2, dual r8 7.6e-2 mean |dlogp|,
  dual r4 + image logit cache 4.8e-2: not exact.
- 93M random model (the default speed table: 64 codes, 32 text, 8 steps, image CFG 4, batch 2;
  `--skip-toy --skip-drift --repeats 3`, 3.5 min; each upstream run is ~2 s, so ratios move by ~15%
  between repeats): exact joined 0.95-1.15x, separate CFG passes 1.11-1.16x; prefix r4 1.43-1.50x;
  dual r8 1.90-2.13x; bf16 2.05-2.40x; bf16 + dual r8 3.39-3.97x; + image logit cache 0.9 3.61-4.90x.
What moved the figures, in order: rows that finished decoding skip the pass (threshold modes); exact
passes drop leading columns that are padding in every row (upstream runs unconditional prompts
unpadded); image codes are drawn only at masked slots by inverse CDF instead of a multinomial race
over N x K; ML-Cache; (largest at the paper layout: the ML-Cache row went from 19.9 s to 11.9 s per
sample) a pass returns logits only for the slots the step decides, so the head, text noise, guidance,
softmax and sampling never touch the rest; sampling through the SDPA kernel (the explicit fp32
attention that speeds up CPU training was 29% of the toy's best mode); and (toy dual rows, batch 16)
each row running only its own columns instead of the union over the batch. What limits the toy: its
20-step timeline and 48 output slots leave a cache little to skip (a dual cache with refresh r still
runs a full pass every r steps, and with one text block every masked slot is recomputed each step),
and this checkpoint loses OA under threshold decoding. At the paper layout on CPU the 4M model's
attention over 2,373 positions is now most of a step. The 8B GPU columns (`--gpu`) are unmeasured: no
GPU was lent to this project.
"""
import argparse
import copy
import dataclasses
import glob
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.layout import OutputShape, edit_prompt  # noqa: E402
from model.sampling import SamplerConfig, generate  # noqa: E402
from model.tokens import tiny_vocab  # noqa: E402
from model.transformer import DiffusionLM, ModelConfig  # noqa: E402

TOY_CHECKPOINTS = ("runs/toy-all/sft/checkpoints/*/final", "runs/default/sft/checkpoints/*/final")
# (name, SamplerConfig overrides, batched?, bf16?, exact?)
MODES = [
    ("exact: batched, CFG rows joined, idle steps skipped", {}, True, False, True),
    ("exact: batched, CFG rows in their own (shorter) passes", dict(batch_cfg=False), True, False, True),
    ("approx: prefix cache, refresh 4", dict(cache="prefix", cache_refresh=4), True, False, False),
    ("approx: dual cache, refresh 4", dict(cache="dual", cache_refresh=4), True, False, False),
    ("approx: dual cache, refresh 8", dict(cache="dual", cache_refresh=8), True, False, False),
    ("approx: threshold 0.9", dict(text_threshold=0.9), True, False, False),
    ("approx: dual 4 + threshold 0.9", dict(cache="dual", cache_refresh=4, text_threshold=0.9), True, False, False),
    ("approx: prefix 4 + threshold 0.9", dict(cache="prefix", cache_refresh=4, text_threshold=0.9), True, False,
     False),
    ("approx: dual 8 + threshold 0.9", dict(cache="dual", cache_refresh=8, text_threshold=0.9), True, False, False),
    ("approx: dual 8 + threshold 0.7", dict(cache="dual", cache_refresh=8, text_threshold=0.7), True, False, False),
    ("approx: image threshold 0.9", dict(image_threshold=0.9), True, False, False),
    ("approx: text & image threshold 0.9", dict(text_threshold=0.9, image_threshold=0.9), True, False, False),
    ("approx: bf16 + text & image threshold 0.9", dict(text_threshold=0.9, image_threshold=0.9), True, True, False),
    ("approx: dual 4 + text & image threshold 0.9", dict(cache="dual", cache_refresh=4, text_threshold=0.9,
                                                          image_threshold=0.9), True, False, False),
    ("approx: dual 4 + text & image threshold 0.7", dict(cache="dual", cache_refresh=4, text_threshold=0.7,
                                                          image_threshold=0.7), True, False, False),
    ("approx: dual 4 + blocks of 24 + text & image threshold 0.9",
     dict(cache="dual", cache_refresh=4, text_block_length=24, text_threshold=0.9, image_threshold=0.9), True, False,
     False),
    ("approx: dual 4 + blocks of 12 + text & image threshold 0.9",
     dict(cache="dual", cache_refresh=4, text_block_length=12, text_threshold=0.9, image_threshold=0.9), True, False,
     False),
    ("approx: bf16 weights", {}, True, True, False),
    ("approx: bf16 + dual cache, refresh 4", dict(cache="dual", cache_refresh=4), True, True, False),
    ("approx: bf16 + dual cache, refresh 8", dict(cache="dual", cache_refresh=8), True, True, False),
    ("approx: bf16 + dual 4 + text & image threshold 0.9", dict(cache="dual", cache_refresh=4, text_threshold=0.9,
                                                                image_threshold=0.9), True, True, False),
    ("approx: bf16 + dual 6 + text & image threshold 0.9", dict(cache="dual", cache_refresh=6, text_threshold=0.9,
                                                                image_threshold=0.9), True, True, False),
    ("approx: bf16 + dual 8 + text & image threshold 0.9", dict(cache="dual", cache_refresh=8, text_threshold=0.9,
                                                                image_threshold=0.9), True, True, False),
    ("approx: bf16 + dual 20 + text & image threshold 0.9", dict(cache="dual", cache_refresh=20, text_threshold=0.9,
                                                                 image_threshold=0.9), True, True, False),
    ("approx: bf16 + dual 6 + text & image threshold 0.8", dict(cache="dual", cache_refresh=6, text_threshold=0.8,
                                                                image_threshold=0.8), True, True, False),
    ("approx: dual 4 + image logit cache 0.9 (ML-Cache)", dict(cache="dual", cache_refresh=4, image_cache_ratio=0.9),
     True, False, False),
    ("approx: bf16 + dual 8 + image logit cache 0.9", dict(cache="dual", cache_refresh=8, image_cache_ratio=0.9),
     True, True, False),
    ("approx: dual 8 + text blocks of 32 + image logit cache 0.9",  # PA's README block length (upstream ignores it)
     dict(cache="dual", cache_refresh=8, text_block_length=32, image_cache_ratio=0.9), True, False, False),
]


class FullHead(torch.nn.Module):
    """Upstream's forward: logits on every position, the output part sliced afterwards."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, ids, mask=None, last_n=None):
        logits = self.inner(ids, mask)
        return logits if last_n is None else logits[:, -last_n:]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_model(cfg: ModelConfig, device: str, dtype=torch.float32, seed: int = 0) -> DiffusionLM:
    """Random weights drawn on the device (an 8B model would take minutes through init_weights on CPU)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiffusionLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, cfg.init_std)
    return model.eval()


def timed_generate(model, vocab, shape, prompts, uncond, cfg, batch: int, device: str, seed: int = 0):
    """Samples every prompt (in chunks of `batch`); returns (tokens (n, M), seconds)."""
    out = []
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        out.append(generate(model, vocab, shape, prompts[i:i + batch], cfg,
                            uncond_prompts=uncond[i:i + batch] if uncond else None, generator=gen).tokens)
    _sync(device)
    return torch.cat(out), time.perf_counter() - t0


def _mode_cfg(base: SamplerConfig, overrides: dict) -> SamplerConfig:
    return dataclasses.replace(base, **overrides)


def speed_section(a) -> None:
    """Tokens/s of each mode on a random ~100M model (or the 8B-shaped one with --gpu)."""
    dev = "cuda" if a.gpu else "cpu"
    if a.gpu or a.paper_layout:  # PA settings (upstream-facts 1.1, 3.1)
        shape, in_codes, instr, n_up = OutputShape(1024, 256), 1024, 64, 1
        base = SamplerConfig(steps=128, image_steps=64, text_block_length=256, image_cfg=4.0)
        if a.gpu:  # LLaDA-8B shape in bf16, batch 1 and 16
            vocab = tiny_vocab(126000, 8192)
            mc = ModelConfig(vocab_size=vocab.vocab_size, embedding_size=vocab.vocab_size)
            batches, dtype = (1, 16), torch.bfloat16
        else:  # --paper-layout: the same layout on CPU with a toy-width random model
            vocab = tiny_vocab(4096, 8192)
            mc = ModelConfig(d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384, vocab_size=vocab.vocab_size,
                             embedding_size=vocab.vocab_size, rope_theta=10000.0)
            batches, dtype = (1,), torch.float32
    else:
        vocab = tiny_vocab(4096, 1024)
        mc = ModelConfig(d_model=768, n_layers=12, n_heads=12, mlp_hidden_size=2048, vocab_size=vocab.vocab_size,
                         embedding_size=vocab.vocab_size, rope_theta=10000.0)
        shape, in_codes, instr = OutputShape(64, 32), 64, 16
        base = SamplerConfig(steps=a.speed_steps, image_steps=a.speed_steps // 2, text_block_length=32, image_cfg=4.0)
        batches, n_up, dtype = (a.speed_batch,), 1, torch.float32
    model = random_model(mc, dev, dtype)
    g = torch.Generator().manual_seed(0)
    n = max(batches)
    prompts = [edit_prompt(vocab, torch.randint(0, vocab.codebook_size, (in_codes,), generator=g).tolist(),
                           torch.randint(10, 1000, (instr,), generator=g).tolist()) for _ in range(n)]
    uncond = [edit_prompt(vocab, None, None)] * n
    print(f"\n## speed: random model {model.num_params() / 1e6:.0f}M params on {dev} ({dtype}), output {shape}, "
          f"prompt {len(prompts[0])} tokens, {base.steps} steps, {base.image_steps} image steps, image_cfg "
          f"{base.image_cfg}, threads {torch.get_num_threads()}")
    up_cfg = _mode_cfg(base, dict(batch_cfg=False))
    n_out = shape.image_tokens + shape.text_tokens
    print(f"{'mode':58s} {'batch':>5s} {'tokens/s':>10s} {'upstream':>9s} {'vs upstream':>11s}", flush=True)

    def row(name, B, tps, up):
        print(f"{name:58s} {B:5d} {tps:10.1f} {up:9.1f} {tps / up:10.2f}x", flush=True)

    for r in range(a.repeats):  # each mode timed right after its own upstream run: load changes hit both
        for name, over, batched, bf16, _ in MODES:
            if (bf16 and a.gpu) or "threshold" in name or name in a.skip_modes:
                continue  # the GPU model is bf16 already; random weights are never confident (see the toy table)
            _, s_up = timed_generate(FullHead(model), vocab, shape, prompts[:n_up], uncond, up_cfg, 1, dev)
            up_tps = n_up * n_out / s_up
            m = random_model(mc, dev, torch.bfloat16) if bf16 else model
            for B in (batches if batched else (1,)):
                _, s = timed_generate(m, vocab, shape, prompts[:B], uncond, _mode_cfg(base, over), B, dev)
                row(name, B, B * n_out / s, up_tps)
        if a.compile:  # exact up to float rounding; the first call compiles, so it is run once untimed
            compiled = torch.compile(model, dynamic=True)
            B = max(batches)
            timed_generate(compiled, vocab, shape, prompts[:B], uncond, base, B, dev)
            _, s = timed_generate(compiled, vocab, shape, prompts[:B], uncond, base, B, dev)
            row("exact: batched + torch.compile", B, B * n_out / s, up_tps)


def toy_items(n: int, vocab, seq, tok, vq, ckpt: str) -> tuple[list, list, int]:
    """n toy ParaBench items spread evenly over those whose prompt fits the checkpoint's layout (a toy-tiny
    checkpoint holds only its own categories' instructions), their (prompt, uncond) pairs, and how many fit."""
    from tasks.evaluate.evaluate import _prompt
    from tasks.evaluate.parabench import build_toy_parabench

    items, pairs = [], []
    for it in build_toy_parabench("tiny"):
        try:
            pairs.append(_prompt(it, vocab, seq, tok, vq))
            items.append(it)
        except ValueError:
            pass
    if len(items) < 300:
        print(f"\n{300 - len(items)} of 300 toy ParaBench items do not fit {ckpt}'s layout (instruction too long): "
              f"left out")
    spread = list(range(0, len(items), max(1, len(items) // n)))[:n]  # edits + generations
    return [items[i] for i in spread], [pairs[i] for i in spread], len(items)


def toy_section(a) -> None:
    """The trained toy checkpoint on the toy ParaBench: tokens/s and Output Alignment per mode."""
    from tasks.evaluate.evaluate import eval_layout
    from tasks.common.generate import load_image_tokenizer
    from tasks.evaluate.judge_exact import ExactToyJudge
    from tasks.evaluate.judges import EvalOutput
    from tasks.sft.sft_data import output_shape
    from tasks.common.tokenizer import TextTokenizer
    from tasks.sft.toy_eval import decode_outputs
    from tasks.evaluate.evaluate import _png
    from flows.evaluate import DEFAULT_SAMPLER
    from model.checkpoint import from_pretrained

    ckpt = a.checkpoint or next((p for pat in TOY_CHECKPOINTS for p in sorted(glob.glob(pat))), None)
    if ckpt is None:
        print("\n## toy: no toy checkpoint found (train one with `parapipe sft`); skipped")
        return
    model, vocab = from_pretrained(ckpt)
    model.eval()
    tok, vq = TextTokenizer.load(ckpt), load_image_tokenizer(ckpt)
    seq = eval_layout(ckpt, vocab, tok, vq)
    shape = output_shape(seq)
    items, pairs, fit = toy_items(a.items, vocab, seq, tok, vq, ckpt)
    prompts, uncond = [p for p, _ in pairs], [u for _, u in pairs]
    base = SamplerConfig(**DEFAULT_SAMPLER)
    judge = ExactToyJudge("tiny")

    def scores(tokens) -> tuple[float, float]:
        """(Output Alignment, Text Quality), 0-100: a mode can keep OA while it garbles the text."""
        images, texts = decode_outputs(tokens, shape, vocab, tok, vq)
        outs = [EvalOutput(it.item_id, t, _png(im.numpy())) for it, im, t in zip(items, images, texts)]
        js = judge.judge(items, outs)
        return tuple(sum(j.scores[k] for j in js) / len(js) for k in ("output_alignment", "text_quality"))

    print(f"\n## toy: {ckpt} ({model.num_params() / 1e6:.2f}M params), toy ParaBench {len(items)} of {fit} items "
          f"(spread evenly), output {shape}, eval sampler {DEFAULT_SAMPLER}, threads {torch.get_num_threads()}; "
          f"timed in chunks of {a.batch} items, upstream first, then every mode on the same chunk"
          + (f", each the fastest of {a.toy_repeats} runs" if a.toy_repeats > 1 else ""))
    up_cfg = _mode_cfg(base, dict(batch_cfg=False))
    modes = [m for m in MODES if m[0] not in a.skip_modes and (not a.modes or m[0] in a.modes)]
    misfit = [m[0] for m in modes if shape.text_tokens % m[1].get("text_block_length", shape.text_tokens)]
    if misfit:
        print(f"left out (blocks that do not divide the checkpoint's {shape.text_tokens} text slots): {misfit}")
    modes = [m for m in modes if m[0] not in misfit]
    secs, toks = {"up": 0.0}, {"up": []}
    half = copy.deepcopy(model).to(torch.bfloat16)

    def best_of(m, P, U, cfg, batch, seed) -> tuple[torch.Tensor, float]:
        """The fastest of --toy-repeats runs (greedy decoding: the tokens are the same every time)."""
        runs = [timed_generate(m, vocab, shape, P, U, cfg, batch, "cpu", seed=seed) for _ in range(a.toy_repeats)]
        return runs[0][0], min(s for _, s in runs)

    for start in range(0, len(items), a.batch):  # interleaved, so load changes hit every mode alike
        P, U = prompts[start:start + a.batch], uncond[start:start + a.batch]
        t, s = best_of(FullHead(model), P, U, up_cfg, 1, start)
        secs["up"] += s
        toks["up"].append(t)
        for name, over, batched, bf16, exact in modes:
            t, s = best_of(half if bf16 else model, P, U, _mode_cfg(base, over), a.batch, start)
            secs[name] = secs.get(name, 0.0) + s
            toks.setdefault(name, []).append(t)
    n_tok = len(items) * (shape.image_tokens + shape.text_tokens)
    up_tokens = torch.cat(toks["up"])
    up_oa, up_tq = scores(up_tokens)
    print(f"{'mode':58s} {'batch':>5s} {'tokens/s':>10s} {'vs upstream':>11s} {'OA':>6s} {'dOA':>6s} {'dTQ':>6s} "
          "same-tokens")
    print(f"{'upstream-equivalent (batch 1, full head, separate CFG)':58s} {1:5d} {n_tok / secs['up']:10.1f} "
          f"{1.0:10.2f}x {up_oa:6.1f} {0.0:+6.1f} {0.0:+6.1f}  (TQ {up_tq:.1f})")
    for name, *_ in modes:
        tokens = torch.cat(toks[name])
        oa, tq = scores(tokens)
        same = (tokens == up_tokens).all(1).float().mean().item()
        print(f"{name:58s} {a.batch:5d} {n_tok / secs[name]:10.1f} {secs['up'] / secs[name]:10.2f}x {oa:6.1f} "
              f"{oa - up_oa:+6.1f} {tq - up_tq:+6.1f} {100 * same:5.1f}% of rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100, help="toy ParaBench items (of 300), spread evenly")
    ap.add_argument("--batch", type=int, default=16, help="rows per generate call for the batched modes")
    ap.add_argument("--speed-batch", type=int, default=2, help="rows per call in the CPU speed table")
    ap.add_argument("--speed-steps", type=int, default=8, help="steps in the CPU speed table (image steps: half)")
    ap.add_argument("--repeats", type=int, default=1, help="repeats of the speed table")
    ap.add_argument("--toy-repeats", type=int, default=1, help="toy table: time every chunk this many times "
                    "per mode and keep the fastest (as timeit does), so a load spike does not move a ratio")
    ap.add_argument("--checkpoint", default=None, help="toy checkpoint folder (default: runs/toy-all's final)")
    ap.add_argument("--gpu", action="store_true", help="8B-shaped random bf16 model on cuda, PA settings, "
                                                       "batch 1 and 16 (speed table only)")
    ap.add_argument("--paper-layout", action="store_true", help="speed table on CPU at the paper's layout and "
                    "sampler (--gpu's: 1024 codes, 256 text, 128 steps, batch 1) with a toy-width random model")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row to the speed table")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-modes", nargs="*", default=[], help="mode names (as printed) to leave out")
    ap.add_argument("--modes", nargs="*", default=[], help="toy table: only these mode names (as printed)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--skip-drift", action="store_true")
    a = ap.parse_args()
    unknown = sorted(set(a.modes + a.skip_modes) - {m[0] for m in MODES})
    if unknown:
        ap.error(f"--modes / --skip-modes: no mode named {unknown}; the names are: {[m[0] for m in MODES]}")
    if a.toy_repeats < 1:
        ap.error(f"--toy-repeats {a.toy_repeats}: time each chunk at least once; use 1 or more (3 steadies ratios)")
    if a.checkpoint and not os.path.isfile(os.path.join(a.checkpoint, "config.json")):
        ap.error(f"--checkpoint {a.checkpoint!r}: no config.json there; pass an SFT checkpoint folder "
                 f"(make run's is runs/default/sft/final)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.skip_speed:
        speed_section(a)
    if a.gpu:
        return
    if not a.skip_toy:
        toy_section(a)
    if not a.skip_drift:
        from benchmarks.sampler_drift import drift_section

        drift_section(a.checkpoint, TOY_CHECKPOINTS)


if __name__ == "__main__":
    main()
