"""Rollout-time vs replayed log-probs under each sampler mode: which fast modes ParaRL may use.

    python benchmarks/sampler_drift.py [--prompts 24] [--checkpoint runs/default/sft/final]

A rollout (model.sampling.generate(trace=True)) records each token's behaviour log-prob from the
logits its sampler saw; the learner (rl/replay.replay_logprobs) rebuilds the state before each step
from step_map and scores the same tokens with a full pass. With the exact sampler the two agree
(ratio 1 at the first inner iteration, tests/test_pararl.py). An approximate KV cache feeds the
sampler stale logits, so the recorded log-probs drift from the replayed ones, and PPO's clipped
ratio then sees an off-policy gap before any update. Threshold decoding changes only which slots
are committed, never the logits, so its replay is exact. Printed per mode over every decoded token:
mean and max |logp_rollout - logp_replay|, and the share of tokens whose ratio already lies
outside [1 - eps, 1 + eps] (eps = RLConfig.clip_eps = 0.2).
"""
import argparse
import dataclasses
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.sampling import SamplerConfig, generate  # noqa: E402
from rl.replay import replay_logprobs  # noqa: E402

MODES = [
    ("exact (no cache)", {}),
    ("threshold 0.9", dict(text_threshold=0.9)),
    ("text & image threshold 0.9", dict(text_threshold=0.9, image_threshold=0.9)),
    ("prefix cache, refresh 4", dict(cache="prefix", cache_refresh=4)),
    ("dual cache, refresh 4", dict(cache="dual", cache_refresh=4)),
    ("dual cache, refresh 8", dict(cache="dual", cache_refresh=8)),
    ("dual 4 + threshold 0.9", dict(cache="dual", cache_refresh=4, text_threshold=0.9)),
    ("dual 4 + image logit cache 0.9", dict(cache="dual", cache_refresh=4, image_cache_ratio=0.9)),
]
EPS = 0.2


def drift(model, vocab, shape, prompts, cfg: SamplerConfig, seed: int = 0) -> dict:
    """Behaviour vs full-pass replayed log-probs of every decoded token, replayed step by step."""
    res = generate(model, vocab, shape, prompts, cfg, generator=torch.Generator().manual_seed(seed), trace=True)
    diffs = []
    with torch.no_grad():
        for s in range(int(res.step_map.max()) + 1):
            rows = (res.step_map == s).any(1).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            logp, credited = replay_logprobs(model, [prompts[r] for r in rows.tolist()], res.tokens[rows],
                                             res.step_map[rows], torch.full((len(rows),), s), vocab, shape, cfg)
            diffs.append((res.logp[rows] - logp)[credited])
    d = torch.cat(diffs).abs()
    ratio_out = ((d.neg().exp() < 1 - EPS) | (d.exp() > 1 + EPS)).float().mean()
    return {"mean": d.mean().item(), "max": d.max().item(), "clipped": 100 * ratio_out.item(), "tokens": len(d),
            "nfe": res.nfe}


def drift_section(checkpoint: str | None, patterns: tuple[str, ...], n_prompts: int = 24) -> None:
    from flows.evaluate import DEFAULT_SAMPLER
    from model.checkpoint import from_pretrained
    from rl.learner import RLConfig
    from tasks.common.generate import load_image_tokenizer
    from tasks.common.tokenizer import TextTokenizer
    from benchmarks.sampler import toy_items
    from tasks.evaluate.evaluate import eval_layout
    from tasks.sft.sft_data import output_shape

    ckpt = checkpoint or next((p for pat in patterns for p in sorted(glob.glob(pat))), None)
    if ckpt is None:
        print("\n## drift: no toy checkpoint found; skipped")
        return
    model, vocab = from_pretrained(ckpt)
    model.eval()
    tok, vq = TextTokenizer.load(ckpt), load_image_tokenizer(ckpt)
    seq = eval_layout(ckpt, vocab, tok, vq)
    shape = output_shape(seq)
    prompts = [p for p, _ in toy_items(n_prompts, vocab, seq, tok, vq, ckpt)[1]]
    rl = RLConfig()
    base = rl.rollout_sampler(SamplerConfig(**{**DEFAULT_SAMPLER, "text_block_length": seq.text_tokens}))
    print(f"\n## drift: rollout vs replayed log-probs, {ckpt}, {len(prompts)} prompts, rollout sampler "
          f"temperatures {base.text_temperature}/{base.image_temperature}, {base.steps} steps")
    print(f"{'mode':34s} {'mean|dlogp|':>11s} {'max|dlogp|':>10s} {'ratio outside 1+-0.2':>21s} {'tokens':>7s} {'nfe':>4s}")
    for name, over in MODES:
        r = drift(model, vocab, shape, prompts, dataclasses.replace(base, **over))
        print(f"{name:34s} {r['mean']:11.2e} {r['max']:10.2e} {r['clipped']:20.2f}% {r['tokens']:7d} {r['nfe']:4d}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--prompts", type=int, default=24)
    a = ap.parse_args()
    drift_section(a.checkpoint, ("runs/toy-all/sft/checkpoints/*/final", "runs/default/sft/checkpoints/*/final"),
                  a.prompts)
