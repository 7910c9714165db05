"""Ray Train overhead for SFT: tokens/s per worker under Ray (2 gloo DDP workers, 1 CPU each) vs a
plain single-process loop with 1 thread, on the same model, data and batch size, in one run.

    python benchmarks/sft.py [--steps 40] [--batch-size 32] [--samples 2000]

Medians over the steps after the first --warmup steps (Ray's start-up and the first steps are
reported separately and not in the ratio).
"""
import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2000)
    a = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    import tasks.aggregate as agg
    from flows.sft import default_recipe
    from model.checkpoint import from_pretrained
    from storage.parquet import read_table
    from tasks.image_codes import fit_image_tokenizer
    from tasks.sft import load_set, prepare_sft, run_sft
    from tasks.sft_data import SequenceConfig, batch_stream
    from tasks.sft_loop import SFTConfig, train

    work = tempfile.mkdtemp(prefix="parapipe-sft-bench-")
    root, out = os.path.join(work, "lake"), os.path.join(work, "out")
    agg.ingest_source.fn({"type": "toy", "name": "toy", "preset": "tiny", "n": a.samples, "seed": 0}, root, "d",
                         dict(resolution=32))
    recipe = default_recipe()
    recipe["sft"] = {**recipe["sft"], "total_steps": a.steps, "warmup_steps": a.steps // 5, "batch_size": a.batch_size, "eval_interval": 0,
                     "log_interval": 0}
    paths = prepare_sft.fn(root, "d", out, recipe, image_tokenizer_dir=fit_image_tokenizer.fn(root, "d", work + "/vq"))
    sft, seq = SFTConfig(**recipe["sft"]), SequenceConfig(**recipe["seq"])

    torch.set_num_threads(1)
    model, vocab = from_pretrained(paths["base"])
    stream = batch_stream(load_set(paths["train_data"]), vocab, seq, sft.batch_size, sft.seed)
    history = train(model, stream, sft, vocab.mask_id)
    plain = statistics.median(r["tokens_per_s"] for r in history[a.warmup:])
    print(f"model {model.num_params() / 1e6:.2f}M params, batch {a.batch_size}, {a.steps} steps, bf16={sft.bf16}")
    print(f"plain loop, 1 process x 1 thread : {plain:9.0f} tokens/s")

    cfg = {"base": paths["base"], "train_data": paths["train_data"], "seq": recipe["seq"], "sft": recipe["sft"],
           "root": root, "run_id": "bench", "out": out, "checkpoint_every": a.steps}
    t0 = time.perf_counter()
    fit = run_sft.fn(cfg, num_workers=2, storage_path=os.path.join(out, "ray"))
    rows = read_table(root, "train_metrics", run="bench").to_pylist()
    per_worker = statistics.median(r["tokens_per_s"] for r in rows if r["step"] > a.warmup) / 2
    print(f"Ray Train, 2 workers x 1 CPU     : {per_worker:9.0f} tokens/s per worker "
          f"({2 * per_worker:.0f} in total; fit incl. start-up {fit['fit_s']:.1f} s, wall {time.perf_counter() - t0:.1f} s)")
    print(f"per-worker / plain = {per_worker / plain:.3f} (overhead {100 * (1 - per_worker / plain):+.1f}%)")


if __name__ == "__main__":
    main()
