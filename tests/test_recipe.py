"""SFT recipes (tasks/sft/recipe.py): presets, JSON files, flags, validation; image resizing as aggregation does."""
import argparse
import json

import pytest
import torch
from PIL import Image

from tasks.sft.recipe import (PRESETS, Recipe, default_preset, field_docs, load_recipe, merge, recipe_flags,
                              recipe_from_args)
from tasks.sft.sft_loop import TOY_TINY_RECIPE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    recipe_flags(p)
    return p


def test_presets_and_defaults_by_data():
    toy, small = PRESETS["toy-tiny"], PRESETS["small"]
    assert toy.categories == TOY_TINY_RECIPE.categories and small.categories is None  # real data is never filtered
    assert toy.seq == {"text_tokens": 32, "instruction_tokens": 16} and small.seq["text_tokens"] == 128
    assert default_preset(True) == "toy-tiny" and default_preset(False) == "small"
    assert toy.sft["lr"] == TOY_TINY_RECIPE.sft.lr


def test_json_file_merges_sections_field_by_field(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"preset": "toy-tiny", "sft": {"lr": 2e-5}, "seq": {"text_tokens": 256},
                                "init_from": "/models/MMaDA-Parallel-M"}))
    r = load_recipe(str(path))
    assert r.sft["lr"] == 2e-5 and r.sft["batch_size"] == TOY_TINY_RECIPE.sft.batch_size
    assert r.seq == {"text_tokens": 256, "instruction_tokens": 16} and r.init_from == "/models/MMaDA-Parallel-M"
    assert r.categories == TOY_TINY_RECIPE.categories
    with pytest.raises(ValueError, match="neither a preset"):
        load_recipe(str(tmp_path / "missing.json"))


def test_flags_override_with_types_and_help_lists_every_field():
    p = _parser()
    a = p.parse_args(["--sft.lr", "1e-5", "--seq.text_tokens", "256", "--categories", "add,remove",
                      "--init-from", "/m/A", "--sft.bf16", "false", "--sampler.mode", "sequential",
                      "--sft.betas", "[0.9, 0.99]", "--kinds", "edit", "--image-positions", "true"])
    r = recipe_from_args(a, PRESETS["small"])
    assert r.sft["lr"] == 1e-5 and r.sft["bf16"] is False and r.sft["betas"] == [0.9, 0.99]
    assert r.seq["text_tokens"] == 256 and r.categories == ("add", "remove") and r.kinds == ("edit",)
    assert r.init_from == "/m/A" and r.sampler["mode"] == "sequential" and r.image_positions is True
    assert recipe_from_args(p.parse_args([]), PRESETS["small"]) == PRESETS["small"]
    text = p.format_help()
    for field in ("--sft.lr", "--sft.total_steps", "--seq.text_tokens", "--sampler.image_steps", "--init-from",
                  "--image-tokenizer", "--categories", "--kinds", "--eval-clip"):
        assert field in text
    assert "Peak learning rate of AdamW. [default: 0.0015]" in " ".join(text.split())
    assert field_docs(Recipe)["init_from"].startswith("Checkpoint folder to fine-tune")


@pytest.mark.parametrize("argv, match", [
    (["--sft.lr", "fast"], "--sft.lr='fast'"),
    (["--sft.bf16", "maybe"], "expected true or false"),
    (["--sft.objective", "nope"], "objective='nope'"),
    (["--seq.text_tokens", "1"], "text_tokens=1"),
    (["--kinds", "edit,video"], "kinds"),
    (["--sampler.image_steps", "999"], "image_steps=999"),
    (["--eval-clip", "{oops"], "not JSON"),
    (["--image-positions", "maybe"], "--image-positions='maybe': expected true or false"),
])
def test_bad_flags_fail_with_the_value_and_the_fix(argv, match):
    with pytest.raises(ValueError, match=match):
        recipe_from_args(_parser().parse_args(argv), PRESETS["small"])


def test_unknown_field_in_a_file_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"sft": {"learning_rate": 1}}))
    with pytest.raises(Exception, match="learning_rate"):
        load_recipe(str(path))
    with pytest.raises(Exception, match="epochs"):
        merge(PRESETS["small"], {"epochs": 3})


def test_read_png_resizes_any_size_like_aggregation(tmp_path):
    from tasks.aggregate.curate import resize_image
    from tasks.common.generate import read_png

    img = Image.new("RGB", (640, 480), (10, 20, 30))
    img.paste((200, 0, 0), (0, 0, 80, 480))  # a red band on the left eighth
    img.save(tmp_path / "x.jpg")
    squash = read_png(str(tmp_path / "x.jpg"), (32, 32))
    assert squash.shape == (32, 32, 3) and squash.dtype == torch.uint8
    assert squash[:, 0, 0].float().mean() > 150  # squash keeps the band (4 of 32 columns)
    crop = read_png(str(tmp_path / "x.jpg"), (32, 32), "center_crop")
    assert crop[:, 0, 0].float().mean() < 60  # centre crop cuts the left 80 px away
    assert resize_image(img, (48, 96), "center_crop").size == (96, 48)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_png(str(tmp_path / "nope.png"), (32, 32))
    with pytest.raises(ValueError, match="resize policy"):
        resize_image(img, (32, 32), "stretch")
