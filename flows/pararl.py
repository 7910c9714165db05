"""`pararl`: ParaRL (trajectory-level GRPO with text-image alignment rewards) from an SFT checkpoint.

validate the config -> tokenise prompts (and held-out toy tasks) -> the reward model (a local
open_clip model, or a tiny CLIP fitted on the toy world for the embedded default) -> rounds of
rollouts on Ray actors, rewards on Ray actors and a learner update (tasks/pararl/pararl.run_rl; re-running
the same run id resumes) -> a summary artifact. Every round writes rl_metrics, trajectories and
rewards rows (inspect them with `parapipe query "SELECT * FROM reward_by_step"`) and updates the
run's progress and metrics artifacts.
"""
import json
import os
from dataclasses import asdict

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact

from rl.learner import TOY_REWARDS, RLConfig
from tasks.pararl.pararl import prepare_rl, run_rl
from tasks.pipeline.progress import bar as progress_bar
from tasks.pipeline.ui_artifacts import publish_markdown, rl_metrics_markdown, run_key, stable_key, trajectory_markdown

prepare = task(prepare_rl, name="prepare-rl")
SHOWN = ("round", "reward_mean", "zero_var_frac", "kl", "clip_frac", "entropy", "heldout_agreement",
         "heldout_exact_image", "rollout_s", "reward_s", "learner_s")


def _key(*parts: str) -> str:
    return "-".join("".join(c if c.isalnum() else "-" for c in p.lower()) for p in parts)[:100]


@task(name="fit-reward")
def fit_reward(out: str, preset: str, seed: int = 0) -> str:
    """The embedded default's reward model: a tiny CLIP trained on toy (image, trace) pairs, cached in
    out/PRESET (a CLIP fitted on one preset's images and words would mis-score another's)."""
    from tasks.pararl.fit_reward import fit_tiny_clip

    folder = os.path.join(out, preset)
    if not os.path.isfile(os.path.join(folder, "reward.json")):
        print(f"fitting the toy reward CLIP for preset {preset!r} into {folder} (a few minutes, once; "
              f"--clip-folder reuses one, e.g. make run's runs/default/reward)")
        fit_tiny_clip(folder, preset=preset, seed=seed)
    return folder


def check_clip_preset(clip_folder: str, preset: str) -> None:
    """A toy CLIP (reward.json names its preset) must have been fitted on the dataset's preset."""
    info = os.path.join(clip_folder, "reward.json")
    if not os.path.isfile(info):
        return
    with open(info) as f:
        fitted = json.load(f).get("metrics", {}).get("preset")
    if fitted is not None and fitted != preset:
        raise ValueError(f"clip_folder={clip_folder!r} holds a toy CLIP fitted on preset {fitted!r}, but the dataset "
                         f"is toy preset {preset!r}; fit one with `parapipe fit-reward --out DIR --preset {preset}` "
                         f"or leave clip_folder out to have one fitted")


