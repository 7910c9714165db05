"""ParaRL runs: data, reward statistics, the round loop, tables, checkpoints and resume.

`prepare_rl` tokenises the training prompts (and the held-out toy tasks) with the starting
checkpoint's own tokenizers and layout. `run_rl` is the driver: it holds the learner (policy,
frozen reference, AdamW) and drives rl/loop.Roles round by round:
    fit reward stats once (1% of the training prompts) -> for each round: draw B prompts and K
    steps -> publish weights -> rollouts + rewards -> advantages -> update -> tables -> eval -> checkpoint.
Everything random is seeded by (seed, round), so a re-run of the same run id resumes from its
latest checkpoint and redoes the rounds after it exactly; tables are keyed by (run, round, ...)
and skip rows already committed, so nothing is duplicated. A checkpoint is a model folder (loads
in `parapipe generate`) plus `learner_state.pt` (optimiser, round, reward stats, config, and a digest of
the start checkpoint: resuming a run id from other weights is refused).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch

from model.checkpoint import CONFIG_FILE, VOCAB_KEY, from_pretrained, save_pretrained
from model.layout import OutputShape
from model.sampling import SamplerConfig
from rl.grpo import RewardStats, fit_reward_stats, sparse_steps
from rl.learner import RLConfig, Rollouts, advantages, update
from storage.parquet import write_rows
from tasks.pipeline.progress import start_ray
from tasks.sft.sft_data import SequenceConfig, build_prompt, output_shape

LEARNER_STATE = "learner_state.pt"
DEFAULT_SAMPLER = dict(steps=20, image_steps=10)  # the toy recipe's timeline (tasks/sft/sft_loop.TOY_TINY_RECIPE)


def _seeded(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


def checkpoint_layout(checkpoint: str) -> tuple[SequenceConfig, OutputShape, dict]:
    """The starting checkpoint's sequence layout, output shape and parapipe_* config extras."""
    with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
        raw = json.load(f)
    if "parapipe_sequence" not in raw:
        raise ValueError(f"{checkpoint!r} records no parapipe_sequence (the layout it was fine-tuned with); "
                         f"start RL from an SFT checkpoint written by `parapipe sft`")
    seq = SequenceConfig(**raw["parapipe_sequence"])
    if seq.image_grid is None:  # checkpoints written before the grid was recorded
        from tasks.common.generate import image_grid, load_image_tokenizer

        seq = dataclasses.replace(seq, image_grid=image_grid(checkpoint, load_image_tokenizer(checkpoint)))
    extras = {k: v for k, v in raw.items() if k.startswith("parapipe_") and k != VOCAB_KEY}
    return seq, output_shape(seq), extras


def prepare_rl(checkpoint: str, root: str, dataset: str, out: str, categories: tuple[str, ...] | None = None,
               eval_per_category: int = 32) -> dict:
    """Tokenised train prompts (+ toy val set and scenes) saved under out/data; returns their paths."""
    from tasks.common.generate import load_image_tokenizer
    from tasks.common.tokenizer import TextTokenizer
    from tasks.sft.sft import save_scenes, save_set
    from tasks.sft.sft_data import load_or_tokenise, read_samples
    from tasks.sft.toy_eval import select_per_category

    seq, _, _ = checkpoint_layout(checkpoint)
    _, vocab = from_pretrained(checkpoint)
    tok, vq = TextTokenizer.load(checkpoint), load_image_tokenizer(checkpoint)
    cache, data_dir = os.path.join(root, "cache", "sft"), os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    rows, traces = read_samples(root, dataset, "train", traces_run=dataset, categories=categories)
    train = load_or_tokenise(rows, tok, vq, vocab, seq, cache, traces)
    paths = {"train": save_set(train, os.path.join(data_dir, "train.pt")), "train_size": len(train),
             "dropped": train.dropped}
    val_rows, val_traces = read_samples(root, dataset, "val", traces_run=dataset, categories=categories)
    if all('"toy"' in (r.get("extra_json") or "") for r in val_rows):
        val = select_per_category(load_or_tokenise(val_rows, tok, vq, vocab, seq, cache, val_traces),
                                  eval_per_category)
        scenes = save_scenes([r for r in val_rows if r["sample_id"] in set(val.sample_id)],
                             os.path.join(data_dir, "val_scenes.json"))
        paths.update(val=save_set(val, os.path.join(data_dir, "val.pt")), scenes=scenes,
                     preset=json.loads(val_rows[0]["extra_json"])["toy"]["preset"])
    return paths


