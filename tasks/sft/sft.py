"""Distributed SFT on Ray Train: data preparation, `train_loop_per_worker`, and the Prefect tasks.

The worker loop is plain PyTorch around tasks/sft/sft_loop.train_step plus the Ray calls: the rank and
world size, `prepare_model` (DDP; FSDP2 `fully_shard` per block on GPUs), `get_checkpoint` and
`report`. A checkpoint folder is a model folder (`config.json`, safetensors, `tokenizer.json`,
`image_tokenizer/`) plus `train_state.pt` (optimiser, step), so the latest one loads straight into
`parapipe generate`. The masking generator is re-seeded from (seed, rank, step) every step and the
data stream is a pure function of the step, so a resumed run replays exactly what the uninterrupted
run would have done. Rank 0 appends the step metrics to the train_metrics table at every
checkpoint (keyed by run and step, so replays never duplicate them) and evaluates on held-out toy
tasks every eval_interval steps (eval_results table).
"""
import dataclasses
import json
import os
import shutil
import tempfile
import time

import torch
from prefect import task

from model.checkpoint import from_pretrained, read_config, save_pretrained
from tasks.pipeline.progress import follow_steps, start_ray, write_step
from tasks.sft.sft_data import SequenceConfig, TokenisedSet, batch_stream
from tasks.sft.sft_loop import SFTConfig, make_optimizer, train_step, training_module

TRAIN_STATE = "train_state.pt"
METRIC_KEYS = ("loss", "loss_text", "loss_image", "grad_norm", "tokens")
DDP_KWARGS: dict = {}
"""DistributedDataParallel settings (cfg['ddp'] overrides): torch's defaults. One 100 MB bucket with
gradient_as_bucket_view was slower in both rounds measured (benchmarks/sft.py --ddp, a noisy shared CPU)."""


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the masking generator of one rank at one step (stateless, so resumes are exact)."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2 ** 63)


def save_set(data: TokenisedSet, path: str) -> str:
    """Plain lists / dicts of primitives: loadable with weights_only=True (no pickled classes)."""
    torch.save(dataclasses.asdict(data), path)
    return path


def load_set(path: str) -> TokenisedSet:
    return TokenisedSet(**torch.load(path, weights_only=True))


def save_scenes(rows: list[dict], path: str) -> str:
    """The true output scenes of toy rows as JSON (sample_id -> description), never a pickle."""
    from tasks.sft.toy_eval import toy_scenes
    from tasks.toy.scene import describe

    with open(path, "w") as f:
        json.dump({sid: describe(scene) for sid, scene in toy_scenes(rows).items()}, f)
    return path


def load_scenes(path: str) -> dict:
    """sample_id -> Scene, read back from save_scenes's JSON."""
    from tasks.toy.scene import parse_description

    with open(path) as f:
        return {sid: parse_description(text) for sid, text in json.load(f).items()}


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _wrap(model, cfg: dict):
    """DDP through Ray; FSDP2 (fully_shard per block, bf16 compute) when asked for on GPUs."""
    import ray.train.torch

    if cfg.get("fsdp") and torch.cuda.is_available():
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = model.to(ray.train.torch.get_device())
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.model.transformer.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        model.gradient_checkpointing = bool(cfg.get("activation_checkpointing", True))
        return model
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=cfg.get("ddp", DDP_KWARGS))


def _is_fsdp(model) -> bool:
    return hasattr(_unwrap(model).model.transformer.blocks[0], "reshard")  # fully_shard adds it


def _full_state_dict(model) -> dict:
    if _is_fsdp(model):  # gather the shards (a collective: every rank calls it)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _unwrap(model).state_dict()


def _save_checkpoint(model, optimizer, step: int, cfg: dict, vocab, folder: str) -> None:
    """Model folder + train_state.pt, written by rank 0."""
    base = cfg["base"]
    core = _unwrap(model)
    clone = type(core)(core.config)
    clone.load_state_dict(_full_state_dict(model))
    recorded = {"parapipe_sequence": cfg["seq"]}
    if cfg.get("sampler"):  # the recipe's evaluation sampler: `parapipe generate` samples with it by default
        recorded["parapipe_sampler"] = cfg["sampler"]
    save_pretrained(clone, vocab, folder, extra=recorded)
    shutil.copy(os.path.join(base, "tokenizer.json"), folder)
    image_tokenizer = cfg.get("image_tokenizer") or os.path.join(base, "image_tokenizer")
    if os.path.isdir(image_tokenizer):  # the checkpoint is self-contained: generate / RL decode with it
        shutil.copytree(image_tokenizer, os.path.join(folder, "image_tokenizer"))
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "sft": cfg["sft"]},
               os.path.join(folder, TRAIN_STATE))


