"""MAGVIT-v2 tokenizer: LFQ bit order, released parameter names (from upstream source), grids, save / load, errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model.image_tokenizer import ImageTokenizer
from model.magvit2 import (MagvitV2, MagvitV2Config, lfq_codes, lfq_embed, load_magvit2, save_magvit2)

# x16 like the release (5 levels), 32 channels, one block per level, attention at levels 2 (encoder and decoder).
TINY = dict(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=(1, 1, 1, 1, 1), decoder_ch_mult=(1, 1, 2, 2, 2),
            decoder_num_res_blocks=(1, 1, 1, 1, 1), attn_resolutions=(16,), resolution=64, image_size=64)


def _tiny(seed=0, **overrides) -> MagvitV2:
    torch.manual_seed(seed)
    return MagvitV2(MagvitV2Config(**{**TINY, **overrides})).eval()


def _photo(h=480, w=640, seed=0) -> Image.Image:
    """Smooth colour gradients, a sharp-edged rectangle and sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([200 * xx + 30 * np.sin(12 * yy), 180 * yy + 40 * np.cos(9 * xx),
                    120 + 60 * np.sin(5 * (xx + yy))], -1)
    img[h // 3:h // 3 * 2, w // 3:w // 2] = [230, 40, 60]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image))  # (H, W, 3) uint8


# ---------------------------------------------------------------------------------------------------- LFQ

def test_lfq_round_trip_over_all_8192_codes():
    codes = torch.arange(8192)
    emb = lfq_embed(codes, 13)  # (8192, 13)
    assert emb.shape == (8192, 13) and set(emb.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(lfq_codes(emb), codes)
    assert len({tuple(r) for r in emb.tolist()}) == 8192  # a bijection
    grid = torch.randint(0, 8192, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    z = lfq_embed(grid)  # (2, 13, 32, 32)
    assert z.shape == (2, 13, 32, 32) and torch.equal(lfq_codes(z), grid)


def test_lfq_bits_are_msb_first_by_hand():
    assert lfq_embed(torch.tensor([1])).tolist() == [[-1.0] * 12 + [1.0]]
    assert lfq_embed(torch.tensor([4096])).tolist() == [[1.0] + [-1.0] * 12]
    assert lfq_embed(torch.tensor([5])).tolist() == [[-1.0] * 10 + [1.0, -1.0, 1.0]]  # 0b101
    assert lfq_embed(torch.tensor([8191])).tolist() == [[1.0] * 13]
    # channel 0 -> 2^12, channel 3 -> 2^9, channel 12 -> 2^0; zero counts as a 0 bit (z > 0, as upstream)
    z = torch.tensor([0.5, -1, 0, 2, -0.1, 0, 0, 0, 0, 0, 0, 0, 1e-3]).view(1, 13, 1, 1)
    assert lfq_codes(z).tolist() == [[[4096 + 512 + 1]]]
    z2 = torch.zeros(1, 13, 1, 2)
    z2[0, 12, 0, 1] = 3.0  # second position: only the least significant bit
    assert lfq_codes(z2).tolist() == [[[0, 1]]]


def test_quantizer_buffers_equal_upstream_tables():
    q = MagvitV2(MagvitV2Config(**TINY)).quantize
    assert q.power_vals.tolist() == [4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert q.power_vals.dtype == torch.int64
    assert q.embedding.shape == (8192, 13) and q.embedding.dtype == torch.float32
    assert q.embedding[6].tolist() == [-1.0] * 10 + [1.0, 1.0, -1.0]  # code 6 = 0b110


# ---------------------------------------------------------------------------------------------------- released layout

# Written out from showlab/Show-o models/modeling_magvitv2.py + common_modules.py @ 45a5a2de (not from this module).
# Encoder: conv_in 2 + 18 ResnetBlocks x 8 + 2 nin_shortcuts x 2 (levels 1, 3) + 4 downsamples x 2 + mid 26
# (8 + attn 10 + 8) + norm_out/conv_out/quant_conv 6 = 190. Decoder: post_quant_conv 2 + conv_in 2 + mid 26 + 18 x 8
# + 2 x 2 (levels 3, 1) + 4 upsamples x 2 + norm_out/conv_out 4 = 190. Quantizer buffers 2. Total 382.
RELEASED_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.3.conv2.bias": (128,),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.1.block.2.norm2.bias": (256,),
    "encoder.down.2.block.3.conv1.weight": (256, 256, 3, 3),
    "encoder.down.3.block.0.nin_shortcut.bias": (512,),
    "encoder.down.3.downsample.conv.bias": (512,),
    "encoder.down.4.block.3.conv2.weight": (512, 512, 3, 3),
    "encoder.mid.block_1.norm1.weight": (512,),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.bias": (512,),
    "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (13, 512, 3, 3),
    "encoder.quant_conv.weight": (13, 13, 1, 1),
    "decoder.post_quant_conv.bias": (13,),
    "decoder.conv_in.weight": (512, 13, 3, 3),
    "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "decoder.mid.block_2.norm2.weight": (512,),
    "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.3.block.3.conv1.weight": (256, 256, 3, 3),
    "decoder.up.2.block.2.norm1.bias": (256,),
    "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.1.upsample.conv.bias": (128,),
    "decoder.up.0.block.3.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quantize.embedding": (8192, 13),
    "quantize.power_vals": (13,),
}
NOT_RELEASED = ["encoder.down.4.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
                "encoder.down.0.block.4.conv1.weight", "encoder.down.1.block.3.conv1.weight",
                "decoder.up.4.block.3.conv1.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                "decoder.up.2.block.0.nin_shortcut.weight", "encoder.down.0.attn.0.q.weight",
                "encoder.down.0.block.0.temb_proj.weight", "quantize.codebook"]


def test_full_size_on_meta_has_the_released_state_dict():
    with torch.device("meta"):
        m = MagvitV2()
    state = m.state_dict()
    assert len(state) == 382 and all(v.is_meta for v in state.values())
    for key, shape in RELEASED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert not set(NOT_RELEASED) & set(state)
    assert sum(1 for k in state if k.startswith("encoder.")) == 190
    assert sum(1 for k in state if k.startswith("decoder.")) == 190
    assert sum(1 for k in state if "nin_shortcut.weight" in k) == 4
    assert sum(1 for k in state if ".attn." in k) == 0  # attn_resolutions=[5] never matches
    # 95,387,004 parameters (upstream MAGVITv2() at that commit); fp32 + buffers = 381,974,104 bytes, which is the
    # 382 MB pytorch_model.safetensors listed on the HF repo.
    assert sum(p.numel() for p in m.parameters()) == 95_387_004
    assert sum(v.numel() * v.element_size() for v in state.values()) == 381_974_104


def test_full_size_grid_is_32x32_on_meta():
    with torch.device("meta"):
        m = MagvitV2()
    assert (m.codebook_size, m.grid, m.image_size) == (8192, (32, 32), (512, 512))
    z = m.encoder(torch.empty(1, 3, 512, 512, device="meta"))
    assert z.shape == (1, 13, 32, 32)
    assert m.decoder(torch.empty(2, 13, 32, 32, device="meta")).shape == (2, 3, 512, 512)
    codes = m.encode(torch.zeros(480, 640, 3, dtype=torch.uint8))  # resized to 512x512 inside
    assert codes.shape == (32, 32) and codes.dtype == torch.long


def test_default_config_round_trips_as_the_released_config_json():
    assert MagvitV2Config().to_json() == {"_class_name": "MAGVITv2"}
    released = {"_class_name": "MAGVITv2", "_diffusers_version": "0.30.1"}
    assert MagvitV2Config.from_json(released) == MagvitV2Config()
    cfg = MagvitV2Config(**TINY)
    raw = json.loads(json.dumps(cfg.to_json()))
    assert raw["ch"] == 32 and raw["ch_mult"] == [1, 1, 2, 2, 2] and "z_channels" not in raw
    assert MagvitV2Config.from_json(raw) == cfg


# ---------------------------------------------------------------------------------------------------- tiny, for real

@pytest.mark.parametrize("weights, file", [("safetensors", "pytorch_model.safetensors"), ("bin", "pytorch_model.bin")])
def test_saved_folder_reloads_with_identical_outputs(tmp_path, weights, file):
    m = _tiny(seed=1)
    assert isinstance(m, ImageTokenizer) and (m.codebook_size, m.grid, m.image_size) == (8192, (4, 4), (64, 64))
    folder = save_magvit2(m, tmp_path / "vq", weights=weights)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", file])
    loaded = load_magvit2(folder)
    assert loaded.config == m.config and not loaded.training
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    codes = m.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert len(codes.unique()) > 10 and 0 <= codes.min() and codes.max() < 8192
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), m.decode(codes))
    assert torch.equal(m.encode(images[1]), codes[1])  # unbatched (H, W, 3) -> (h, w)
    assert torch.equal(m.preprocess(images), images.permute(0, 3, 1, 2).float() / 255 * 2 - 1)  # right size: no resize


def test_encoder_quantizes_to_the_sign_bits_of_z():
    m = _tiny(seed=3)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z = m.encoder(images.permute(0, 3, 1, 2).float() / 255 * 2 - 1)  # (2, 13, 4, 4)
    bits = (z > 0).long()
    expected = sum(bits[:, i] << (12 - i) for i in range(13))  # (2, 4, 4)
    assert torch.equal(m.encode(images), expected)


def test_photo_480x640_gives_32x32_codes_and_512x512_uint8():
    m = _tiny(seed=5, image_size=512, resolution=512, attn_resolutions=())
    photo = _photo()
    assert photo.size == (640, 480)
    image = _tensor(photo)  # (480, 640, 3)
    codes = m.encode(image)
    assert codes.shape == (32, 32) and codes.dtype == torch.long and codes.max() < 8192
    out = m.decode(codes)
    assert out.shape == (512, 512, 3) and out.dtype == torch.uint8
    # the squash resize follows upstream's PIL Resize((512, 512), BICUBIC) + Normalize(0.5, 0.5)
    x = m.preprocess(image[None])  # (1, 3, 512, 512)
    assert x.shape == (1, 3, 512, 512) and -1 <= x.min() and x.max() <= 1
    ours = ((x[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.int16)
    pil = torch.from_numpy(np.array(photo.resize((512, 512), Image.BICUBIC))).to(torch.int16)
    diff = (ours - pil).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_postprocess_truncates_like_upstream():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert MagvitV2.postprocess(x)[0, 0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]


def test_checkpoint_without_quantizer_buffers_still_loads(tmp_path):
    m = _tiny(seed=6)
    folder = save_magvit2(m, tmp_path / "vq")
    path = folder / "pytorch_model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("quantize.")}
    save_file(state, str(path))
    loaded = load_magvit2(folder, dtype=torch.bfloat16)
    assert loaded.quantize.power_vals.dtype == torch.int64 and loaded.quantize.power_vals[0] == 4096
    assert loaded.encoder.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.quantize.embedding.float(), lfq_embed(torch.arange(8192)))
    assert loaded.decode(torch.zeros(1, 4, 4, dtype=torch.long)).shape == (1, 64, 64, 3)


# ---------------------------------------------------------------------------------------------------- errors

def test_missing_files_raise_with_path_and_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "MAGVITv2"}))
    with pytest.raises(FileNotFoundError, match="no weights in .*pytorch_model.safetensors.*huggingface-cli download "
                                                 "showlab/magvitv2"):
        load_magvit2(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"empty.config\.json not found.*save_magvit2"):
        load_magvit2(tmp_path / "empty")


