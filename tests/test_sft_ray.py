"""Distributed SFT on Ray Train with two CPU workers (gloo): learning, sharding, exact resume,
a killed worker, and the final checkpoint in the sampler and `parapipe generate`."""
import json
import os

import pytest

import tasks.aggregate.aggregate as agg
from storage.parquet import read_table
from tasks.sft.image_codes import fit_image_tokenizer
from tasks.sft.sft import prepare_sft, run_sft

pytestmark = pytest.mark.slow
CURATE = dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0, near_duplicate_bits=2)
RECIPE = {"model": dict(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, rope_theta=10000.0),
          "sft": dict(lr=3e-3, warmup_steps=2, total_steps=12, batch_size=8, cond_dropout=0.1, bf16=True, seed=0),
          "seq": dict(text_tokens=40, instruction_tokens=26), "tokenizer_vocab": 400,
          "image_positions": True}  # the optional image row/column embeddings go through DDP, resume and generate


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    work = tmp_path_factory.mktemp("sft")
    root, out = str(work / "lake"), str(work / "out")
    agg.ingest_source.fn({"type": "toy", "name": "toy", "preset": "tiny", "n": 300, "seed": 0}, root, "d", CURATE)
    vq = fit_image_tokenizer.fn(root, "d", str(work / "vq"))
    paths = prepare_sft.fn(root, "d", out, RECIPE, image_tokenizer_dir=vq, eval_per_category=2)
    return root, out, paths


def _fit(prepared, run_id, **extra):
    root, out, paths = prepared
    cfg = {"base": paths["base"], "train_data": paths["train_data"], "seq": RECIPE["seq"], "sft": RECIPE["sft"],
           "root": root, "run_id": run_id, "out": out, "checkpoint_every": 4, **extra}
    return run_sft.fn(cfg, num_workers=2, storage_path=os.path.join(out, "ray"), max_failures=2)


def _losses(root, run_id):
    rows = read_table(root, "train_metrics", run=run_id).to_pylist()
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


def test_two_workers_learn_on_different_shards(prepared, ray_cluster):
    root, _, paths = prepared
    assert paths["train_size"] > 200 and paths["from_cache"] is False
    config = json.loads(open(os.path.join(paths["base"], "config.json")).read())
    assert config["image_pos_grid"] == [4, 4] and config["soi_id"] is not None
    result = _fit(prepared, "plain")
    assert result["metrics"]["step"] == 12 and result["metrics"]["distinct_rank_batches"] == 2
    losses = _losses(root, "plain")
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3))


def test_resume_reproduces_the_uninterrupted_run(prepared, ray_cluster):
    root = prepared[0]
    first = _fit(prepared, "resumed", max_steps_this_run=8)
    assert first["metrics"]["step"] == 8
    second = _fit(prepared, "resumed")
    assert second["metrics"]["step"] == 12
    plain, resumed = _losses(root, "plain"), _losses(root, "resumed")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(plain[step], rel=1e-4, abs=1e-5), step


def test_a_killed_worker_is_survived(prepared, ray_cluster, tmp_path):
    root = prepared[0]
    result = _fit(prepared, "crashy", crash_at_step=6, crash_marker=str(tmp_path / "crashed"))
    assert os.path.exists(tmp_path / "crashed") and result["metrics"]["step"] == 12
    plain, crashy = _losses(root, "plain"), _losses(root, "crashy")
    assert sorted(crashy) == list(range(1, 13))
    assert crashy[12] == pytest.approx(plain[12], rel=1e-4, abs=1e-5)  # lost steps 5-6 were replayed exactly


def test_final_checkpoint_loads_into_sampler_and_generate(prepared, ray_cluster, tmp_path):
    from flows.cli import main
    from model.checkpoint import from_pretrained

    ckpt = os.path.join(prepared[1], "checkpoints", "plain", "final")
    model, vocab = from_pretrained(ckpt)
    assert os.path.exists(os.path.join(ckpt, "train_state.pt")) and vocab.codebook_size == 16
    samples = read_table(prepared[0], "samples", run="d").to_pylist()
    edit = next(s for s in samples if s["kind"] == "edit")
    (tmp_path / "in.png").write_bytes(edit["input_image"])
    main(["generate", "--checkpoint", ckpt, "--prompt", edit["instruction"], "--image", str(tmp_path / "in.png"),
          "--out", str(tmp_path / "gen"), "--steps", "8", "--image-steps", "4", "--text-length", "40",
          "--block-length", "40"])
    meta = json.loads((tmp_path / "gen" / "meta.json").read_text())
    assert meta["grid"] == [4, 4] and (tmp_path / "gen" / "image.png").exists()