def _restore(model, optimizer_state_holder: dict) -> int:
    """Loads the latest Ray checkpoint into the (unwrapped) model; returns the step to start at."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        loaded, _ = from_pretrained(d)
        model.load_state_dict(loaded.state_dict())
        state = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)
    optimizer_state_holder["state"] = state["optimizer"]
    return int(state["step"])


def _mean_over_ranks(rows: list[dict], world: int) -> list[dict]:
    """The steps' METRIC_KEYS averaged over the ranks (tokens summed) in one all-reduce for the whole
    window (not one per step), and tokens_per_s = all ranks' tokens / this rank's step seconds."""
    if world > 1 and rows:
        import torch.distributed as dist

        t = torch.tensor([[r[k] for k in METRIC_KEYS] for r in rows], dtype=torch.float64)  # (steps, keys)
        dist.all_reduce(t)
        rows = [{**r, **{k: v if k == "tokens" else v / world for k, v in zip(METRIC_KEYS, vals)}}
                for r, vals in zip(rows, t.tolist())]
    return [{**r, "tokens_per_s": r["tokens"] / r["step_s"]} for r in rows]


def _distinct_shards(batch, world: int) -> int:
    """How many ranks hold a different first batch (== world size when the data is sharded)."""
    import hashlib

    digest = hashlib.sha256(batch.input_ids.numpy().tobytes()).hexdigest()
    if world == 1:
        return 1
    import torch.distributed as dist

    got = [None] * world
    dist.all_gather_object(got, digest)
    return len(set(got))


def _metric_rows(rows: list[dict], run_id: str) -> list[dict]:
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    return [{"run_id": run_id, "step": r["step"], "loss": r["loss"], "loss_text": r["loss_text"],
             "loss_image": r["loss_image"], "tokens_per_s": r["tokens_per_s"], "lr": r["lr"],
             "grad_norm": r["grad_norm"], "time": now} for r in rows]


def _evaluate(model, cfg: dict, vocab, step: int) -> list[dict]:
    """Toy-world validation on rank 0: eval_results rows (exact image / text / agreement)."""
    from model.sampling import SamplerConfig
    from tasks.common.generate import open_image_tokenizer
    from tasks.common.tokenizer import TextTokenizer
    from tasks.sft.toy_eval import evaluate, to_eval_results
    from tasks.toy.scene import PRESETS

    ev = cfg["eval"]
    val, train = load_set(ev["val_data"]), load_set(cfg["train_data"])
    scenes = load_scenes(ev["scenes"])
    rows = evaluate(_unwrap(model), val, scenes, train, vocab, SequenceConfig(**cfg["seq"]),
                    TextTokenizer.load(cfg["base"]),
                    open_image_tokenizer(cfg.get("image_tokenizer") or os.path.join(cfg["base"], "image_tokenizer")),
                    PRESETS[ev["preset"]], SamplerConfig(**ev["sampler"]), baselines=False)
    return to_eval_results(rows, cfg["run_id"], f"step-{step}", step)


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker: train cfg['sft'] steps on this rank's shard, checkpointing every N steps."""
    import ray.train
    from ray.train import Checkpoint

    from storage.parquet import write_rows

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    sft, seq = SFTConfig(**cfg["sft"]), SequenceConfig(**cfg["seq"])
    torch.manual_seed(sft.seed)
    model, vocab = from_pretrained(cfg["base"])
    holder: dict = {}
    start = _restore(model, holder)
    model = _wrap(model, cfg)
    optimizer = make_optimizer(model, sft)
    if "state" in holder:
        optimizer.load_state_dict(holder["state"])
    device = next(model.parameters()).device
    data = load_set(cfg["train_data"])
    stream = batch_stream(data, vocab, seq, sft.batch_size, sft.seed, rank, world, sft.cond_dropout,
                          start_step=start * sft.grad_accum)
    gen = torch.Generator(device=device)
    forward = model if _is_fsdp(model) else training_module(model, sft)  # FSDP2 runs eager: untested compiled
    stop = min(sft.total_steps, start + cfg.get("max_steps_this_run", sft.total_steps))
    every, pending, t_run = cfg["checkpoint_every"], [], time.perf_counter()
    probe = batch_stream(data, vocab, seq, sft.batch_size, sft.seed, rank, world, sft.cond_dropout, start * sft.grad_accum)
    distinct = _distinct_shards(next(probe), world)
    for step in range(start, stop):
        if step == cfg.get("crash_at_step") and rank == world - 1 and not os.path.exists(cfg["crash_marker"]):
            open(cfg["crash_marker"], "w").close()
            os._exit(1)  # a worker dies abruptly (tests: FailureConfig must bring the run back)
        gen.manual_seed(step_seed(sft.seed, rank, step))
        t0 = time.perf_counter()
        row = train_step(forward, optimizer, [next(stream) for _ in range(sft.grad_accum)], sft, gen, step,
                         vocab.mask_id)
        row.update(step=step + 1, step_s=time.perf_counter() - t0)
        pending.append(row)
        if rank == 0:  # rank 0's own loss: the mean over ranks is reduced only at reporting steps
            write_step(_progress_file(cfg), step + 1, sft.total_steps, loss=row["loss"])
        last = step + 1 == stop
        if (step + 1) % every and not last:
            continue
        pending = _mean_over_ranks(pending, world)
        row = pending[-1]
        metrics = {k: row[k] for k in ("step", "loss", "loss_text", "loss_image", "lr", "grad_norm", "tokens_per_s")}
        metrics["distinct_rank_batches"] = distinct
        evals = []
        if rank == 0 and cfg.get("eval") and (last or (step + 1) % cfg["eval"]["interval"] == 0):
            evals = _evaluate(model, cfg, vocab, step + 1)
            metrics.update({r["metric"]: r["value"] for r in evals if r["suite"] == "toy/model"})
        # under the run's folder, never /tmp: a killed run leaves nothing outside its root
        with tempfile.TemporaryDirectory(dir=_tmp_dir(cfg)) as tmp:
            checkpoint = None
            if rank == 0:
                _save_checkpoint(model, optimizer, step + 1, cfg, vocab, tmp)
                write_rows(cfg["root"], "train_metrics", _metric_rows(pending, cfg["run_id"]), run=cfg["run_id"])
                if evals:
                    write_rows(cfg["root"], "eval_results", evals, run=cfg["run_id"])
                checkpoint = Checkpoint.from_directory(tmp)
            elif _is_fsdp(model):
                _full_state_dict(model)  # every rank takes part in the gather
            ray.train.report({**metrics, "train_s": time.perf_counter() - t_run}, checkpoint=checkpoint)
        pending = []


