"""`parapipe generate` on a released-format MMaDA-Parallel-M folder (published config keys, full 134656-row
vocabulary at tiny dims, the LLaDA tokenizer rebuilt offline) with a separate MAGVIT-v2 folder and the
published inference settings; and an MMaDA-Parallel-A folder (Lumina vocabulary, vqvae/ inside) sampled
with the Lumina-DiMOO layout."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import main
from model.magvit2 import MagvitV2, MagvitV2Config, save_magvit2
from model.tokens import LLADA_TOKENIZER_SIZE
from tests.test_released_checkpoints import LLADA_NAMED, LUMINA, MMADA_8B, TINY_DIMS, word_tokenizer, write_folder

MAGVIT_64 = dict(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=(1, 1, 1, 1, 1), decoder_ch_mult=(1, 1, 2, 2, 2),
                 decoder_num_res_blocks=(1, 1, 1, 1, 1), resolution=64, image_size=64)  # 13 bits: 8192 codes


@pytest.fixture(scope="module")
def released_m(tmp_path_factory):
    work = tmp_path_factory.mktemp("released")
    tok = word_tokenizer(str(work / "tok" / "tokenizer.json"), LLADA_TOKENIZER_SIZE, LLADA_NAMED)
    ckpt = write_folder(work / "MMaDA-Parallel-M", {**MMADA_8B, **TINY_DIMS}, tokenizer=tok)
    torch.manual_seed(0)
    magvit = str(save_magvit2(MagvitV2(MagvitV2Config(**MAGVIT_64)), work / "magvitv2"))
    return work, ckpt, magvit, tok


def test_generate_with_published_m_settings_and_a_separate_magvit(released_m, capsys):
    work, ckpt, magvit, _ = released_m
    photo = work / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(photo)
    out = str(work / "out")
    # explicit flags shrink the published timeline for a CPU test; guidance and block length stay published
    main(["generate", "--checkpoint", ckpt, "--image-tokenizer", magvit, "--prompt", "w5 w6 w7", "--image", str(photo),
          "--out", out, "--settings", "mmada-parallel-m", "--steps", "6", "--image-steps", "3", "--text-length", "12"])
    meta = json.load(open(os.path.join(out, "meta.json")))
    s = meta["sampler"]
    assert (s["text_cfg"], s["image_cfg"], s["text_temperature"], s["steps"], s["image_steps"]) == (2.5, 4.0, 0.0, 6, 3)
    assert s["text_block_length"] is None and meta["grid"] == [4, 4]  # None: the whole text is one block
    assert meta["nfe"] == 12  # guided text on every step: one conditional + one unconditional pass each
    assert Image.open(os.path.join(out, "image.png")).size == (64, 64)
    assert "wrote" in capsys.readouterr().out
    # without the tokenizer the input image cannot be encoded: the error names the flag
    with pytest.raises(ValueError, match="--image-tokenizer"):
        main(["generate", "--checkpoint", ckpt, "--prompt", "w5", "--image", str(photo), "--out", out])


def test_a_variant_folder_generates_with_the_dimoo_layout_and_its_vqvae(tmp_path):
    from model.layout import IMAGE, TEXT, output_regions
    from model.layout_dimoo import ANSWER_END_ID, ANSWER_START_ID, NEWLINE_ID, DimooOutputShape
    from model.vq_amused import AMUSED_VQ_CONFIG, build_vqmodel

    added = {126349: "<boi>", 126350: "<eoi>", 126351: "<uncondition>", 126352: "<system>", 126353: "<user>",
             126354: "<answer>", 126355: "</answer>"}
    tok = word_tokenizer(str(tmp_path / "tok" / "tokenizer.json"), LUMINA["vocab_size"] - 8192, {**LLADA_NAMED, **added})
    ckpt = write_folder(tmp_path / "MMaDA-Parallel-A", {**LUMINA, **TINY_DIMS}, tokenizer=tok)
    torch.manual_seed(0)  # the released VQ structure at tiny width, 8192 codes like the release
    build_vqmodel(dict(AMUSED_VQ_CONFIG, block_out_channels=[8, 8, 16, 16, 16], latent_channels=4,
                       norm_num_groups=4)).save_pretrained(os.path.join(ckpt, "vqvae"))
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(photo)
    out = str(tmp_path / "out")
    main(["generate", "--checkpoint", ckpt, "--prompt", "w5 w6", "--image", str(photo), "--out", out,
          "--settings", "mmada-parallel-a", "--steps", "4", "--image-steps", "2", "--text-length", "8"])
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["grid"] == [32, 32] and meta["sampler"]["image_cfg"] == 4.0 and meta["sampler"]["text_cfg"] == 0.0
    assert meta["nfe"] == 4 + 2  # unconditional passes only on the image steps (no text guidance in A's settings)
    assert Image.open(os.path.join(out, "image.png")).size == (512, 512)
    # the output part the sampler filled is the A layout: <answer> <boi> rows + newline <eoi> text </answer>
    shape = DimooOutputShape(grid=(32, 32), text_tokens=8)
    regions = output_regions(shape)
    assert regions.count(IMAGE) == 1024 and regions.count(TEXT) == 8 and len(regions) == 32 * 33 + 8 + 4
    from model.layout import output_template
    from model.checkpoint import read_config

    template = output_template(read_config(ckpt)[1], shape)
    assert template[0] == ANSWER_START_ID and template[-1] == ANSWER_END_ID and template[2 + 32] == NEWLINE_ID
