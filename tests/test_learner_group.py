"""The ParaRL learner group's ranks without Ray: two gloo processes (plain and FSDP2-sharded) against
the single learner on one batch whose pairs split unevenly, so the short rank must keep step with
the other's collectives (policy replays and the sharded reference's forwards)."""
import multiprocessing as mp
import os
import socket

import pytest
import torch

from model.checkpoint import from_pretrained
from rl.learner import RLConfig, Rollouts, update
from rl.learner_group import LearnerWorker
from tests.test_pararl import _rollout

CFG = dict(inner_iters=2, minibatches=2, micro_batch=2, beta=0.05, lr=1e-3, reward="exact", credit="step")
COMPARED = ("loss", "pg_loss", "kl", "clip_frac", "entropy", "grad_norm", "learner_tokens", "pairs")


def _rank(rank: int, world: int, port: int, ckpt: str, batch: Rollouts, shape, sampler, fsdp: bool, out: str):
    try:
        worker = LearnerWorker(rank, world, ckpt, ckpt, CFG, None, shape, sampler, fsdp=fsdp)
        worker.join("127.0.0.1", port)
        got = (worker.update(batch), worker.weights())
        worker.leave()
    except BaseException as e:  # noqa: BLE001 - reported to the test, which fails with it
        got = (repr(e), None)
    torch.save(got, out)


def _group(ckpt, batch, shape, sampler, fsdp: bool, tmp, world: int = 2) -> tuple[dict, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    outs = [str(tmp / f"rank{r}-fsdp{fsdp}.pt") for r in range(world)]
    procs = [ctx.Process(target=_rank, args=(r, world, port, ckpt, batch, shape, sampler, fsdp, outs[r]))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():  # a rank stuck in a collective its peer never joined
            p.kill()
    assert all(os.path.exists(o) for o in outs), "a rank hung or died"
    got = [torch.load(o, weights_only=True) for o in outs]
    errors = {r: g[0] for r, g in enumerate(got) if isinstance(g[0], str)}
    assert not errors, errors
    assert got[1][1] == {}, "only rank 0 sends its weights back"
    return got[0]


@pytest.mark.slow
def test_uneven_shares_plain_and_fsdp_match_the_single_learner(sft_checkpoint, tmp_path):
    root, ckpt, _ = sft_checkpoint
    _, _, shape, sampler, prompts, res, steps = _rollout(ckpt, root)
    R = len(prompts)
    zero = torch.zeros(R, 3, dtype=torch.bool)
    zero[0, 0] = True  # 17 pairs: 2 mini-batches of 9 and 8 -> ranks replay 9 and 8 (5 and 4 micro-batches)
    adv = torch.linspace(-1.0, 1.0, R * 3).reshape(R, 3)  # (R, K)
    batch = Rollouts(prompts=prompts, tokens=res.tokens, step_map=res.step_map, logp=res.logp, steps=list(steps),
                     adv=adv, zero_var=zero)
    cfg = RLConfig(**CFG)
    policy, vocab = from_pretrained(ckpt)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    ref = from_pretrained(ckpt)[0].eval().requires_grad_(False)
    want = update(policy, ref, torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0), batch, cfg,
                  vocab, shape, sampler)
    assert want["pairs"] == 17 and want["kl"] > 0
    moved = max((v - start[k]).abs().max().item() for k, v in policy.state_dict().items())
    for fsdp in (False, True):
        stats, weights = _group(ckpt, batch, shape, sampler, fsdp, tmp_path)
        for key in COMPARED:
            assert stats[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (fsdp, key)
        apart = max((v - weights[k]).abs().max().item() for k, v in policy.state_dict().items())
        assert moved > 1e-4 and apart < 1e-3 * moved, (fsdp, moved, apart)
