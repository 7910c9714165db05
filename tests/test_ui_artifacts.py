"""The UI's charts and denoising strips without a browser: content, sizes, valid PNGs, keys unique per run.
(tests/test_prefect_server.py and tools/ui_check.py look at the same artifacts in the real Prefect UI,
with headless Chromium.)"""
import base64
import io
import re
from datetime import datetime, timezone

import pytest
import torch
from PIL import Image

from tasks.pipeline import ui_artifacts as ui

DATA_URI = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def _embedded(md: str) -> list[Image.Image]:
    """The PNGs embedded in a markdown artifact, decoded (raises on an invalid PNG)."""
    out = []
    for b64 in DATA_URI.findall(md):
        raw = base64.b64decode(b64)
        assert len(raw) <= ui.MAX_IMAGE_BYTES and raw.startswith(b"\x89PNG\r\n\x1a\n")
        im = Image.open(io.BytesIO(raw))
        im.load()
        out.append(im)
    return out


def test_sparkline_scales_between_min_and_max():
    assert ui.sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert ui.sparkline([2.0, None, 2.0]) == "▄ ▄"
    assert ui.sparkline([]) == ""


def test_sft_loss_chart_from_train_metrics(tmp_path):
    from storage.parquet import write_rows

    now = datetime.now(timezone.utc)
    write_rows(str(tmp_path), "train_metrics", [
        {"run_id": "sft-a", "step": s, "loss": 10.0 / s, "loss_text": 4.0 / s, "loss_image": 6.0 / s, "time": now}
        for s in range(1, 41)], run="sft-a")
    md = ui.sft_loss_markdown(str(tmp_path), "sft-a", str(tmp_path / "out"))
    [chart] = _embedded(md)
    assert chart.size[0] >= 500 and len(md) < ui.MAX_ARTIFACT_CHARS
    assert "| loss | 10 | 0.25 | 0.25 | 10 |" in md and "| loss_image | 6 | 0.15 |" in md
    assert (tmp_path / "out" / "charts" / "sft-a-loss.png").is_file()
    assert "no train_metrics rows" in ui.sft_loss_markdown(str(tmp_path), "other", str(tmp_path / "out"))


def _codes(masked: int, n: int = 16) -> list[int]:
    return [-1] * masked + [k % 2 for k in range(n - masked)]


def _trajectories(root: str, rounds: int) -> None:
    from storage.parquet import write_rows

    rows = []
    for rnd in range(rounds):
        for sample in ("s0", "s1", "s2"):
            for g in range(2):
                for k, step in enumerate((2, 5, 7)):
                    rows.append({"run_id": "rl-a", "round": rnd, "sample_id": sample, "group_index": g, "step": step,
                                 "slot": k, "text": "the red square is at b2"[: 8 * (k + 1)],
                                 "image_codes": _codes(masked=12 - 6 * k), "text_mask_frac": 0.5 - 0.25 * k,
                                 "image_mask_frac": (12 - 6 * k) / 16, "instruction": f"recolour {sample}",
                                 "reward": 0.3 + 0.2 * k})
    write_rows(root, "trajectories", rows, run="rl-a")


def test_trajectory_rollouts_pick_rounds_and_two_prompts(tmp_path):
    _trajectories(str(tmp_path), rounds=6)
    picked = ui.trajectory_rollouts(str(tmp_path), "rl-a")
    assert sorted(picked) == [0, 2, 5] == ui.pick_rounds(list(range(6)))
    for rollouts in picked.values():
        assert [r[0]["sample_id"] for r in rollouts] == ["s0", "s1"]
        assert [[row["step"] for row in r] for r in rollouts] == [[2, 5, 7], [2, 5, 7]]


def test_strip_shows_partial_images_and_text_side_by_side(tmp_path):
    from model.image_tokenizer import PatchVQ

    _trajectories(str(tmp_path), rounds=1)
    [rollouts] = ui.trajectory_rollouts(str(tmp_path), "rl-a").values()
    red, white = [255.0, 0.0, 0.0] * 16, [255.0] * 48
    vq = PatchVQ(codebook=torch.tensor([red, white]), patch_size=4, image_size=(16, 16))  # grid 4 x 4
    path = ui.strip_png(rollouts, str(tmp_path / "strip.png"), "round 0", vq)
    with Image.open(path) as im:
        strip = im.convert("RGB")
    cell_w = max(ui.CELL, ui.TEXT_COLS * 6) + 12
    assert strip.size[0] == ui.PAD // 2 + 3 * cell_w
    # first rollout, step 2: 12 of 16 patches masked (grey), the last row of patches decoded (red, white, ...)
    x0, y0 = ui.PAD // 2, 24 + 30 + 26
    patch = ui.CELL // 4
    assert strip.getpixel((x0 + 2, y0 + 2)) == (128, 128, 128)
    assert strip.getpixel((x0 + 2, y0 + 3 * patch + 2)) == (255, 0, 0)
    assert strip.getpixel((x0 + patch + 2, y0 + 3 * patch + 2)) == (255, 255, 255)
    # step 7 (third column): nothing masked
    assert strip.getpixel((x0 + 2 * cell_w + 2, y0 + 2)) == (255, 0, 0)


def test_trajectory_markdown_embeds_every_picked_round_within_budget(tmp_path):
    _trajectories(str(tmp_path), rounds=4)
    md = ui.trajectory_markdown(str(tmp_path), "rl-a", str(tmp_path / "out"), checkpoint=None)
    assert len(_embedded(md)) == 3 and len(md) < ui.MAX_ARTIFACT_CHARS
    assert [f"### round {r}" in md for r in (0, 2, 3)] == [True] * 3
    assert sorted(p.name for p in (tmp_path / "out" / "strips").iterdir()) == [
        "rl-a-round00000.png", "rl-a-round00002.png", "rl-a-round00003.png"]


def test_large_pngs_shrink_and_the_budget_holds(tmp_path):
    def noise(side: int) -> str:
        path = str(tmp_path / f"noise{side}.png")
        pixels = torch.randint(0, 256, (side * side * 3,), dtype=torch.uint8).numpy().tobytes()
        Image.frombytes("RGB", (side, side), pixels).save(path)
        return path

    [shrunk] = _embedded(ui.png_markdown(noise(640), "noise"))  # ~300 KB quantised: halved until it fits
    assert shrunk.size == (320, 320)
    blocks = ui.embed_pngs([(f"n{k}", noise(300)) for k in range(3)], budget=150_000)
    assert len(_embedded("".join(blocks))) == 1 and "n1: past the artifact's size budget" in "".join(blocks)


def test_run_keys_differ_between_flow_runs(prefect_harness):
    from prefect import flow

    @flow
    def keyed() -> str:
        return ui.run_key("aggregate", "Toy_Tiny", "progress")

    first, second = keyed(), keyed()
    assert first != second and first.startswith("aggregate-toy-tiny-progress-")
    assert re.fullmatch(r"[a-z0-9-]{1,100}", first)
    assert ui.stable_key("rl", "RL run/1", "chart") == "rl-rl-run-1-chart"


@pytest.mark.parametrize("values", [[1.0, 2.0], [5.0]])
def test_line_chart_writes_a_png_for_short_series(tmp_path, values):
    path = ui.line_chart({"p": {"a": list(enumerate(values))}}, str(tmp_path / "c.png"), "t", "x")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[1] == 30 + ui.PANEL_H + 50
