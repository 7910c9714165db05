"""ParaRL on the toy world from the `make run` SFT checkpoint: the paper's Tables 4 and 5, and throughput.

Runs RL arms side by side from the same checkpoint with the same rollout budget per round, each
over several seeds, and scores the final policy on the same held-out val tasks (greedy decoding):
  traj-k3-clip    trajectory-level reward at K = 3 sampled steps, CLIP reward (the paper's ParaRL)
  output-k3-clip  the final output's reward credited at the same 3 steps (Table 4's output-level RL)
  traj-k{1,2,5}-clip  other K (Table 5; K = 1 is the final step only)
  traj-k3-exact   the exact toy agreement as the reward instead of CLIP
  traj-k3-graded  the exact toy agreement with partial credit for nearly right objects (cell distance)
  traj-k3-clip-step  credit only the tokens decoded at each sampled step (the literal Eq. 3 reading)
Every other arm credits the window (s_{k-1}, s_k] (RLConfig.credit = "window").
Prints held-out text-image agreement / exact image / text correct (mean and spread over seeds)
next to the SFT starting point, and per-role throughput: rollouts/s, reward pairs/s, learner
tokens/s and the share of each round's wall time per role.

    .venv/bin/python benchmarks/pararl.py                       # every arm, 3 seeds
    .venv/bin/python benchmarks/pararl.py --arms traj-k3-clip --seeds 0 --rounds 10
    .venv/bin/python benchmarks/pararl.py --rollout-speed        # rollouts/s: upstream-style vs ParaPipe's
    .venv/bin/python benchmarks/pararl.py --probe CKPT [CKPT ...] # does the text read the output image?
    .venv/bin/python benchmarks/pararl.py --replay-cost 8        # learner micro-batch: logits where credited

--probe decodes the held-out texts greedily twice per checkpoint: with the true output image already in
place, and with the image fully masked (text first). If the two text accuracies are equal, the text
does not read the image it is generated with, so an alignment reward has a new skill to teach
rather than a decoding order to fix.

--rollout-speed times only the rollout actor's work (RolloutWorker.sample, no Ray) on B prompts x G
samples, interleaved over --speed-rounds: upstream-style (one prompt, one sample per call, as the
released sampler runs), batched (the B x G rows of a round in one call: ParaPipe's default) and
batched with threshold text decoding (text_threshold, the fast option RL may use: it changes which
slots commit, never the logits, so the replay stays exact). Ratios are to the upstream-style arm.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARMS = {
    "traj-k3-clip": dict(sampled_steps=3, reward_mode="trajectory", reward="clip"),
    "output-k3-clip": dict(sampled_steps=3, reward_mode="output", reward="clip"),
    "traj-k1-clip": dict(sampled_steps=1, reward_mode="trajectory", reward="clip"),
    "traj-k2-clip": dict(sampled_steps=2, reward_mode="trajectory", reward="clip"),
    "traj-k5-clip": dict(sampled_steps=5, reward_mode="trajectory", reward="clip"),
    "traj-k3-exact": dict(sampled_steps=3, reward_mode="trajectory", reward="exact"),
    "traj-k3-graded": dict(sampled_steps=3, reward_mode="trajectory", reward="graded"),
    "traj-k3-clip-step": dict(sampled_steps=3, reward_mode="trajectory", reward="clip", credit="step"),
}
METRICS = ("agreement", "exact_image", "text_correct")


def baseline(ckpt: str, paths: dict) -> dict:
    from model.checkpoint import from_pretrained
    from tasks.pararl.pararl import DEFAULT_SAMPLER, checkpoint_layout, heldout_eval
    from model.sampling import SamplerConfig

    seq, _, _ = checkpoint_layout(ckpt)
    model, vocab = from_pretrained(ckpt)
    return heldout_eval(model, paths, vocab, seq, ckpt, SamplerConfig(**DEFAULT_SAMPLER))


def run_arm(name: str, seed: int, a, paths: dict, clip: str) -> dict:
    from rl.learner import TOY_REWARDS, RLConfig
    from tasks.pararl.pararl import run_rl

    out = os.path.join(a.out, f"{name}-s{seed}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = RLConfig(**{**json.loads(a.config), **ARMS[name], "rounds": a.rounds, "seed": seed,
                      "eval_every": a.rounds, "checkpoint_every": a.rounds})
    reward = ({"kind": cfg.reward, "preset": paths["preset"]} if cfg.reward in TOY_REWARDS
              else {"kind": "clip", "clip_folder": clip})
    t0 = time.perf_counter()
    res = run_rl(a.checkpoint, paths, cfg, out, out, f"{name}-s{seed}", reward_kwargs=reward)
    h, last = res["history"], res["history"][-1]
    total = {k: sum(r[k] or 0 for r in h) for k in ("rollout_s", "reward_s", "learner_s", "eval_s", "wall_s",
                                                     "rollouts", "reward_pairs", "learner_tokens")}
    print(f"  {name} seed {seed}: agreement {last['heldout_agreement']:.3f} exact_image "
          f"{last['heldout_exact_image']:.3f} text {last['heldout_text_correct']:.3f} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return {"agreement": last["heldout_agreement"], "exact_image": last["heldout_exact_image"],
            "text_correct": last["heldout_text_correct"], **total}


def rollout_speed(a, paths: dict) -> None:
    """rollouts/s of the rollout actor's sampling: upstream-style vs batched vs batched + threshold."""
    from model.sampling import SamplerConfig
    from rl.learner import RLConfig
    from rl.rollout import RolloutWorker
    from tasks.pararl.pararl import DEFAULT_SAMPLER, checkpoint_layout
    from tasks.sft.sft import load_set
    from tasks.sft.sft_data import build_prompt

    seq, shape, _ = checkpoint_layout(a.checkpoint)
    worker = RolloutWorker(a.checkpoint, shape, threads=a.threads)
    weights, B, G = worker.model.state_dict(), a.speed_prompts, a.speed_group
    train = load_set(paths["train"])
    prompts = [build_prompt(worker.vocab, seq, train.input_codes[i], train.instruction[i]) for i in range(B)]
    base = RLConfig().rollout_sampler(SamplerConfig(**{**DEFAULT_SAMPLER, "text_block_length": seq.text_tokens}))
    sampler = {k: getattr(base, k) for k in SamplerConfig.__dataclass_fields__}
    steps = [base.steps // 2, base.steps - 1]
    arms = {"upstream-style (batch 1)": lambda: [worker.sample(weights, 0, [p], 1, sampler, steps, i)
                                                 for i, p in enumerate(q for q in prompts for _ in range(G))],
            "batched B x G": lambda: worker.sample(weights, 0, prompts, G, sampler, steps, 0),
            "batched + text_threshold 0.9": lambda: worker.sample(weights, 0, prompts, G,
                                                                  {**sampler, "text_threshold": 0.9}, steps, 0),
            "batched + text & image 0.9": lambda: worker.sample(weights, 0, prompts, G, {
                **sampler, "text_threshold": 0.9, "image_threshold": 0.9}, steps, 0)}
    rates = {k: [] for k in arms}
    for _ in range(a.speed_rounds):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(B * G / (time.perf_counter() - t0))
    ref = statistics.median(rates["upstream-style (batch 1)"])
    print(f"rollouts/s, {B} prompts x {G} samples, {base.steps} steps, {a.threads} thread(s), "
          f"median of {a.speed_rounds} interleaved rounds:")
    for name, r in rates.items():
        print(f"  {name:30s} {statistics.median(r):7.1f} rollouts/s  ({statistics.median(r) / ref:.2f}x; "
              f"min..max {min(r):.1f}..{max(r):.1f})")


def text_with_image(ckpt: str, paths: dict, true_image: bool, steps: int = 20) -> float:
    """Held-out text correctness, text decoded greedily (low confidence first, `steps` steps) with the
    true output image in place (true_image) or fully masked."""
    import torch

    from model.cache import StepForward
    from model.checkpoint import from_pretrained
    from model.layout import IMAGE, TEXT, output_regions, output_template
    from tasks.common.tokenizer import TextTokenizer
    from tasks.pararl.pararl import checkpoint_layout
    from tasks.sft.sft import load_scenes, load_set
    from tasks.sft.sft_data import build_prompt, output_shape
    from tasks.toy import text_correct
    from tasks.toy.scene import PRESETS

    seq, _, _ = checkpoint_layout(ckpt)
    model, vocab = from_pretrained(ckpt)
    model.eval()
    val, scenes, tok = load_set(paths["val"]), load_scenes(paths["scenes"]), TextTokenizer.load(ckpt)
    shape = output_shape(seq, len(val.output[0]))
    regions = torch.tensor(output_regions(shape))
    img, txt = regions == IMAGE, regions == TEXT
    prompts = [build_prompt(vocab, seq, val.input_codes[i], val.instruction[i]) for i in range(len(val))]
    fwd = StepForward(model, prompts, None, vocab.pad_id, shape.length)
    y = torch.tensor(output_template(vocab, shape)).repeat(len(prompts), 1)  # (N, M)
    if true_image:
        y[:, img] = torch.tensor([list(o) for o in val.output])[:, img]
    T = int(txt.sum())
    for k in [T // steps + (i < T % steps) for i in range(steps)]:
        logits = fwd(y, False)[0][:, txt].float()  # (N, T, V)
        logits[..., vocab.mask_id] = -math.inf
        conf, arg = logits.softmax(-1).max(-1)  # (N, T)
        cur = y[:, txt]
        conf[cur != vocab.mask_id] = -1.0
        idx = conf.topk(k, dim=1).indices
        y[:, txt] = cur.scatter(1, idx, arg.gather(1, idx))
    texts = [tok.decode(r.tolist()) for r in y[:, txt]]
    return sum(text_correct(t, scenes[s], PRESETS[paths["preset"]]) for t, s in zip(texts, val.sample_id)) / len(val)


def probe(ckpts: list[str], paths: dict) -> None:
    print("held-out text correct, text decoded greedily with the true output image given | image masked:")
    for c in ckpts:
        print(f"  {c}: {text_with_image(c, paths, True):.3f} | {text_with_image(c, paths, False):.3f}", flush=True)


def replay_cost(states: int, repeats: int = 3) -> None:
    """One learner micro-batch (forward + backward of `states` replayed states) at the paper's layout (1024
    codes, 256 text slots, 128 steps) with a toy-width random model: the head and log-probs over every
    output slot (as the learner did before 2026-11-25) vs only at the slots each state credits (now)."""
    import torch

    from benchmarks.sampler import random_model
    from model.layout import IMAGE, TEXT, OutputShape, edit_prompt, left_pad, output_regions, output_template
    from model.sampling import SamplerConfig, token_logprobs
    from model.tokens import tiny_vocab
    from model.transformer import ModelConfig
    from rl.replay import image_slots, replay_logprobs, state_before

    vocab, shape, S = tiny_vocab(4096, 8192), OutputShape(1024, 256), 128
    mc = ModelConfig(d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384, vocab_size=vocab.vocab_size,
                     embedding_size=vocab.vocab_size, rope_theta=10000.0)
    model, cfg = random_model(mc, "cpu").train(), SamplerConfig(text_temperature=1.0, image_temperature=1.0)
    g = torch.Generator().manual_seed(0)
    prompts = [edit_prompt(vocab, torch.randint(0, 8192, (1024,), generator=g).tolist(), list(range(10, 74)))] * states
    regions = torch.tensor(output_regions(shape)).expand(states, -1)  # (P, M)
    tokens = torch.tensor(output_template(vocab, shape)).repeat(states, 1)
    tokens = torch.where(regions == TEXT, torch.randint(10, 4096, tokens.shape, generator=g), tokens)
    tokens = torch.where(regions == IMAGE, torch.randint(0, 8192, tokens.shape, generator=g) + vocab.image_offset,
                         tokens)
    step_map = torch.where(regions > 0, torch.randint(0, S, tokens.shape, generator=g), -1)
    steps = torch.randint(S // 4, S, (states,), generator=g)

    def dense():  # every output slot's logits and log-probs, the credited ones used
        pids, pmask = left_pad(prompts, vocab.pad_id)
        state = state_before(tokens, step_map, steps, vocab.mask_id)
        logits = model(torch.cat([pids, state], 1), torch.cat([pmask, torch.ones_like(state, dtype=torch.bool)], 1),
                       last_n=shape.length)  # (P, M, V)
        img = image_slots(shape).expand(tokens.shape)
        logp = token_logprobs(logits.flatten(0, 1), tokens.flatten(), img.flatten(), vocab, cfg).view(tokens.shape)
        return logp[step_map == steps[:, None]], logits.numel()

    def credited():
        logp, cred, logits = replay_logprobs(model, prompts, tokens, step_map, steps, vocab, shape, cfg,
                                             return_logits=True)
        return logp[cred], logits.numel()

    times = {"every output slot": [], "credited slots only": []}
    for _ in range(repeats):  # interleaved
        for name, fn in (("every output slot", dense), ("credited slots only", credited)):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            lp, n_logits = fn()
            lp.sum().backward()
            times[name].append((time.perf_counter() - t0, n_logits, len(lp)))
    print(f"learner micro-batch of {states} replayed states, paper layout ({shape}, {S} steps), "
          f"{model.num_params() / 1e6:.0f}M random model, median of {repeats}:")
    base = statistics.median(t for t, _, _ in times["every output slot"])
    for name, ts in times.items():
        sec = statistics.median(t for t, _, _ in ts)
        print(f"  {name:20s} {sec:6.2f} s ({base / sec:.2f}x)  logits {ts[0][1] * 4 / 2 ** 20:8.1f} MiB float32 "
              f"for {ts[0][2]} credited tokens")


def spread(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/default/sft/final", help="SFT checkpoint (default: make run's)")
    p.add_argument("--root", default="runs/default/data")
    p.add_argument("--dataset", default="toy-tiny")
    p.add_argument("--out", default="runs/bench-pararl")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--config", default="{}", help="JSON of RLConfig fields shared by every arm")
    p.add_argument("--clip-folder", default=None, help="tiny CLIP reward folder (default: fit one into --out)")
    p.add_argument("--probe", nargs="+", default=None, metavar="CKPT",
                   help="only print text correctness with / without the true image for these checkpoints")
    p.add_argument("--rollout-speed", action="store_true", help="only time the rollout sampler (see above)")
    p.add_argument("--speed-prompts", type=int, default=16, help="B for --rollout-speed")
    p.add_argument("--speed-group", type=int, default=8, help="G for --rollout-speed")
    p.add_argument("--speed-rounds", type=int, default=3, help="interleaved rounds for --rollout-speed")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the rollout worker (--rollout-speed)")
    p.add_argument("--replay-cost", type=int, default=0, metavar="STATES",
                   help="only time one learner micro-batch of STATES states at the paper layout (no checkpoint)")
    a = p.parse_args()
    if a.replay_cost:
        return replay_cost(a.replay_cost)
    import ray
    import torch

    from tasks.pararl.fit_reward import fit_tiny_clip
    from tasks.pararl.pararl import prepare_rl

    torch.set_num_threads(1)
    a.checkpoint = os.path.abspath(a.checkpoint)
    if not os.path.isfile(os.path.join(a.checkpoint, "config.json")):
        sys.exit(f"no SFT checkpoint at {a.checkpoint}; run `make run` first or pass --checkpoint")
    paths = prepare_rl(a.checkpoint, os.path.abspath(a.root), a.dataset, os.path.abspath(a.out), eval_per_category=32)
    if a.rollout_speed:
        return rollout_speed(a, paths)
    if a.probe:
        return probe(a.probe, paths)
    clip = a.clip_folder or os.path.join(a.out, "tiny-clip")
    if any(ARMS[name]["reward"] == "clip" for name in a.arms) and not os.path.isfile(os.path.join(clip, "reward.json")):
        print(json.dumps(fit_tiny_clip(clip, preset=paths["preset"]), default=str))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    base = baseline(a.checkpoint, paths)
    print(f"SFT start: " + "  ".join(f"{m} {base[m]:.3f}" for m in METRICS), flush=True)
    results = {name: [run_arm(name, s, a, paths, clip) for s in a.seeds] for name in a.arms}
    n_val = len(torch.load(paths["val"], weights_only=True)["sample_id"])
    print(f"\nheld-out val ({n_val} tasks), {a.rounds} rounds, seeds {a.seeds}: mean ± population std")
    print(f"| arm | {' | '.join(METRICS)} | Δ agreement |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    print(f"| SFT | {' | '.join(f'{base[m]:.3f}' for m in METRICS)} | |")
    for name, rs in results.items():
        d = [r["agreement"] - base["agreement"] for r in rs]
        print(f"| {name} | {' | '.join(spread([r[m] for r in rs]) for m in METRICS)} | {spread(d)} |")
    print("\nthroughput per arm (sums over rounds and seeds; shares of round wall time):")
    for name, rs in results.items():
        t = {k: sum(r[k] for r in rs) for k in rs[0] if k not in METRICS}
        print(f"  {name}: rollouts/s {t['rollouts'] / t['rollout_s']:.1f}, reward pairs/s "
              f"{t['reward_pairs'] / max(t['reward_s'], 1e-9):.0f}, learner tokens/s {t['learner_tokens'] / t['learner_s']:.0f}; "
              f"wall: rollout {t['rollout_s'] / t['wall_s']:.0%} reward (overlapped) {t['reward_s'] / t['wall_s']:.0%} "
              f"learner {t['learner_s'] / t['wall_s']:.0%} eval {t['eval_s'] / t['wall_s']:.0%}")


if __name__ == "__main__":
    main()
