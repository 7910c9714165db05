"""Beyond the toy world, as a new user: a JSONL set of photos of any size -> aggregate -> `parapipe sft` with
a MAGVIT-v2 image tokenizer (tiny random weights in the released folder format) -> `parapipe generate` on a
480x640 photo. Also: the recipe is chosen by the data, drops are reported per reason, bad recipes fail early."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from flows.cli import main
from model.magvit2 import MagvitV2, MagvitV2Config, save_magvit2

pytestmark = pytest.mark.slow
TINY_MAGVIT = dict(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=(1, 1, 1, 1, 1), decoder_ch_mult=(1, 1, 2, 2, 2),
                   decoder_num_res_blocks=(1, 1, 1, 1, 1), resolution=64, image_size=64, z_channels=6)
SIZES = [(480, 640), (300, 200), (256, 256), (640, 480), (123, 77), (512, 384)]
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 40), "yellow": (220, 200, 40)}


def _photo(h: int, w: int, rng) -> Image.Image:
    """Smooth random low-frequency content plus sensor noise: photo-like statistics at any size, and
    distinct enough per image that aggregation's near-duplicate check keeps them all."""
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def _dataset(folder: str, n: int = 40) -> str:
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    with open(os.path.join(folder, "manifest.jsonl"), "w") as f:
        for i in range(n):
            h, w = SIZES[i % len(SIZES)]
            src, dst = names[i % 4], names[(i + 1 + i // 4) % 4]
            a = _photo(h, w, rng)
            box = [w // 4 + i % 7, h // 4, w // 2 + i % 5, h // 2]
            ImageDraw.Draw(a).ellipse(box, fill=COLOURS[src])
            b = a.copy()
            ImageDraw.Draw(b).ellipse(box, fill=COLOURS[dst])
            a.save(os.path.join(folder, f"in{i}.jpg"))
            b.save(os.path.join(folder, f"out{i}.png"))
            trace = f"the ball is {src}. the instruction asks for {dst}. result: a {dst} ball in the same place."
            if i % 10 == 9:  # a trace too long for the recipe: dropped and counted, never silently
                trace = " ".join([trace] * 6)
            f.write(json.dumps({"input_image": f"in{i}.jpg", "output_image": f"out{i}.png",
                                "instruction": f"make the {src} ball {dst}", "trace": trace}) + "\n")
    sources = os.path.join(folder, "sources.json")
    with open(sources, "w") as f:
        json.dump([{"type": "jsonl", "name": "photos", "path": folder}], f)
    return sources


def _random_clip(tmp_path) -> str:
    import open_clip

    from rl.reward import TINY_CLIP_CONFIG, register_tiny_clip, save_clip_folder

    name = register_tiny_clip(str(tmp_path / "clip-config"))
    torch.manual_seed(0)
    return save_clip_folder(str(tmp_path / "clip"), open_clip.create_model(name), name, TINY_CLIP_CONFIG)


def test_photos_through_magvit2_sft_and_generate(tmp_path, prefect_harness, capsys):
    import ray

    photos = tmp_path / "photos"
    photos.mkdir()
    sources = _dataset(str(photos))
    root, out = str(tmp_path / "lake"), str(tmp_path / "out")
    torch.manual_seed(0)
    magvit = str(save_magvit2(MagvitV2(MagvitV2Config(**TINY_MAGVIT)), tmp_path / "magvit"))
    clip = _random_clip(tmp_path)
    main(["aggregate", "--sources", sources, "--root", root, "--dataset", "mine", "--resolution", "64"])
    capsys.readouterr()
    # a mistake fails before any training, naming the value and the fix
    with pytest.raises(ValueError, match="cannot feed 99 workers; pass --workers"):
        main(["sft", "--root", root, "--dataset", "mine", "--out", out, "--image-tokenizer", magvit, "--workers", "99"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        # the small preset's batch of 64 does not fit 33 sequences: trained with all of them, said aloud
        main(["sft", "--json", "--root", root, "--dataset", "mine", "--out", out, "--steps", "3", "--workers", "1",
              "--image-tokenizer", magvit, "--sft.bf16", "false",
              "--seq.text_tokens", "48", "--seq.instruction_tokens", "12", "--sampler.steps", "8",
              "--sampler.image_steps", "4", "--sampler.text_block_length", "48", "--eval-per-category", "4",
              "--eval-clip", json.dumps({"clip_folder": clip})])
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index('{\n  "checkpoint"'):])
    assert summary["dropped"]["trace_too_long"] >= 1 and summary["train_size"] > 20
    assert summary["batch_size"] == summary["train_size"]
    held = summary["heldout"]  # 40 rows: the hash split leaves a few val / test rows
    assert held["split"] in ("test", "val") and held["samples"] >= 1 and held["masked_image"] > 0
    assert (held["device"], held["dtype"]) == ("cpu", "float32")  # a CPU run (--gpu evaluates on cuda, bf16)
    # a barely trained model: image codes near the uniform log(64), text far from it but finite
    assert 0.5 * math.log(64) < held["loss_image"] < 2 * math.log(64) and 0 < held["loss_text"] < 20
    assert -1 <= held["clip_alignment"] <= 1 and held["clip_pairs"] == held["samples"]
    ckpt = os.path.join(out, "checkpoints", "sft-mine", "final")
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    assert cfg["parapipe_sequence"] == {"text_tokens": 48, "instruction_tokens": 12, "layout": "mmada",
                                        "image_grid": [4, 4], "prompt_ids": None}
    assert json.load(open(os.path.join(ckpt, "image_tokenizer", "config.json")))["_class_name"] == "MAGVITv2"
    # the generic recipe trained every row (no toy category filter) except the too-long traces
    train = torch.load(os.path.join(out, "data", "train.pt"), weights_only=True)
    assert len(train["sample_id"]) == summary["train_size"]
    assert set(train["category"]) == {"other"}
    assert all(len(codes) == 16 for codes in train["input_codes"])  # 64 x 64 -> 4 x 4 MAGVIT-v2 codes
    # generate from the new checkpoint on a photo of another size: resized as aggregation does
    big = tmp_path / "big.jpg"
    _photo(480, 640, np.random.default_rng(1)).save(big)
    gen = str(tmp_path / "gen")
    main(["generate", "--checkpoint", ckpt, "--prompt", "make the red ball blue", "--image", str(big), "--out", gen,
          "--steps", "8", "--image-steps", "4"])
    assert Image.open(os.path.join(gen, "image.png")).size == (64, 64)
    assert os.path.getsize(os.path.join(gen, "text.txt")) > 0