def test_architecture_mismatch_lists_keys_and_shapes(tmp_path):
    folder = save_magvit2(_tiny(), tmp_path / "vq")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_res_blocks": [2, 1, 1, 1, 1]}))
    with pytest.raises(ValueError, match=r"8 missing keys \[.*'encoder.down.0.block.1.conv1.bias'.*0 unexpected"):
        load_magvit2(folder)
    (folder / "config.json").write_text(json.dumps({**config, "ch": 64}))
    with pytest.raises(ValueError, match=r"shape mismatches.*encoder.conv_in.weight: file \(32, 3, 3, 3\) vs model "
                                         r"\(64, 3, 3, 3\)"):
        load_magvit2(folder)
    (folder / "config.json").write_text(json.dumps({**config, "z_channels": 12}))
    with pytest.raises(ValueError, match=r"quantize.embedding: file \(8192, 13\) vs model \(4096, 12\)"):
        load_magvit2(folder)
    (folder / "config.json").write_text(json.dumps({**config, "codebook_size": 8192}))
    with pytest.raises(ValueError, match=r"unknown keys \['codebook_size'\]"):
        load_magvit2(folder)


def test_reordered_code_table_is_rejected(tmp_path):
    folder = save_magvit2(_tiny(), tmp_path / "vq")
    path = folder / "pytorch_model.safetensors"
    state = load_file(str(path))
    state["quantize.embedding"] = state["quantize.embedding"].flip(1).contiguous()  # LSB-first order
    save_file(state, str(path))
    with pytest.raises(ValueError, match="not the MSB-first"):
        load_magvit2(folder)


def test_decode_rejects_bad_codes():
    m = _tiny()
    with pytest.raises(ValueError, match=r"valid codes are 0..8191"):
        m.decode(torch.full((1, 4, 4), 8192))
    with pytest.raises(ValueError, match=r"shape \(B, 4, 4\)"):
        m.decode(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        m.decode(torch.zeros(1, 4, 4))
