"""PNG reports of an evaluation, drawn with PIL alone: a grid of sample outputs and a metric chart.

sample_grid: one row per item: input image, output image, target image (when the benchmark has one),
then the instruction, the reasoning text and the per-metric marks. metric_chart: grouped horizontal
bars, one group per ParaBench metric (+ Overall), one colour per compared run (an ablation's arms).
"""
import io
import textwrap

from PIL import Image, ImageDraw, ImageFont

from tasks.evaluate.judges import METRICS

CELL = 128          # image thumbnail side, px
TEXT_W = 520        # text column width, px
PAD = 8
COLOURS = ((66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193))
SHORT = {"text_quality": "TQ", "text_alignment": "TA", "image_consistency": "IC", "image_alignment": "IA",
         "image_quality": "IQ", "output_alignment": "OA"}


def _thumb(png: bytes | None) -> Image.Image:
    if png is None:
        tile = Image.new("RGB", (CELL, CELL), (60, 60, 60))
        ImageDraw.Draw(tile).text((PAD, CELL // 2), "no image", fill=(255, 255, 255))
        return tile
    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)


def _marks(scores: dict, failed: bool, reason: str) -> str:
    if failed:
        return f"FAILED: {reason}"
    return "  ".join(f"{SHORT[m]} {scores[m]:.0f}" for m in METRICS if scores.get(m) is not None)


def sample_grid(rows: list[dict], path: str) -> str:
    """rows: {instruction, input_image, output_image, target_image, text, scores, failed, reason}. Writes a PNG."""
    font = ImageFont.load_default()
    row_h = CELL + 2 * PAD
    width = 3 * (CELL + PAD) + TEXT_W + 2 * PAD
    canvas = Image.new("RGB", (width, max(1, len(rows)) * row_h + 24), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), "input | output | target | instruction, reasoning text, marks (0-100)", fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = 24 + r * row_h
        for c, key in enumerate(("input_image", "output_image", "target_image")):
            canvas.paste(_thumb(row.get(key)), (PAD + c * (CELL + PAD), y))
        x = PAD + 3 * (CELL + PAD)
        lines = textwrap.wrap("> " + row["instruction"], 86)[:2] + textwrap.wrap(row.get("text") or "(no text)", 86)[:5]
        for k, line in enumerate(lines):
            draw.text((x, y + 12 * k), line, fill=(30, 30, 30), font=font)
        draw.text((x, y + CELL - 14), _marks(row.get("scores") or {}, row.get("failed", False), row.get("reason", "")),
                  fill=(180, 0, 0) if row.get("failed") else (0, 90, 0), font=font)
    canvas.save(path)
    return path


def metric_chart(table: dict, path: str, title: str = "") -> str:
    """table: {run label: {metric: value 0-100}}; grouped horizontal bars per metric. Writes a PNG."""
    font = ImageFont.load_default()
    labels, keys = list(table), (*METRICS, "overall")
    bar_h, label_w, plot_w = 12, 130, 420
    group_h = bar_h * len(labels) + 10
    height = 40 + group_h * len(keys) + 16 * len(labels)
    canvas = Image.new("RGB", (label_w + plot_w + 60, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 4), title, fill=(0, 0, 0), font=font)
    for g, metric in enumerate(keys):
        y0 = 30 + g * group_h
        draw.text((PAD, y0 + 2), metric.replace("_", " "), fill=(0, 0, 0), font=font)
        for k, label in enumerate(labels):
            v = table[label].get(metric)
            y = y0 + k * bar_h
            if v is None:
                draw.text((label_w, y), "n/a", fill=(120, 120, 120), font=font)
                continue
            draw.rectangle([label_w, y, label_w + int(plot_w * v / 100), y + bar_h - 2], fill=COLOURS[k % len(COLOURS)])
            draw.text((label_w + int(plot_w * v / 100) + 4, y), f"{v:.1f}", fill=(0, 0, 0), font=font)
    for k, label in enumerate(labels):  # legend
        y = 30 + group_h * len(keys) + 16 * k
        draw.rectangle([PAD, y, PAD + 10, y + 10], fill=COLOURS[k % len(COLOURS)])
        draw.text((PAD + 16, y), label, fill=(0, 0, 0), font=font)
    canvas.save(path)
    return path