def _tmp_dir(cfg: dict) -> str | None:
    """{out}/tmp (or {root}/tmp): where a rank writes a checkpoint before Ray copies it to storage."""
    base = cfg.get("out") or cfg["root"]
    if "://" in base:  # an object-store run has no local folder: the system's temporary folder it is
        return None
    folder = os.path.join(base, "tmp")
    os.makedirs(folder, exist_ok=True)
    return folder


def _progress_file(cfg: dict) -> str:
    return os.path.join(cfg["out"], "checkpoints", cfg["run_id"], "progress.json")


@task
def run_sft(cfg: dict, num_workers: int = 2, use_gpu: bool = False, storage_path: str = "runs/ray",
            max_failures: int = 2, cpus_per_worker: int = 1) -> dict:
    """Builds the TorchTrainer and fits; re-running with the same cfg['run_id'] resumes.
    cpus_per_worker (CPU runs): cores a worker reserves and the torch threads it computes with."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray(None if use_gpu else max(num_workers * cpus_per_worker, os.cpu_count() or 1), include_dashboard=True)
    storage = os.path.abspath(storage_path) if "://" not in storage_path else storage_path
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={**cfg, "threads": 0 if use_gpu else cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=cfg["run_id"], storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    t0 = time.perf_counter()
    os.makedirs(os.path.dirname(_progress_file(cfg)), exist_ok=True)
    done = follow_steps(_progress_file(cfg), f"SFT {cfg['run_id']}", cfg["sft"]["total_steps"])
    try:
        result = trainer.fit()
    finally:
        done()
    if result.error:
        raise RuntimeError(f"SFT run {cfg['run_id']} failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        final = os.path.join(cfg["out"], "checkpoints", cfg["run_id"], "final")
        if os.path.isdir(final):
            shutil.rmtree(final)
        shutil.copytree(d, final)
    return {"checkpoint": final, "metrics": result.metrics, "fit_s": time.perf_counter() - t0}


@task
def prepare_sft(root: str, dataset: str, out: str, recipe: dict, init_from: str | None = None,
                image_tokenizer_dir: str | None = None, eval_per_category: int = 16) -> dict:
    """Tokenises the train split (cached by content hash) and the val split, and writes the base
    checkpoint folder the workers start from: `init_from` as it is, or a random model of recipe['model']
    with a tiny tokenizer trained on the dataset's text. Returns the paths for train_loop_per_worker,
    the train split's drops per reason ('dropped') and the val split's ('val_dropped')."""
    from model.tokens import tiny_vocab
    from model.transformer import DiffusionLM, ModelConfig
    from tasks.common.generate import GRID_KEY, open_image_tokenizer
    from model.tokens import LUMINA_TEXT_VOCAB_SIZE
    from tasks.sft.sft_data import dimoo_prompt_ids, load_or_tokenise, pick_traces, read_samples
    from tasks.common.tokenizer import TextTokenizer, build_tiny_tokenizer
    from tasks.sft.toy_eval import select_per_category

    seq, sft = SequenceConfig(**recipe["seq"]), SFTConfig(**recipe["sft"])
    select = dict(categories=_tuple(recipe.get("categories")), kinds=_tuple(recipe.get("kinds")))
    rows, traces = read_samples(root, dataset, "train", traces_run=dataset, **select)
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    vq_dir = image_tokenizer_dir or (os.path.join(init_from, "image_tokenizer") if init_from else None)
    if not vq_dir or not os.path.isdir(vq_dir):
        raise ValueError(f"no image tokenizer folder ({vq_dir!r}); set the recipe's image_tokenizer to a folder "
                         f"(MMaDA-Parallel-M: --image-tokenizer /path/to/magvitv2) or 'fit'")
    if os.path.isdir(os.path.join(vq_dir, "vqvae")):  # a released A folder: only its VQ travels with checkpoints
        vq_dir = os.path.join(vq_dir, "vqvae")
    vq = open_image_tokenizer(vq_dir)
    if init_from:
        base, tok = init_from, TextTokenizer.load(init_from)
        vocab = read_config(init_from)[1]
        if vocab.codebook_size == 0:  # a text-only base (plain LLaDA): grow it by the codebook, as MMaDA did
            base = _grow_text_only(init_from, vq, os.path.join(out, "base"), sft.seed)
            vocab = read_config(base)[1]
        if vocab.codebook_size != vq.codebook_size:
            raise ValueError(f"{init_from!r} has {vocab.codebook_size} image code rows but the image tokenizer "
                             f"{vq_dir!r} has {vq.codebook_size} codes; use the tokenizer the model was trained with")
    else:
        corpus = [r["instruction"] for r in rows] + [t for t in pick_traces(rows, traces) if t]
        tok = build_tiny_tokenizer(corpus, vocab_size=recipe.get("tokenizer_vocab", 512))
        vocab = tiny_vocab(len(tok), vq.codebook_size)
        pos = dict(image_pos_grid=tuple(vq.grid), soi_id=vocab.soi_id) if recipe.get("image_positions") else {}
        mcfg = ModelConfig(**recipe["model"], vocab_size=vocab.vocab_size, embedding_size=vocab.vocab_size, **pos)
        base = os.path.join(out, "base")
        save_pretrained(DiffusionLM(mcfg).init_weights(sft.seed), vocab, base, extra={GRID_KEY: list(vq.grid)})
        tok.save(base)
        shutil.copytree(vq_dir, os.path.join(base, "image_tokenizer"), dirs_exist_ok=True)
    seq = dataclasses.replace(seq, image_grid=tuple(vq.grid))
    if vocab.image_offset == LUMINA_TEXT_VOCAB_SIZE:  # MMaDA-Parallel-A / Lumina-DiMOO: its own layout
        seq = dataclasses.replace(seq, layout="dimoo", prompt_ids=dimoo_prompt_ids(tok), instruction_tokens=0)
    cache = os.path.join(root, "cache", "sft")
    train = load_or_tokenise(rows, tok, vq, vocab, seq, cache, traces)
    paths = {"base": base, "image_tokenizer": vq_dir, "seq": dataclasses.asdict(seq), "train_data": save_set(train, os.path.join(data_dir, "train.pt")),
             "train_size": len(train), "dropped": train.dropped, "from_cache": train.from_cache}
    try:
        val_rows, val_traces = read_samples(root, dataset, "val", traces_run=dataset, **select)
    except ValueError:  # a small dataset may have no val split: nothing to evaluate during training
        return paths
    val_all = load_or_tokenise(val_rows, tok, vq, vocab, seq, cache, val_traces)
    paths["val_dropped"] = val_all.dropped
    if all('"toy"' in (r.get("extra_json") or "") for r in val_rows):
        val = select_per_category(val_all, eval_per_category)
        scenes = save_scenes([r for r in val_rows if r["sample_id"] in set(val.sample_id)],
                             os.path.join(data_dir, "val_scenes.json"))
        paths.update(preset=json.loads(val_rows[0]["extra_json"])["toy"]["preset"],
                     val_data=save_set(val, os.path.join(data_dir, "val.pt")),
                     scenes=scenes, val_size=len(val))
    return paths


def _grow_text_only(init_from: str, vq, base: str, seed: int) -> str:
    """A copy of a text-only checkpoint with vq.codebook_size new image rows (embedding and head)."""
    from model.checkpoint import add_image_codebook
    from tasks.common.generate import GRID_KEY

    model, vocab = from_pretrained(init_from)
    vocab = add_image_codebook(model, vocab, vq.codebook_size, seed)
    save_pretrained(model, vocab, base, extra={GRID_KEY: list(vq.grid)})
    for name in os.listdir(init_from):  # the text tokenizer files travel with the weights
        if name.startswith(("tokenizer", "special_tokens_map")):
            shutil.copy(os.path.join(init_from, name), os.path.join(base, name))
    return base


def _tuple(v) -> tuple | None:
    return tuple(v) if v else None


@task
def evaluate_checkpoint(checkpoint: str, root: str, dataset: str, run_id: str, split: str = "test",
                        per_category: int = 32, sampler: dict | None = None, seq: dict | None = None,
                        categories: list[str] | None = None) -> dict:
    """Scores a checkpoint on held-out toy tasks next to the copy-input and most-common-output
    baselines; writes eval_results and a table artifact. Returns {metric: {category: {method: value}}}."""
    from prefect.artifacts import create_table_artifact

    from model.sampling import SamplerConfig
    from storage.parquet import write_rows
    from tasks.common.generate import load_image_tokenizer
    from tasks.common.tokenizer import TextTokenizer
    from tasks.sft.sft_data import load_or_tokenise, read_samples
    from tasks.sft.toy_eval import METRICS, evaluate, select_per_category, table, to_eval_results, toy_scenes
    from tasks.toy.scene import PRESETS

    model, vocab = from_pretrained(checkpoint)
    tok, vq = TextTokenizer.load(checkpoint), load_image_tokenizer(checkpoint)
    seq_cfg = SequenceConfig(**(seq or {}))
    cache = os.path.join(root, "cache", "sft")
    rows, traces = read_samples(root, dataset, split, traces_run=dataset,
                                categories=tuple(categories) if categories else None)
    data = select_per_category(load_or_tokenise(rows, tok, vq, vocab, seq_cfg, cache, traces), per_category)
    train_rows, train_traces = read_samples(root, dataset, "train", traces_run=dataset,
                                            categories=tuple(categories) if categories else None)
    train = load_or_tokenise(train_rows, tok, vq, vocab, seq_cfg, cache, train_traces)
    scenes = toy_scenes([r for r in rows if r["sample_id"] in set(data.sample_id)])
    preset = PRESETS[json.loads(rows[0]["extra_json"])["toy"]["preset"]]
    results = evaluate(model, data, scenes, train, vocab, seq_cfg, tok, vq, preset, SamplerConfig(**(sampler or {})))
    write_rows(root, "eval_results", to_eval_results(results, run_id, checkpoint, None, suite=f"toy-{split}"),
               run=run_id)
    tables = {m: table(results, m) for m in METRICS}
    create_table_artifact([{"category": c, **{f"{m}/{meth}": round(v, 3) for m in METRICS
                                               for meth, v in tables[m].get(c, {}).items()}}
                           for c in sorted(tables["exact_image"])],
                          key=f"sft-eval-{''.join(ch if ch.isalnum() else '-' for ch in run_id.lower())}",
                          description=f"{checkpoint} on {dataset}/{split}")
    return tables
