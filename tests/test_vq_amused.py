"""AmusedVQ (A-variant image tokenizer): loading the released folder format, encode = nearest codebook
entry of the encoder latent, decode = codebook lookup -> decoder, resizing, released parameter names.

A tiny random VQModel with the released structure (5 blocks -> x16, lookup_from_codebook) but small
channels stands in for the real weights. Skipped when diffusers is not installed.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusers  # noqa: F401,E402  (pinned in requirements/cpu.txt: a missing install fails here, never skips)

from model.image_tokenizer import ImageTokenizer  # noqa: E402
from model.vq_amused import (AMUSED_VQ_CONFIG, CONFIG_FILE, WEIGHTS_FILE, AmusedVQ, best_crop_size,  # noqa: E402
                             build_vqmodel, crop_sizes, fit_image, to_pixels, to_uint8)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(AMUSED_VQ_CONFIG, block_out_channels=[8, 8, 16, 16, 16], latent_channels=4, norm_num_groups=4,
            num_vq_embeddings=512)
SIZE = (64, 48)  # grid 4 x 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint folder in the released layout: <ckpt>/vqvae/{config.json, diffusion_pytorch_model.safetensors}."""
    torch.manual_seed(0)
    model = build_vqmodel(TINY)
    with torch.no_grad():  # distinct, well separated codes (the default init is near zero)
        model.quantize.embedding.weight.copy_(torch.randn(512, 4))
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(str(root / "vqvae"))
    return root


@pytest.fixture(scope="module")
def vq(ckpt) -> AmusedVQ:
    return AmusedVQ.load(ckpt, image_size=SIZE)


def _images(n, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *size, 3), dtype=torch.uint8, generator=g)


