"""ParaRL end to end on CPU: replay ratio 1, credited tokens, rounds on Ray, killed actors, resume."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tasks.aggregate.aggregate as agg
from model.checkpoint import from_pretrained, save_pretrained
from model.sampling import SamplerConfig, generate
from rl.learner import RLConfig, Rollouts, update
from rl.replay import replay_logprobs, state_before
from storage.parquet import read_table
from tasks.pararl.pararl import checkpoint_layout, prepare_rl, run_rl
from tasks.sft.image_codes import fit_image_tokenizer
from tasks.sft.sft import load_set, prepare_sft
from tasks.sft.sft_data import SequenceConfig, batch_stream, build_prompt
from tasks.sft.sft_loop import SFTConfig, train

CURATE = dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0, near_duplicate_bits=2)
SEQ = dict(text_tokens=32, instruction_tokens=16)
RECIPE = {"model": dict(d_model=48, n_layers=2, n_heads=2, mlp_hidden_size=96, rope_theta=10000.0),
          "sft": dict(lr=3e-3, warmup_steps=20, total_steps=400, batch_size=16, bf16=False, seed=0),
          "seq": SEQ, "tokenizer_vocab": 400, "categories": ("recolour", "remove", "replace")}
SAMPLER = dict(steps=8, image_steps=4)
FAST = dict(rounds=2, prompts_per_round=4, group_size=3, sampled_steps=2, norm_min_prompts=6, inner_iters=2,
            eval_every=1, checkpoint_every=1, micro_batch=8, lr=1e-3)


def build_sft_checkpoint(work):
    """A toy dataset and a briefly fine-tuned tiny checkpoint folder (what `parapipe sft` writes): the
    `sft_checkpoint` fixture, session-scoped in conftest.py since tests/test_faults.py runs ParaRL on it too."""
    root, out = str(work / "lake"), str(work / "sft")
    src = {"type": "toy", "name": "toy", "preset": "tiny", "n": 240, "seed": 0, "categories": list(RECIPE["categories"])}
    agg.ingest_source.fn(src, root, "d", CURATE)
    vq = fit_image_tokenizer.fn(root, "d", str(work / "vq"))
    paths = prepare_sft.fn(root, "d", out, RECIPE, image_tokenizer_dir=vq, eval_per_category=2)
    model, vocab = from_pretrained(paths["base"])
    data, cfg = load_set(paths["train_data"]), SFTConfig(**RECIPE["sft"])
    train(model, batch_stream(data, vocab, SequenceConfig(**SEQ), cfg.batch_size, cfg.seed), cfg, vocab.mask_id)
    ckpt = str(work / "ckpt")
    save_pretrained(model, vocab, ckpt, extra={"parapipe_sequence": SEQ, "parapipe_image_grid": [4, 4]})
    shutil.copy(os.path.join(paths["base"], "tokenizer.json"), ckpt)
    shutil.copytree(os.path.join(paths["base"], "image_tokenizer"), os.path.join(ckpt, "image_tokenizer"))
    return root, ckpt, work


def build_random_clip(work):
    """A randomly initialised tiny open_clip model saved as a reward folder (continuous scores): `random_clip`."""
    import open_clip

    from rl.reward import TINY_CLIP_CONFIG, register_tiny_clip, save_clip_folder

    name = register_tiny_clip(str(work / "clip-config"))
    torch.manual_seed(0)
    return save_clip_folder(str(work / "clip"), open_clip.create_model(name), name, TINY_CLIP_CONFIG)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def _rollout(ckpt, root, seed=0, **fast):
    seq, shape, _ = checkpoint_layout(ckpt)
    model, vocab = from_pretrained(ckpt)
    data = load_set(prepare_rl(ckpt, root, "d", os.path.join(os.path.dirname(ckpt), "prep"))["train"])
    prompts = [build_prompt(vocab, seq, data.input_codes[i], data.instruction[i]) for i in range(3)]
    cfg = SamplerConfig(**SAMPLER, text_block_length=seq.text_tokens, text_temperature=1.0, image_temperature=1.0,
                        **fast)
    steps = (2, 5, 7)
    res = generate(model, vocab, shape, prompts, cfg, num_samples=2, generator=torch.Generator().manual_seed(seed),
                   record_steps=tuple(range(SAMPLER["steps"])), trace=True)
    return model, vocab, shape, cfg, [p for p in prompts for _ in range(2)], res, steps


@pytest.mark.parametrize("fast", [{}, {"text_threshold": 0.3, "image_threshold": 0.3}], ids=["fixed", "thresholds"])
def test_replayed_logprobs_equal_behaviour_and_credit_exactly_the_step(sft_checkpoint, fast):
    # threshold decoding changes which slots commit at a step, never the logits: the replay stays exact
    root, ckpt, _ = sft_checkpoint
    model, vocab, shape, cfg, prompts, res, steps = _rollout(ckpt, root, **fast)
    n_credited = 0
    for s in range(1, SAMPLER["steps"]):  # every step: window credit replays them all
        rows = [0, 3, 5]  # a different batch (and padding) than the rollout's
        logp, credited = replay_logprobs(model, [prompts[r] for r in rows], res.tokens[rows], res.step_map[rows],
                                         torch.tensor([s] * 3), vocab, shape, cfg)
        # the tokens credited at s are exactly the slots that went from [MASK] to a token at s
        before, after = res.snapshots[s - 1], res.snapshots[s]
        assert torch.equal(credited, (before[rows] == vocab.mask_id) & (after[rows] != vocab.mask_id))
        assert torch.equal(state_before(res.tokens[rows], res.step_map[rows], s + 1, vocab.mask_id), after[rows])
        ratio = torch.exp(logp[credited] - res.logp[rows][credited])
        assert (credited.sum() > 0 or fast) and torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
        assert not torch.isnan(res.logp[rows][credited]).any()
        n_credited += int(credited.sum())
    assert n_credited == int((res.step_map[[0, 3, 5]] >= 1).sum())
    if fast:  # the thresholds did decode most image codes at the first image step (the fixed schedule: 3 of 16)
        image_slots = res.tokens[0] >= vocab.image_offset
        per_step = [int((res.step_map[0][image_slots] == s).sum()) for s in range(SAMPLER["steps"])]
        assert next(n for n in per_step if n) > int(image_slots.sum()) // 2, per_step
    # every output slot is decoded exactly once: the per-step credits partition the slots
    decoded = torch.stack([(res.step_map == s) for s in range(SAMPLER["steps"])]).sum(0)
    assert torch.equal(decoded, (res.step_map >= 0).long())


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def test_minibatches_take_that_many_steps_and_keep_the_full_batch_loss(sft_checkpoint):
    root, ckpt, _ = sft_checkpoint
    model, vocab, shape, cfg, prompts, res, steps = _rollout(ckpt, root)
    R = len(prompts)
    adv = torch.tensor([[1.0, -0.5, 0.2], [-1.0, 0.5, -0.2]] * (R // 2))  # (R, K)
    batch = Rollouts(prompts=prompts, tokens=res.tokens, step_map=res.step_map, logp=res.logp, steps=list(steps),
                     adv=adv, zero_var=torch.zeros(R, 3, dtype=torch.bool))
    out = {}
    for m in (1, 3):
        opt = CountingSGD(model.parameters(), lr=0.0)  # lr 0: the policy stays the behaviour policy
        rl = RLConfig(inner_iters=2, minibatches=m, micro_batch=5, beta=0.0, reward="exact")
        out[m] = update(model, None, opt, batch, rl, vocab, shape, cfg)
        assert opt.steps == 2 * m
    assert out[3]["pairs"] == out[1]["pairs"] > 3 and out[3]["learner_tokens"] == out[1]["learner_tokens"]
    assert out[3]["pg_loss"] == pytest.approx(out[1]["pg_loss"], rel=1e-5, abs=1e-7)
    assert out[1]["pg_loss"] != 0.0 and out[3]["clip_frac"] == 0.0


def _run(sft_checkpoint, clip, run_id, out_name, crash=None, learners=1, fsdp=False, **overrides):
    root, ckpt, work = sft_checkpoint
    out = str(work / out_name)
    paths = prepare_rl(ckpt, root, "d", out, eval_per_category=4)
    cfg = RLConfig(**{**FAST, **overrides})
    return run_rl(ckpt, paths, cfg, out, root, run_id, sampler=SAMPLER,
                  reward_kwargs={"kind": "clip", "clip_folder": clip}, crash_markers=crash,
                  learner_workers=learners, fsdp=fsdp), root


STABLE = ("round", "reward_mean", "reward_std", "zero_var_frac", "loss", "pg_loss", "kl", "clip_frac", "entropy",
          "heldout_agreement", "heldout_exact_image", "rollouts", "learner_tokens")


def _metrics(root, run_id):
    rows = sorted(read_table(root, "rl_metrics", run=run_id).to_pylist(), key=lambda r: r["round"])
    assert len({r["round"] for r in rows}) == len(rows), "a round was logged twice"
    return [{k: r[k] for k in STABLE} for r in rows]


@pytest.mark.slow
def test_two_rounds_on_ray_then_killed_actors_and_resume_reproduce_them(sft_checkpoint, random_clip, ray_local,
                                                                        tmp_path):
    result, root = _run(sft_checkpoint, random_clip, "plain", "rl-plain")
    ref = _metrics(root, "plain")
    assert [r["round"] for r in ref] == [0, 1] and result["first_round"] == 0
    assert all(r["rollouts"] == 4 * 3 and r["learner_tokens"] > 0 for r in ref)
    assert all(r["heldout_agreement"] is not None for r in ref) and 0 <= ref[1]["heldout_exact_image"] <= 1
    traj = read_table(root, "trajectories", run="plain").to_pylist()
    assert len(traj) == 2 * 4 * 3 * 2  # rounds x prompts x group x sampled steps
    assert all(0 <= t["reward"] <= 1 and t["slot"] in (0, 1) for t in traj)
    assert {t["step"] for t in traj if t["slot"] == 1} == {SAMPLER["steps"] - 1}  # the last step is always rewarded
    # advantages are standardised within each (round, prompt, step) group
    groups = {}
    for t in traj:
        groups.setdefault((t["round"], t["sample_id"], t["slot"]), []).append(t["advantage"])
    assert all(abs(sum(a)) < 1e-5 and len(a) == 3 for a in groups.values())
    from storage.query import query

    by_step = query(root, "SELECT * FROM reward_by_step WHERE run_id = 'plain'").to_pylist()
    assert [r["slot"] for r in by_step] == [0, 1] and all(r["n"] == 2 * 4 * 3 for r in by_step)
    assert by_step[1]["mean_step"] == SAMPLER["steps"] - 1
    groups_view = query(root, "SELECT * FROM best_and_worst_groups WHERE run_id = 'plain'").to_pylist()
    best = [g for g in groups_view if g["kind"] == "best"]
    assert best and max(g["mean_reward"] for g in groups_view) == best[0]["mean_reward"]
    ckpt = result["checkpoint"]
    assert ckpt.endswith("round-00001") and from_pretrained(ckpt)[0] is not None

    # a rollout actor and a reward actor each die once, mid-call: Ray restarts them, the lost calls are redone
    crash = {"rollout": str(tmp_path / "rollout.crashed"), "reward": str(tmp_path / "reward.crashed")}
    _run(sft_checkpoint, random_clip, "crashed", "rl-crashed", crash=crash)
    assert all(os.path.exists(p) for p in crash.values())
    assert _metrics(root, "crashed") == ref
    assert len(read_table(root, "trajectories", run="crashed")) == len(traj)

    # two data-parallel learner actors (gloo): the same updates as the single learner, up to float summation
    # order; round 0 neither evaluates nor checkpoints, so round 1 samples with the weights rank 0 put in the
    # object store without the driver ever loading them
    group, _ = _run(sft_checkpoint, random_clip, "group", "rl-group", learners=2, eval_every=2, checkpoint_every=2)
    grouped_rows = _metrics(root, "group")
    assert len(grouped_rows) == 2 and grouped_rows[0]["heldout_agreement"] is None and grouped_rows[1]["heldout_agreement"] is not None
    for g, want in zip(grouped_rows, ref):
        assert g["rollouts"] == want["rollouts"] and g["learner_tokens"] == want["learner_tokens"]
        for key in ("reward_mean", "loss", "pg_loss", "kl", "clip_frac", "entropy"):
            assert g[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (g["round"], key)
    single = from_pretrained(str(sft_checkpoint[2] / "rl-plain" / "checkpoints" / "plain" / "round-00001"))[0]
    grouped, start = from_pretrained(group["checkpoint"])[0], from_pretrained(sft_checkpoint[1])[0]
    moved = max((a - b).abs().max().item() for a, b in zip(single.parameters(), start.parameters()))
    apart = max((a - b).abs().max().item() for a, b in zip(single.parameters(), grouped.parameters()))
    assert moved > 1e-4 and apart < 1e-3 * moved, (moved, apart)
    [row] = [r for r in read_table(root, "runs").to_pylist() if r["run_id"] == "group"]
    assert json.loads(row["config_json"])["learner_workers"] == 2
    # the same group FSDP2-sharded, stopped after round 0 and resumed: the optimiser state goes out to the shards
    # and back into the checkpoint by parameter name, so round 1 is the single learner's round 1 too
    _run(sft_checkpoint, random_clip, "fsdp", "rl-fsdp", learners=2, fsdp=True, rounds=1)
    _run(sft_checkpoint, random_clip, "fsdp", "rl-fsdp", learners=2, fsdp=True)
    sharded = _metrics(root, "fsdp")
    assert [r["round"] for r in sharded] == [0, 1]
    for got, want in zip(sharded, ref):
        assert got["rollouts"] == want["rollouts"] and got["learner_tokens"] == want["learner_tokens"]
        for key in ("reward_mean", "loss", "pg_loss", "kl", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), (got["round"], key)

    # resume: the same run id after its round-0 checkpoint redoes only round 1, identically
    out = sft_checkpoint[2] / "rl-resume"
    _run(sft_checkpoint, random_clip, "resume", "rl-resume", rounds=1)
    resumed, _ = _run(sft_checkpoint, random_clip, "resume", "rl-resume")
    assert resumed["first_round"] == 1 and resumed["resumed_from"].endswith("round-00000")
    assert _metrics(root, "resume") == ref
    assert os.path.isdir(out / "checkpoints" / "resume" / "round-00001")
    # the runs table: one row per call, each with the rounds it did and its seconds per role
    runs = sorted((r for r in read_table(root, "runs").to_pylist() if r["run_id"] == "resume"),
                  key=lambda r: r["start_time"])
    done = [json.loads(r["timings_json"]) for r in runs]
    assert [(t["first_round"], t["last_round"]) for t in done] == [(0, 0), (1, 1)]
    assert all(t["rollout_s"] > 0 and t["learner_s"] > 0 and "error" not in t for t in done)
    assert all(r["stage"] == "rl" and r["end_time"] > r["start_time"] for r in runs)
    assert json.loads(runs[0]["config_json"])["reward_stats"] == json.loads(runs[1]["config_json"])["reward_stats"]
    # that run id from other weights (a newer SFT checkpoint behind the same link) is refused before any work;
    # the same weights at another path (a moved or linked folder) resume
    other = tmp_path / "other-sft"
    shutil.copytree(sft_checkpoint[1], other)
    weights = other / "model.safetensors"
    save_file({k: v + 1e-3 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    paths = prepare_rl(sft_checkpoint[1], root, "d", str(out), eval_per_category=4)
    with pytest.raises(ValueError, match="holds other weights: pass a new run id"):
        run_rl(str(other), paths, RLConfig(**FAST), str(out), root, "resume", sampler=SAMPLER,
               reward_kwargs={"kind": "clip", "clip_folder": random_clip})
    os.symlink(sft_checkpoint[1], tmp_path / "linked-sft")
    again = run_rl(str(tmp_path / "linked-sft"), paths, RLConfig(**FAST), str(out), root, "resume", sampler=SAMPLER,
                   reward_kwargs={"kind": "clip", "clip_folder": random_clip})
    assert again["first_round"] == 2 and again["history"] == [] and _metrics(root, "resume") == ref


def test_rl_config_and_flow_refuse_bad_input_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="group_size=1"):
        RLConfig(group_size=1)
    with pytest.raises(ValueError, match="reward='bleu'"):
        RLConfig(reward="bleu")
    with pytest.raises(ValueError, match="temperatures"):
        RLConfig(text_temperature=0.0)


@pytest.mark.slow
def test_pararl_flow_one_round_with_artifacts(sft_checkpoint, random_clip, ray_local, prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pararl import pararl

    root, ckpt, _ = sft_checkpoint
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        pararl(checkpoint=str(tmp_path / "missing"), root=root, dataset="d")
    with pytest.raises(ValueError, match="group_size"):
        pararl(checkpoint=ckpt, root=root, dataset="d", config={"group_size": 1})
    other = shutil.copytree(random_clip, tmp_path / "clip-standard")  # a toy CLIP of another preset mis-scores
    info = json.loads((other / "reward.json").read_text())
    (other / "reward.json").write_text(json.dumps({**info, "metrics": {**info.get("metrics", {}), "preset": "standard"}}))
    with pytest.raises(ValueError, match="fitted on preset 'standard', but the dataset is toy preset 'tiny'"):
        pararl(checkpoint=ckpt, root=root, dataset="d", out=str(tmp_path / "rl"), clip_folder=str(other))
    out = pararl(checkpoint=ckpt, root=root, dataset="d", out=str(tmp_path / "rl"), run_id="flow-run",
                 config={**FAST, "rounds": 1}, sampler=SAMPLER, clip_folder=random_clip)
    assert out["rounds"] == 1 and out["checkpoint"].endswith("round-00000") and out["reward"]["kind"] == "clip"
    # the summary's last round: one metrics row, its reward by step parsed (printed nested, not as a raw dict)
    by_step = out["last"]["reward_by_step"]
    assert out["last"]["round"] == 0 and len(by_step) == 2 and "7" in by_step, out["last"]  # K = 2, the last step
    assert "time" not in out["last"] and "reward_by_step_json" not in out["last"]
    runs = [r for r in read_table(root, "runs").to_pylist() if r["run_id"] == "flow-run"]
    assert len(runs) == 1 and '"sampled_steps": 2' in runs[0]["config_json"]

    async def artifact_keys():
        async with get_client() as client:
            # by key: the session's other tests leave artifacts too (unkeyed ones among them)
            flt = ArtifactFilter(key=ArtifactFilterKey(like_="rl-flow-run"))
            return {a.key for a in await client.read_artifacts(artifact_filter=flt)}

    import asyncio

    keys = asyncio.run(artifact_keys())
    assert {"rl-flow-run-metrics", "rl-flow-run-summary", "rl-flow-run-chart", "rl-flow-run-trajectories"} <= keys
    assert any(k.startswith("rl-flow-run-progress-") for k in keys)  # one progress card per flow run


def test_ablation_commands_train_their_arms_and_score_them_side_by_side(sft_checkpoint, random_clip, ray_local,
                                                                        prefect_harness, tmp_path):
    from PIL import Image

    from flows.ablate import ablate

    root, ckpt, _ = sft_checkpoint
    with pytest.raises(ValueError, match="study='nope'"):
        ablate(study="nope", checkpoint=ckpt, root=root, dataset="d")
    common = dict(checkpoint=ckpt, root=root, dataset="d", out=str(tmp_path / "ab"), limit=6, sampler=SAMPLER,
                  clip_folder=random_clip, rl={**FAST, "rounds": 1})
    levels = ablate(study="reward-level", **common)
    assert set(levels["checkpoints"]) == {"start", "trajectory", "output"}
    assert all(c.endswith("round-00000") for k, c in levels["checkpoints"].items() if k != "start")
    assert len(levels["table"]) == 3 and all(name.endswith("(parallel)") for name in levels["table"])
    assert all(0 <= row["overall"] <= 100 for row in levels["table"].values())
    runs = {r["run_id"]: r for r in read_table(root, "runs").to_pylist() if r["stage"] == "rl"}
    assert '"reward_mode": "output"' in runs["ablation-reward-level-output"]["config_json"]
    assert '"reward_mode": "trajectory"' in runs["ablation-reward-level-trajectory"]["config_json"]
    chart = tmp_path / "ab" / "reward-level" / "metrics.png"
    assert Image.open(chart).size[0] > 300
    decoding = ablate(study="decoding", **common)  # Table 3: no training, one checkpoint in both modes
    assert set(decoding["checkpoints"]) == {"start"}
    assert sorted(n.rsplit(" ", 1)[1] for n in decoding["table"]) == ["(parallel)", "(sequential)"]
