"""Sampler throughput on a tiny model: parallel vs sequential decoding, batched vs one at a time.

    python benchmarks/sampler.py [--prompts 8] [--repeats 3]

Prints output tokens/s and forward passes per sample for each setting, measured side by side in
one run, and the ratios between them.
"""
import argparse
import time

import torch

from model.layout import OutputShape, edit_prompt
from model.sampling import SamplerConfig, generate
from model.tokens import tiny_vocab
from model.transformer import DiffusionLM, ModelConfig


def _run(model, vocab, shape, prompts, cfg, batched: bool, repeats: int) -> tuple[float, float]:
    """Returns (output tokens per second, forward passes per sample), best of `repeats`."""
    best, nfe = float("inf"), 0
    for r in range(repeats):
        gen = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        if batched:
            nfe = generate(model, vocab, shape, prompts, cfg, generator=gen).nfe
        else:
            nfe = sum(generate(model, vocab, shape, [p], cfg, generator=gen).nfe for p in prompts) / len(prompts)
        best = min(best, time.perf_counter() - t0)
    tokens = len(prompts) * (shape.image_tokens + shape.text_tokens)
    return tokens / best, nfe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--image-steps", type=int, default=16)
    a = ap.parse_args()
    torch.manual_seed(0)
    vocab = tiny_vocab(384, 64)
    cfg = ModelConfig(d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384, vocab_size=vocab.vocab_size,
                      embedding_size=vocab.vocab_size, rope_theta=10000.0)
    model = DiffusionLM(cfg).init_weights(0).eval()
    shape = OutputShape(image_tokens=64, text_tokens=32)
    prompts = [edit_prompt(vocab, [i % 64] * 64, list(range(10, 20 + i))) for i in range(a.prompts)]
    print(f"model {model.num_params() / 1e6:.2f}M params, {a.prompts} prompts, output {shape}, "
          f"threads {torch.get_num_threads()}")
    results = {}
    for mode in ("parallel", "sequential"):
        sc = SamplerConfig(steps=a.steps, image_steps=a.image_steps, text_block_length=shape.text_tokens, mode=mode)
        for batched in (True, False):
            tps, nfe = _run(model, vocab, shape, prompts, sc, batched, a.repeats)
            results[(mode, batched)] = (tps, nfe)
            print(f"{mode:10s} {'batched' if batched else 'one-by-one':10s} {tps:9.0f} tokens/s  "
                  f"{nfe:5.0f} forward passes/sample")
    par, seq = results[("parallel", True)], results[("sequential", True)]
    print(f"parallel / sequential: {par[0] / seq[0]:.2f}x tokens/s, {seq[1] / par[1]:.2f}x fewer forward passes")
    for mode in ("parallel", "sequential"):
        b, o = results[(mode, True)], results[(mode, False)]
        print(f"{mode}: batched / one-by-one: {b[0] / o[0]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