# ---------------------------------------------------------------------------------------------- checkpoints

def latest_checkpoint(folder: str) -> str | None:
    """The newest complete round-NNNNN folder (learner_state.pt is written last)."""
    if not os.path.isdir(folder):
        return None
    done = sorted(d for d in os.listdir(folder) if d.startswith("round-")
                  and os.path.isfile(os.path.join(folder, d, LEARNER_STATE)))
    return os.path.join(folder, done[-1]) if done else None


def start_digest(folder: str, edge: int = 1 << 20) -> str:
    """Identifies a start checkpoint by content, wherever it lies: config.json and, per weight file, its name,
    size and first / last `edge` bytes (every tensor of a fine-tuned copy differs, so both ends do). Cheap at 8B."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == CONFIG_FILE or name.endswith((".safetensors", ".bin")):
            path = os.path.join(folder, name)
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                h.update(f"{name}:{size}".encode() + f.read(edge))
                f.seek(max(size - edge, 0))
                h.update(f.read(edge))
    return h.hexdigest()[:16]


def save_checkpoint(policy, vocab, optimizer, round_: int, stats: RewardStats, cfg: RLConfig, start: str,
                    folder: str, extras: dict, keep: int = 2) -> str:
    """Writes round-NNNNN (model folder + tokenizers + learner_state.pt) atomically; keeps the last `keep`."""
    final = os.path.join(folder, f"round-{round_:05d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(policy, vocab, tmp, extra=extras)
    shutil.copy(os.path.join(start, "tokenizer.json"), tmp)
    if os.path.isdir(os.path.join(start, "image_tokenizer")):
        shutil.copytree(os.path.join(start, "image_tokenizer"), os.path.join(tmp, "image_tokenizer"))
    torch.save({"optimizer": optimizer.state_dict(), "round": round_, "stats": stats.__dict__,
                "config": cfg.to_dict(), "start": start, "start_digest": start_digest(start)},
               os.path.join(tmp, LEARNER_STATE))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = sorted(d for d in os.listdir(folder) if d.startswith("round-") and not d.endswith(".tmp"))
    for d in old[:-keep]:
        shutil.rmtree(os.path.join(folder, d), ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------- rows

def trajectory_rows(run_id: str, round_: int, sample_ids: list[str], instructions: list[str], G: int,
                    steps: list[int], got: dict, reward: torch.Tensor, adv: torch.Tensor, zero: torch.Tensor) -> list[dict]:
    """One trajectories row per (rollout, sampled step)."""
    rows = []
    step_map = got["step_map"]
    for r in range(len(got["tokens"])):
        for k, s in enumerate(steps):
            codes, text = got["image_codes"][r, k], got["text_ids"][r, k]
            rows.append({"run_id": run_id, "round": round_, "sample_id": sample_ids[r // G], "group_index": r % G,
                         "step": s, "slot": k, "instruction": instructions[r // G], "text": got["texts"][r][k],
                         "text_tokens": text.tolist(), "image_codes": codes.tolist(),
                         "text_mask_frac": float((got["text_ids"][r, k] == got["mask_id"]).mean()),
                         "image_mask_frac": float((codes < 0).mean()),
                         "decoded_text": int(((step_map[r] == s) & got["txt_cols"]).sum()),
                         "decoded_image": int(((step_map[r] == s) & got["img_cols"]).sum()),
                         "reward_raw": float(got["raw"][r, k]), "reward": float(reward[r, k]),
                         "advantage": float(adv[r, k]), "zero_var": bool(zero[r, k])})
    return rows


def reward_rows(run_id: str, round_: int, sample_ids: list[str], G: int, got: dict, reward, adv) -> list[dict]:
    return [{"run_id": run_id, "round": round_, "sample_id": sample_ids[r // G], "group_index": r % G,
             "reward": float(reward[r].mean()), "clip_score": float(got["raw"][r, -1]),
             "advantage": float(adv[r].mean()), "terms_json": json.dumps({"final_text": got["texts"][r][-1]})}
            for r in range(len(got["tokens"]))]


def by_step(steps: list[int], raw: np.ndarray, reward: torch.Tensor) -> dict:
    return {str(s): {"mean": float(reward[:, k].mean()), "std": float(reward[:, k].std(unbiased=False)),
                     "raw_mean": float(raw[:, k].mean())} for k, s in enumerate(steps)}


# ---------------------------------------------------------------------------------------------- the driver

def heldout_eval(policy, paths: dict, vocab, seq: SequenceConfig, start: str, sampler: SamplerConfig) -> dict:
    """Exact toy metrics (overall) of greedy decoding on the held-out val tasks; {} off the toy world."""
    if "val" not in paths:
        return {}
    from tasks.common.generate import load_image_tokenizer
    from tasks.common.tokenizer import TextTokenizer
    from tasks.sft.sft import load_scenes, load_set
    from tasks.sft.toy_eval import evaluate, greedy_sampler
    from tasks.toy.scene import PRESETS

    val, train = load_set(paths["val"]), load_set(paths["train"])
    greedy = greedy_sampler(seq.text_tokens, sampler.steps, sampler.image_steps)
    rows = evaluate(policy, val, load_scenes(paths["scenes"]), train, vocab, seq,
                    TextTokenizer.load(start), load_image_tokenizer(start), PRESETS[paths["preset"]], greedy,
                    baselines=False)
    policy.train()
    return {r["metric"]: r["value"] for r in rows if r["category"] == "overall"}


def fit_stats(roles, prompts: list[list[int]], cfg: RLConfig, sampler: dict, S: int) -> RewardStats:
    """Raw reward mean / std over one sample per prompt at K sampled steps (paper: a random 1%)."""
    steps = sparse_steps(S, cfg.sampled_steps, _seeded(cfg.seed, 999_983), cfg.first_step(S))
    got = roles.collect(prompts, 1, sampler, steps, cfg.seed, -1)
    return fit_reward_stats(torch.from_numpy(got["raw"]).flatten(), cfg.reward_clip)


def run_rl(start: str, paths: dict, cfg: RLConfig, out: str, root: str, run_id: str, sampler: dict | None = None,
           reward_kwargs: dict | None = None, rollout_workers: int = 1, reward_workers: int = 1,
           use_gpu: bool = False, crash_markers: dict | None = None, on_round=None, learner_workers: int = 1,
           fsdp: bool = False) -> dict:
    """The ParaRL driver; re-running the same run_id in the same `out` resumes (see module docstring).
    learner_workers > 1: a data-parallel learner group on Ray (rl/learner_group.py) takes the updates,
    FSDP2-sharded with fsdp."""
    from rl.loop import Roles
    from tasks.common.runs import recorded
    from tasks.common.tokenizer import TextTokenizer
    from tasks.sft.sft import load_set

    if learner_workers < 1:
        raise ValueError(f"learner_workers={learner_workers}; use 1 (the learner in this process) or more")
    if fsdp and learner_workers < 2:
        raise ValueError(f"fsdp shards the learner group, but learner_workers={learner_workers}; pass 2 or more")
    seq, shape, extras = checkpoint_layout(start)
    base = SamplerConfig(**{**DEFAULT_SAMPLER, **(sampler or {}), "text_block_length": seq.text_tokens})
    rollout_cfg = cfg.rollout_sampler(base)
    ckpt_dir = os.path.join(out, "checkpoints", run_id)
    resume = latest_checkpoint(ckpt_dir)
    policy, vocab, ref, optimizer, state = _learner_state(start, resume, cfg, learner_workers)
    first_round = state["round"] + 1 if state else 0
    train, tok = load_set(paths["train"]), TextTokenizer.load(start)
    prompts = [build_prompt(vocab, seq, train.input_codes[i], train.instruction[i]) for i in range(len(train))]
    start_ray(None if use_gpu else max(2, rollout_workers + reward_workers), include_dashboard=False,
              log_to_driver=False)
    roles = Roles(start, shape,
                  reward_kwargs or {}, rollout_workers, reward_workers, use_gpu, crash_markers=crash_markers)
    sampler_d = {k: getattr(rollout_cfg, k) for k in SamplerConfig.__dataclass_fields__}
    masks = {"mask_id": vocab.mask_id, **_columns(shape)}
    history = []
    config = run_config(cfg, sampler_d, reward_kwargs, start)  # + the reward stats once known
    config["learner_workers"], config["fsdp"] = learner_workers, fsdp
    learners, published = None, None
    try:
        if learner_workers > 1:
            import ray

            from rl.learner_group import LearnerGroup, by_name, load_by_name

            learners = LearnerGroup(learner_workers, resume or start, start, cfg, by_name(policy, optimizer), shape,
                                    rollout_cfg, use_gpu, fsdp)
            optimizer.state.clear()  # the ranks hold it now (64 GB at 8B); refilled by name only to checkpoint
        with recorded(root, run_id, "rl", config) as timings:
            stats = RewardStats(**state["stats"]) if state else _fresh_stats(roles, policy, prompts, cfg, sampler_d,
                                                                              rollout_cfg.steps)
            config["reward_stats"], timings["first_round"] = stats.__dict__, first_round
            for round_ in range(first_round, cfg.rounds):
                t0 = time.perf_counter()
                pick = torch.randperm(len(prompts), generator=_seeded(cfg.seed, round_))
                pick = pick[:cfg.prompts_per_round].tolist()
                steps = sparse_steps(rollout_cfg.steps, cfg.sampled_steps, _seeded(cfg.seed, round_, 1),
                                     cfg.first_step(rollout_cfg.steps))
                if published is None:
                    roles.publish(policy.state_dict(), version=round_)
                else:  # the group's weights, put in the object store by its rank 0
                    roles.use(published, version=round_)
                got, reward, adv, batch = _rollouts(roles, [prompts[i] for i in pick], cfg, sampler_d, steps, round_,
                                                    stats)
                t1 = time.perf_counter()
                if learners:
                    upd = learners.update(batch)
                    published = learners.weights_ref()
                else:
                    upd = update(policy, ref, optimizer, batch, cfg, vocab, shape, rollout_cfg)
                learner_s = time.perf_counter() - t1
                last = round_ == cfg.rounds - 1
                t2 = time.perf_counter()
                evals = last or (round_ + 1) % cfg.eval_every == 0
                saves = last or (round_ + 1) % cfg.checkpoint_every == 0
                if learners and (saves or (evals and "val" in paths)):  # the driver's copy, only when it is read
                    policy.load_state_dict(ray.get(published))
                ev = heldout_eval(policy, paths, vocab, seq, start, base) if evals else {}
                eval_s = time.perf_counter() - t2 if ev else None
                _write_round_rows(root, run_id, round_, [train.sample_id[i] for i in pick],
                                  [tok.decode(train.instruction[i]) for i in pick], cfg.group_size, steps,
                                  {**got, **masks}, reward, adv, batch.zero_var)
                row = metrics_row(run_id, round_, steps, got, reward, batch.zero_var, upd, ev, learner_s,
                                  eval_s, time.perf_counter() - t0, cfg.lr)
                write_rows(root, "rl_metrics", [row], run=run_id)
                history.append(row)
                add_timings(timings, row)
                if on_round:
                    on_round(row)
                if saves:
                    if learners:
                        load_by_name(policy, optimizer, learners.optimizer_state())
                    save_checkpoint(policy, vocab, optimizer, round_, stats, cfg, start, ckpt_dir, extras)
                    if learners:
                        optimizer.state.clear()
    finally:
        roles.shutdown()
        if learners:
            learners.shutdown()
    final = latest_checkpoint(ckpt_dir)
    return {"checkpoint": final, "history": history, "stats": stats.__dict__, "resumed_from": resume,
            "first_round": first_round}


def _learner_state(start: str, resume: str | None, cfg: RLConfig, learner_workers: int):
    """The policy (the latest checkpoint of this run, else the start), its vocabulary, the frozen reference
    (held here only when this process is the learner and beta > 0), AdamW and the resumed learner state."""
    policy, vocab = from_pretrained(resume or start)
    ref = from_pretrained(start)[0].eval().requires_grad_(False) if cfg.beta > 0 and learner_workers == 1 else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    state = torch.load(os.path.join(resume, LEARNER_STATE), weights_only=True) if resume else None
    if state and "start_digest" in state and state["start_digest"] != start_digest(start):
        raise ValueError(f"{resume} continues a ParaRL run that started from {state['start']}, and checkpoint "
                         f"{start} holds other weights: pass a new run id, or the checkpoint it started from")
    if state:
        optimizer.load_state_dict(state["optimizer"])
    return policy, vocab, ref, optimizer, state


def _fresh_stats(roles, policy, prompts: list[list[int]], cfg: RLConfig, sampler: dict, S: int) -> RewardStats:
    """Reward mean / std of the starting policy on a random norm_fraction of the prompts (paper: 1%)."""
    roles.publish(policy.state_dict(), version=-2)
    n = max(cfg.norm_min_prompts, round(cfg.norm_fraction * len(prompts)))
    pick = torch.randperm(len(prompts), generator=_seeded(cfg.seed, 7))[:n].tolist()
    return fit_stats(roles, [prompts[i] for i in pick], cfg, sampler, S)


def _rollouts(roles, prompts: list[list[int]], cfg: RLConfig, sampler: dict, steps: list[int], round_: int,
              stats: RewardStats) -> tuple[dict, torch.Tensor, torch.Tensor, Rollouts]:
    """One round's G samples per prompt: what the actors returned, the normalised rewards (R, K), the group
    advantages (R, K; float64, as stored) and the learner's batch."""
    got = roles.collect(prompts, cfg.group_size, sampler, steps, cfg.seed, round_)
    reward, adv, zero = advantages(torch.from_numpy(got["raw"]), stats, cfg.group_size, cfg.reward_mode)
    batch = Rollouts(prompts=[p for p in prompts for _ in range(cfg.group_size)],
                     tokens=torch.from_numpy(got["tokens"]), step_map=torch.from_numpy(got["step_map"]),
                     logp=torch.from_numpy(got["logp"]), steps=steps, adv=adv.float(), zero_var=zero)
    return got, reward, adv, batch


