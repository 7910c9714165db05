"""PatchVQ: exact round trips on toy images, hand-computed codebooks, save / load, shapes and errors."""
import random

import numpy as np
import pytest
import torch

from model import image_tokenizer
from model.image_tokenizer import CONFIG_FILE, WEIGHTS_FILE, ImageTokenizer, PatchVQ, nearest_code, patchify, unpatchify
from tasks.toy import PRESETS, render
from tasks.toy.scene import random_scene


def _toy_images(preset, n, seed):
    rng = random.Random(seed)
    return torch.from_numpy(np.stack([render(random_scene(rng, preset), preset) for _ in range(n)]))


@pytest.mark.parametrize("name, codebook_size, distinct", [("tiny", 16, 13), ("standard", 256, 193)])
def test_exact_round_trip_on_unseen_toy_images(name, codebook_size, distinct):
    preset = PRESETS[name]
    vq = PatchVQ.fit(_toy_images(preset, 600, seed=0), preset.token_px, codebook_size, seed=0)
    assert (vq.codebook_size, vq.grid, vq.image_size) == (codebook_size, (preset.tokens,) * 2, (preset.image_size,) * 2)
    images = _toy_images(preset, 300, seed=1)
    codes = vq.encode(images)
    assert codes.shape == (300, preset.tokens, preset.tokens) and codes.dtype == torch.long
    assert torch.equal(vq.decode(codes), images)
    assert len(codes.unique()) == distinct and codes.max() < distinct  # spare slots are never chosen
    assert isinstance(vq, ImageTokenizer)


def test_fit_hand_example_sorted_patches_then_most_frequent_spares():
    a, b = torch.full((2, 2, 3), 7, dtype=torch.uint8), torch.full((2, 2, 3), 200, dtype=torch.uint8)
    image = torch.cat([torch.cat([b, a], 1), torch.cat([b, b], 1)], 0)  # 4x4: patches b a / b b
    vq = PatchVQ.fit(image[None], patch_size=2, codebook_size=4)
    assert torch.equal(vq.codebook, torch.tensor([[7.0] * 12, [200.0] * 12, [200.0] * 12, [200.0] * 12]))
    assert vq.encode(image).tolist() == [[1, 0], [1, 1]]
    assert torch.equal(vq.decode(torch.tensor([[3, 0], [2, 1]])), image)


def test_nearest_code_is_exact_and_breaks_ties_low():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 0.0], [0.0, 4.0]])
    x = torch.tensor([[1.0, 0.0], [9.0, 0.0], [5.0, 0.0], [0.0, 2.0], [0.0, 3.0]])
    assert nearest_code(x, codebook).tolist() == [0, 1, 0, 0, 3]
    big = torch.randint(0, 256, (3000, 192), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    assert nearest_code(big, big.float()).tolist() == list(range(3000))  # distance 0 is found exactly


def test_nearest_code_chunks_agree(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x, codebook = torch.rand(1000, 12, generator=gen) * 255, torch.rand(50, 12, generator=gen) * 255
    whole = nearest_code(x, codebook)
    monkeypatch.setattr(image_tokenizer, "MAX_DISTANCE_ELEMENTS", 50 * 7)  # chunks of 7 rows
    assert torch.equal(nearest_code(x, codebook), whole)


def test_patchify_round_trip_and_order():
    images = torch.arange(2 * 4 * 6 * 3, dtype=torch.int64).reshape(2, 4, 6, 3).to(torch.uint8)
    patches = patchify(images, 2)
    assert patches.shape == (2, 2, 3, 12)
    assert patches[0, 0, 1].tolist() == images[0, :2, 2:4].reshape(-1).tolist()
    assert torch.equal(unpatchify(patches, 2), images)


def test_lossy_fit_is_seeded_and_lloyd_lowers_the_error():
    preset = PRESETS["standard"]
    images = _toy_images(preset, 200, seed=2)
    mse = {}
    for iters in (0, 8):
        vq = PatchVQ.fit(images, preset.token_px, 32, seed=3, iters=iters)
        assert torch.equal(vq.codebook, PatchVQ.fit(images, preset.token_px, 32, seed=3, iters=iters).codebook)
        mse[iters] = (vq.decode(vq.encode(images)).float() - images.float()).pow(2).mean().item()
    assert vq.codebook_size == 32 and 0 < mse[8] < mse[0]


def test_single_image_shapes():
    preset = PRESETS["tiny"]
    images = _toy_images(preset, 20, seed=4)
    vq = PatchVQ.fit(images, 8, 16)
    codes = vq.encode(images[0])
    assert codes.shape == (4, 4) and torch.equal(codes, vq.encode(images)[0])
    assert vq.decode(codes).shape == (32, 32, 3) and torch.equal(vq.decode(codes), images[0])


def test_save_load_round_trip(tmp_path):
    preset = PRESETS["tiny"]
    images = _toy_images(preset, 50, seed=5)
    vq = PatchVQ.fit(images, 8, 16)
    assert vq.save(tmp_path / "tok") == tmp_path / "tok"
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = PatchVQ.load(tmp_path / "tok")
    assert torch.equal(loaded.codebook, vq.codebook)
    assert (loaded.patch_size, loaded.image_size, loaded.grid) == (8, (32, 32), (4, 4))
    assert torch.equal(loaded.encode(images), vq.encode(images))


def test_errors_name_the_value_and_the_fix(tmp_path):
    vq = PatchVQ.fit(_toy_images(PRESETS["tiny"], 10, seed=6), 8, 16)
    with pytest.raises(ValueError, match="takes 32x32 .* got 64x64; resize"):
        vq.encode(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 torch tensor, got torch.float32"):
        vq.encode(torch.zeros(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"codes span \[0, 16\] .* valid codes are 0..15"):
        vq.decode(torch.tensor([[[0, 1, 2, 16]] * 4]))
    with pytest.raises(ValueError, match=r"shape \(B, 4, 4\) .* got \(1, 2, 8\)"):
        vq.decode(torch.zeros(1, 2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="patch_size=5 must divide the image size 32x32"):
        PatchVQ.fit(torch.zeros(1, 32, 32, 3, dtype=torch.uint8), 5, 4)
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_FILE} not found; write it with PatchVQ.fit"):
        PatchVQ.load(tmp_path / "missing")