@task(name="run-rl")
def train(checkpoint: str, paths: dict, cfg: dict, out: str, root: str, run_id: str, sampler: dict | None,
          reward_kwargs: dict, rollout_workers: int, reward_workers: int, use_gpu: bool,
          learner_workers: int = 1, fsdp: bool = False) -> dict:
    rl = RLConfig(**cfg)
    progress = create_progress_artifact(0.0, key=run_key("rl", run_id, "progress"), description=f"ParaRL {run_id}")
    chart = stable_key("rl", run_id, "chart")
    rows: list[dict] = []
    bar = progress_bar(f"ParaRL {run_id}", rl.rounds, unit="round")

    def on_round(row: dict) -> None:
        rows.append({k: row[k] for k in SHOWN})
        bar.update(row["round"] + 1 - bar.n)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", refresh=False)
        update_progress_artifact(progress, 100.0 * (row["round"] + 1) / rl.rounds)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()
                       if v is not None))
        create_table_artifact([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                              key=_key("rl", run_id, "metrics"), description=f"ParaRL {run_id}: per-round metrics")
        if row.get("heldout_agreement") is not None and row["round"] + 1 < rl.rounds:  # an eval round: redraw
            publish_markdown(chart, rl_metrics_markdown, root, run_id, out, description=f"ParaRL {run_id}: per round")

    try:
        result = run_rl(checkpoint, paths, rl, out, root, run_id, sampler, reward_kwargs, rollout_workers,
                        reward_workers, use_gpu, on_round=on_round, learner_workers=learner_workers, fsdp=fsdp)
    finally:
        bar.close()
    if not result["history"]:  # resumed with every round done
        update_progress_artifact(progress, 100.0, description=f"ParaRL {run_id}: nothing to do, {rl.rounds} rounds done")
    publish_markdown(chart, rl_metrics_markdown, root, run_id, out, description=f"ParaRL {run_id}: per round")
    publish_markdown(stable_key("rl", run_id, "trajectories"), trajectory_markdown, root, run_id, out, checkpoint,
                     description=f"ParaRL {run_id}: denoising strips")
    return {k: v for k, v in result.items() if k != "history"} | {"rounds": len(result["history"]),
                                                                 "last": last_round(result["history"])}


def last_round(history: list[dict]) -> dict | None:
    """The last round's metrics row as the summary shows it: reward by step parsed, no run id or timestamp."""
    if not history:
        return None
    row = {k: v for k, v in history[-1].items() if k not in ("run_id", "time", "reward_by_step_json")}
    return row | {"reward_by_step": json.loads(history[-1]["reward_by_step_json"])}



@flow(name="pararl", log_prints=True)
def pararl(checkpoint: str, root: str = "data", dataset: str = "toy-tiny", out: str = "runs/rl",
           run_id: str = "rl-toy-tiny", config: dict | None = None, sampler: dict | None = None,
           clip_folder: str | None = None, clip_model: str | None = None, clip_pretrained: str | None = None,
           categories: list[str] | None = None, rollout_workers: int = 1, reward_workers: int = 1,
           use_gpu: bool = False, learner_workers: int = 1, fsdp: bool = False) -> dict:
    """learner_workers > 1: a data-parallel learner group of Ray actors; fsdp: FSDP2-sharded (8B policies)."""
    cfg = RLConfig(**(config or {}))  # bad values fail here, before any work
    if min(rollout_workers, reward_workers, learner_workers) < 1:
        raise ValueError(f"rollout_workers={rollout_workers}, reward_workers={reward_workers}, learner_workers="
                         f"{learner_workers}: each needs at least 1")
    if fsdp and learner_workers < 2:
        raise ValueError(f"fsdp shards a learner group, but learner_workers={learner_workers}; pass 2 or more")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ValueError(f"checkpoint={checkpoint!r} is not a checkpoint folder (no config.json); pass the folder "
                         f"an SFT run wrote, e.g. runs/default/sft/final (make run's)")
    root = root if "://" in root else os.path.abspath(root)
    # a link such as runs/default/sft/final is recorded as the checkpoint it points at
    checkpoint, out = os.path.realpath(checkpoint), os.path.abspath(out)
    paths = prepare(checkpoint, root, dataset, out, tuple(categories) if categories else None)
    if cfg.reward in TOY_REWARDS and "preset" not in paths:
        raise ValueError(f"reward={cfg.reward!r} scores toy-world facts, but {dataset!r} is not a toy dataset; "
                         f"use reward='clip'")
    if cfg.reward in TOY_REWARDS:
        reward_kwargs = {"kind": cfg.reward, "preset": paths["preset"]}
    elif clip_folder or clip_model:
        if clip_folder and "preset" in paths:
            check_clip_preset(clip_folder, paths["preset"])
        reward_kwargs = {"kind": "clip", "clip_folder": clip_folder, "model_name": clip_model,
                         "pretrained": clip_pretrained}
    elif "preset" in paths:
        reward_kwargs = {"kind": "clip", "clip_folder": fit_reward(os.path.join(out, "reward"), paths["preset"])}
    else:
        raise ValueError(f"dataset {dataset!r} is not the toy world, so no tiny CLIP can be fitted for it; pass "
                         f"clip_model (an open_clip architecture, e.g. ViT-L-14) and clip_pretrained (a local file)")
    result = train(checkpoint, paths, asdict(cfg), out, root, run_id, sampler, reward_kwargs, rollout_workers,
                   reward_workers, use_gpu, learner_workers, fsdp)
    create_markdown_artifact(f"# ParaRL {run_id}\n\nstarted from `{checkpoint}`; final checkpoint "
                             f"`{result['checkpoint']}`\n\nreward: `{json.dumps(reward_kwargs)}`; reward stats "
                             f"`{json.dumps(result['stats'])}`\n\nconfig: `{json.dumps(asdict(cfg))}`",
                             key=_key("rl", run_id, "summary"))
    return {**result, "train_size": paths["train_size"], "reward": reward_kwargs}