def _write_round_rows(root: str, run_id: str, round_: int, ids: list[str], instr: list[str], G: int,
                      steps: list[int], got: dict, reward, adv, zero) -> None:
    """The round's trajectory and reward rows (every sampled step of every rollout)."""
    write_rows(root, "trajectories", trajectory_rows(run_id, round_, ids, instr, G, steps, got, reward, adv, zero),
               run=run_id)
    write_rows(root, "rewards", reward_rows(run_id, round_, ids, G, got, reward, adv), run=run_id)


def run_config(cfg: RLConfig, sampler: dict, reward_kwargs: dict | None, start: str) -> dict:
    """The runs-table config: every choice of this run (the paper publishes only K), read back with DuckDB."""
    return {"rl": cfg.to_dict(), "sampler": sampler, "reward": reward_kwargs, "start_checkpoint": start}


def add_timings(timings: dict, row: dict) -> None:
    """The runs row's timings: rounds done by this call and the seconds per role summed over them."""
    timings["last_round"] = row["round"]
    for k in ("rollout_s", "reward_s", "learner_s", "eval_s"):
        timings[k] = round(timings.get(k, 0.0) + (row[k] or 0.0), 3)


def _columns(shape: OutputShape) -> dict:
    from model.layout import IMAGE, TEXT, output_regions

    regions = np.asarray(output_regions(shape))
    return {"img_cols": regions == IMAGE, "txt_cols": regions == TEXT}