def test_loads_checkpoint_or_vqvae_folder_with_protocol_fields(ckpt, vq):
    assert sorted(p.name for p in (ckpt / "vqvae").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    again = AmusedVQ.load(ckpt / "vqvae", image_size=SIZE)
    for (k, a), (k2, b) in zip(vq.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert isinstance(vq, ImageTokenizer)
    assert (vq.factor, vq.codebook_size, vq.grid, vq.image_size) == (16, 512, (4, 3), (64, 48))
    assert not vq.model.training and not any(p.requires_grad for p in vq.model.parameters())


def test_encode_is_nearest_codebook_entry_of_the_encoder_latent(vq):
    images = _images(3)
    codes = vq.encode(images)
    assert codes.shape == (3, 4, 3) and codes.dtype == torch.long
    m = vq.model
    with torch.no_grad():
        z = m.quant_conv(m.encoder(images.permute(0, 3, 1, 2).float() / 255))  # (B, C, h, w)
    z = z.permute(0, 2, 3, 1).double()  # (B, h, w, C)
    E = m.quantize.embedding.weight.double()  # (K, C)
    d = ((z[..., None, :] - E) ** 2).sum(-1)  # (B, h, w, K)
    chosen = d.gather(-1, codes[..., None]).squeeze(-1)
    assert torch.allclose(chosen, d.min(-1).values, rtol=1e-5, atol=1e-6)
    assert (codes == d.argmin(-1)).float().mean() > 0.9  # exact match up to float32 near-ties
    assert len(codes.unique()) > 1
    assert torch.equal(vq.encode(images[0]), codes[0])  # single image -> (h, w)


def test_decode_looks_up_codebook_entries_then_runs_the_decoder(vq):
    m = vq.model
    codes = torch.randint(0, 512, (2, 4, 3), generator=torch.Generator().manual_seed(1))
    E = m.quantize.embedding.weight
    lookup = E[codes].permute(0, 3, 1, 2)  # (B, C, h, w)
    assert torch.equal(m.quantize.get_codebook_entry(codes, (2, 4, 3, 4)), lookup)
    with torch.no_grad():
        expected = to_uint8(m.decoder(m.post_quant_conv(lookup)).clamp(0, 1))
        # codebook entries quantise to themselves: encode's and decode's index spaces agree
        assert torch.equal(m.quantize(lookup)[2][2].reshape(2, 4, 3), codes)
    out = vq.decode(codes)
    assert out.shape == (2, 64, 48, 3) and out.dtype == torch.uint8
    assert (out.int() - expected.int()).abs().max() <= 1
    changed = codes.clone()
    changed[0, 0, 0] = (changed[0, 0, 0] + 1) % 512
    assert not torch.equal(vq.decode(changed)[0], out[0]) and torch.equal(vq.decode(changed)[1], out[1])
    assert vq.decode(codes[0]).shape == (64, 48, 3)
    assert vq.decode(codes[:, :2, :2]).shape == (2, 32, 32, 3)  # any grid decodes


def test_pixel_conversions_match_vae_image_processor():
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    proc = VaeImageProcessor(vae_scale_factor=16, do_normalize=False)
    images = _images(2)
    ref = proc.preprocess([Image.fromarray(im.numpy()) for im in images])
    assert torch.equal(to_pixels(images), ref)
    x = torch.rand(2, 3, 64, 48) * 1.2 - 0.1
    pil = proc.postprocess(x.clip(0, 1), output_type="pil")
    assert torch.equal(to_uint8(x), torch.from_numpy(np.stack([np.array(p) for p in pil])))


@pytest.mark.parametrize("size", [(37, 91), (200, 20), (64, 48), (16, 16), (640, 480)])
def test_any_input_size_encodes_to_the_configured_grid(vq, size):
    assert vq.encode(_images(2, size)).shape == (2, 4, 3)


def test_fit_image_covers_then_centre_crops():
    wide = torch.arange(128, dtype=torch.uint8).repeat(32, 1)[None, :, :, None].expand(1, 32, 128, 3)
    assert torch.equal(fit_image(wide, (32, 32)), wide[:, :, 48:80])  # no rescale needed: pure centre crop
    flat = torch.full((2, 100, 60, 3), 77, dtype=torch.uint8)
    out = fit_image(flat, (32, 16))  # scale 0.32 -> 32 x 19, crop 3 columns
    assert out.shape == (2, 32, 16, 3) and (out == 77).all()
    same = _images(1)
    assert fit_image(same, SIZE) is same


def test_crop_sizes_and_best_crop_size_follow_upstream():
    sizes = crop_sizes()
    assert all(h % 32 == 0 and w % 32 == 0 and (h // 32) * (w // 32) <= 256 for h, w in sizes)
    assert all(max(h, w) / min(h, w) <= 4 for h, w in sizes)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes
    assert best_crop_size(1000, 1000) == (512, 512)
    assert best_crop_size(300, 1200) == (256, 1024)  # 1:4 -> 8 x 32 patches
    assert best_crop_size(1200, 300) == (1024, 256)


def test_errors_name_the_path_and_the_fix(tmp_path, ckpt, vq):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        AmusedVQ.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"vqvae/config\.json"):
        AmusedVQ.load(tmp_path)
    (tmp_path / "vqvae").mkdir()
    (tmp_path / "vqvae" / CONFIG_FILE).write_text((ckpt / "vqvae" / CONFIG_FILE).read_text())
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        AmusedVQ.load(tmp_path)
    with pytest.raises(ValueError, match="multiples of the downsample factor 16"):
        AmusedVQ(vq.model, image_size=(64, 40))
    with pytest.raises(ValueError, match="lookup_from_codebook"):
        AmusedVQ(build_vqmodel(dict(TINY, lookup_from_codebook=False)), image_size=SIZE)
    with pytest.raises(ValueError, match="offset"):
        vq.decode(torch.tensor([[[512, 0, 0]] * 4]))
    with pytest.raises(ValueError, match="integer"):
        vq.decode(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="uint8"):
        vq.encode(torch.zeros(1, 64, 48, 3))


def _released_key_names() -> set[str]:
    """The keys diffusers' scripts/convert_amused.py (make_vqvae) writes for the aMUSEd VQ-GAN."""
    conv = ("weight", "bias")
    resnet = [f"{n}.{p}" for n in ("norm1", "conv1", "norm2", "conv2") for p in conv]
    keys = {f"{m}.{p}" for m in ("encoder.conv_in", "encoder.conv_norm_out", "encoder.conv_out", "quant_conv",
                                 "post_quant_conv", "decoder.conv_in", "decoder.conv_norm_out", "decoder.conv_out")
            for p in conv}
    keys.add("quantize.embedding.weight")
    for side in ("encoder", "decoder"):
        keys |= {f"{side}.mid_block.resnets.{r}.{k}" for r in (0, 1) for k in resnet}
    for i in range(5):  # encoder.down.i -> down_blocks.i: 2 resnets, downsample except last
        keys |= {f"encoder.down_blocks.{i}.resnets.{r}.{k}" for r in (0, 1) for k in resnet}
        if i < 4:
            keys |= {f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}" for p in conv}
    for i in (1, 3, 4):  # 128->256, 256->512, 512->768 need a 1x1 shortcut
        keys |= {f"encoder.down_blocks.{i}.resnets.0.conv_shortcut.{p}" for p in conv}
    for j in range(5):  # decoder.up.(4-j) -> up_blocks.j: 3 resnets, upsample except last
        keys |= {f"decoder.up_blocks.{j}.resnets.{r}.{k}" for r in (0, 1, 2) for k in resnet}
        if j < 4:
            keys |= {f"decoder.up_blocks.{j}.upsamplers.0.conv.{p}" for p in conv}
    for j in (1, 2, 4):  # 768->512, 512->256, 256->128
        keys |= {f"decoder.up_blocks.{j}.resnets.0.conv_shortcut.{p}" for p in conv}
    return keys


def test_released_config_builds_the_released_parameter_names_on_meta():
    with torch.device("meta"):
        model = build_vqmodel()
    sd = model.state_dict()
    assert set(sd) == _released_key_names() and len(sd) == 277
    assert sd["quantize.embedding.weight"].shape == (8192, 64) and sd["quantize.embedding.weight"].is_meta
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert sd["encoder.conv_out.weight"].shape == (64, 768, 3, 3)
    assert 2 ** (len(model.config.block_out_channels) - 1) == 16


def test_module_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import model.vq_amused as v\n"
            "try:\n    v.build_vqmodel()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "pip install diffusers==" in out.stdout