def metrics_row(run_id, round_, steps, got, reward, zero, upd, ev, learner_s, eval_s, wall_s, lr) -> dict:
    import datetime as dt

    t = got["timing"]
    return {"run_id": run_id, "round": round_, "reward_mean": float(reward.mean()),
            "reward_std": float(reward.std(unbiased=False)), "reward_by_step_json": json.dumps(by_step(steps, got["raw"], reward)),
            "zero_var_frac": float(zero.float().mean()), "loss": upd["loss"], "pg_loss": upd["pg_loss"], "kl": upd["kl"],
            "clip_frac": upd["clip_frac"], "ratio_max": upd["ratio_max"], "entropy": upd["entropy"],
            "grad_norm": upd["grad_norm"], "lr": lr, "heldout_agreement": ev.get("agreement"),
            "heldout_exact_image": ev.get("exact_image"), "heldout_text_correct": ev.get("text_correct"),
            "rollouts": len(got["tokens"]), "reward_pairs": t["reward_pairs"], "learner_tokens": upd["learner_tokens"],
            "text_split_rate": t["text_split_rate"], "rollout_s": t["rollout_s"], "reward_s": t["reward_s"],
            "learner_s": learner_s, "eval_s": eval_s, "wall_s": wall_s, "time": dt.datetime.now(dt.timezone.utc)}
