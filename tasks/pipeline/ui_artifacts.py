"""What a person sees of a run in the Prefect UI: line charts and denoising trajectory strips.

Charts and strips are PNGs drawn with PIL, written beside the run's outputs and embedded in markdown
artifacts as `data:image/png;base64,...` images: the Prefect 3.8 UI (v2, the default) passes `data:image/`
URIs through its markdown sanitiser for <img> tags, and a browser cannot reach the server's local files.
Each embedded image is palette-quantised and kept under MAX_IMAGE_BYTES, so an artifact (stored in
Prefect's database) stays small; a sparkline table repeats the numbers for the API and the terminal.
Reading the tables lives here too (DuckDB over the lake); the flows only call the publish_* functions.
"""
import base64
import io
import math
import os
import re
import textwrap

from PIL import Image, ImageDraw, ImageFont

MAX_IMAGE_BYTES = 120_000   # per embedded PNG, base64 adds a third
MAX_ARTIFACT_CHARS = 300_000  # per markdown artifact: images past this are linked by path, not embedded
SPARK = "▁▂▃▄▅▆▇█"
COLOURS = ((66, 133, 244), (219, 68, 55), (15, 157, 88), (244, 180, 0), (171, 71, 188))
PANEL_W, PANEL_H, PAD = 560, 170, 40
CELL, TEXT_LINES, TEXT_COLS = 96, 9, 24  # strip cell: image side px, text lines and characters under it


def _font():
    return ImageFont.load_default(size=11)  # Pillow's bundled FreeType font: no system fonts needed


def run_key(*parts: str) -> str:
    """An artifact key unique to this flow run: parts + the flow run's name and id (keys: a-z, 0-9, dashes)."""
    from prefect.runtime import flow_run

    name, run_id = flow_run.get_name() or "manual", (flow_run.get_id() or "")[:8]
    return re.sub(r"[^a-z0-9-]+", "-", "-".join([*parts, name, run_id]).lower()).strip("-")[:100]


def stable_key(*parts: str) -> str:
    """An artifact key for a logical run (e.g. an RL run id resumed by several flow runs): versions pile up under it."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def sparkline(values: list[float]) -> str:
    """Unicode bars, one per value, scaled between the min and the max (None / NaN -> a space)."""
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return ""
    lo, hi = min(ok), max(ok)
    top = len(SPARK) - 1

    def bar(v: float | None) -> str:
        if v is None or not math.isfinite(v):
            return " "
        return SPARK[round(top * (v - lo) / (hi - lo)) if hi > lo else top // 2]

    return "".join(map(bar, values))


def png_markdown(path: str, alt: str, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """`![alt](data:image/png;base64,...)` of a PNG on disk, palette-quantised (and halved until under max_bytes)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    while True:
        buf = io.BytesIO()
        im.quantize(colors=64, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", compress_level=9)
        if buf.tell() <= max_bytes or min(im.size) < 64:
            break
        im = im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS)
    if buf.tell() > max_bytes:
        return f"*({alt}: too large to embed; see `{os.path.abspath(path)}`)*"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def embed_pngs(items: list[tuple[str, str]], budget: int = MAX_ARTIFACT_CHARS) -> list[str]:
    """Per (title, PNG path): a heading, the embedded image (a note instead once past `budget` characters)
    and the file's path. Returns markdown blocks to join with blank lines."""
    parts = []
    for title, path in items:
        img = png_markdown(path, title)
        if len(img) > budget:
            img = f"*({title}: past the artifact's size budget, not embedded)*"
        budget -= len(img)
        parts += [f"### {title}", img, f"PNG: `{os.path.abspath(path)}`"]
    return parts


def publish_markdown(key: str, build, *args, description: str | None = None):
    """A markdown artifact from build(*args). Drawing is a report: a failure is printed, never fails the run."""
    from prefect.artifacts import create_markdown_artifact

    try:
        md = build(*args)
    except Exception as e:  # noqa: BLE001 - the run's outputs and tables are written; only the picture is missing
        print(f"WARNING: artifact {key!r} not drawn: {type(e).__name__}: {e}")
        return None
    return create_markdown_artifact(md, key=key, description=description)


# ---------------------------------------------------------------------------------------------- charts

def _ticks(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * k / 4 for k in range(5)]


def _panel(draw, font, top: int, name: str, series: dict[str, list[tuple[float, float]]], xlabel: str) -> None:
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    left, right, bottom = PAD + 30, PAD + 30 + PANEL_W, top + PANEL_H
    draw.text((left, top - 16), name, fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    if not pts:
        draw.text((left + 8, top + PANEL_H // 2), "no values", fill=(120, 120, 120), font=font)
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x0, x1 = (x0, x1) if x1 > x0 else (x0 - 1, x1 + 1)
    y1 = y1 if y1 > y0 else y0 + (abs(y0) or 1) * 0.1
    xint = all(float(p[0]).is_integer() for p in pts)  # rounds, steps: integer ticks

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * PANEL_W, bottom - (y - y0) / (y1 - y0) * PANEL_H

    for t in _ticks(y0, y1):
        draw.line([left, at(x0, t)[1], right, at(x0, t)[1]], fill=(235, 235, 235))
        draw.text((4, at(x0, t)[1] - 5), f"{t:.3g}", fill=(90, 90, 90), font=font)
    for t in sorted({round(t) for t in _ticks(x0, x1)}) if xint else _ticks(x0, x1):
        draw.text((at(t, y0)[0] - 8, bottom + 3), f"{t:.4g}", fill=(90, 90, 90), font=font)
    draw.text((right - 6 * len(xlabel), bottom + 14), xlabel, fill=(90, 90, 90), font=font)
    lx = left + draw.textlength(name, font=font) + 24  # the legend follows the title, above the plot
    for k, (label, s) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        xy = [at(x, y) for x, y in s if y is not None and math.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy if len(xy) <= 40 else xy[-1:]:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.rectangle([lx, top - 14, lx + 10, top - 4], fill=colour)
        draw.text((lx + 14, top - 16), label, fill=(0, 0, 0), font=font)
        lx += draw.textlength(label, font=font) + 30


def line_chart(panels: dict[str, dict[str, list[tuple[float, float]]]], path: str, title: str, xlabel: str) -> str:
    """panels: {panel title: {series label: [(x, y), ...]}}, stacked vertically, each with its own y scale.
    Writes a PNG and returns its path."""
    font = _font()
    h = 30 + len(panels) * (PANEL_H + 50)
    canvas = Image.new("RGB", (PANEL_W + 2 * PAD + 40, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 6), title, fill=(0, 0, 0), font=font)
    for i, (name, series) in enumerate(panels.items()):
        _panel(draw, font, 44 + i * (PANEL_H + 50), name, series, xlabel)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def summary_table(columns: dict[str, list[float]]) -> str:
    """A markdown table: metric | first | last | min | max | trend (sparkline)."""
    lines = ["| metric | first | last | min | max | trend |", "|---|---:|---:|---:|---:|---|"]
    for name, vals in columns.items():
        ok = [v for v in vals if v is not None and math.isfinite(v)]
        if ok:
            lines.append(f"| {name} | {ok[0]:.4g} | {ok[-1]:.4g} | {min(ok):.4g} | {max(ok):.4g} | "
                         f"`{sparkline(vals[-60:])}` |")
    return "\n".join(lines)


def chart_markdown(title: str, xs: list[float], columns: dict[str, list[float]], panels: dict[str, list[str]],
                   path: str, xlabel: str) -> str:
    """Heading, the embedded chart (panels name the columns drawn together) and the summary table."""
    drawn = {p: {c: list(zip(xs, columns[c])) for c in cols if c in columns} for p, cols in panels.items()}
    line_chart(drawn, path, title, xlabel)
    return f"## {title}\n\n{png_markdown(path, title)}\n\n{summary_table(columns)}\n\nPNG: `{os.path.abspath(path)}`"


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _columns(root: str, table: str, run_id: str, order: str, cols: tuple[str, ...]) -> dict[str, list]:
    from storage.query import query

    return query(root, f"SELECT {order}, {', '.join(cols)} FROM {table} WHERE run_id = {_sql_text(run_id)} "
                       f"ORDER BY {order}").to_pydict()


def sft_loss_markdown(root: str, run_id: str, out: str) -> str:
    """The training loss (total, text, image) per step of an SFT run, from the train_metrics table."""
    t = _columns(root, "train_metrics", run_id, "step", ("loss", "loss_text", "loss_image"))
    if not t["step"]:
        return f"## SFT {run_id}: loss\n\nno train_metrics rows for run_id `{run_id}`"
    cols = {k: t[k] for k in ("loss", "loss_text", "loss_image")}
    return chart_markdown(f"SFT {run_id}: training loss per step", t["step"], cols,
                          {"masked-diffusion loss": list(cols)}, os.path.join(out, "charts", f"{run_id}-loss.png"), "step")


RL_PANELS = {"reward (normalised, mean over sampled steps)": ["reward_mean"], "KL to the reference": ["kl"],
             "held-out toy agreement": ["heldout_agreement", "heldout_exact_image"]}


def rl_metrics_markdown(root: str, run_id: str, out: str) -> str:
    """Reward, KL and held-out agreement per round of a ParaRL run, from the rl_metrics table."""
    names = [c for cols in RL_PANELS.values() for c in cols]
    t = _columns(root, "rl_metrics", run_id, "round", tuple(names))
    if not t["round"]:
        return f"## ParaRL {run_id}: metrics\n\nno rl_metrics rows for run_id `{run_id}`"
    xs = t["round"]
    cols = {k: t[k] for k in names}
    # held-out evaluation runs every eval_every rounds: draw only the rounds that have it
    panels = {p: c for p, c in RL_PANELS.items() if any(v is not None for k in c for v in cols[k])}
    return chart_markdown(f"ParaRL {run_id}: per round", xs, cols, panels,
                          os.path.join(out, "charts", f"{run_id}-metrics.png"), "round")


# ---------------------------------------------------------------------------------------------- trajectory strips

def _code_image(codes: list[int], image_tokenizer, grid: tuple[int, int]) -> Image.Image:
    """The partial image of one recorded step (masked patches grey); without a tokenizer, a code map."""
    import torch

    from rl.reward import partial_image

    t = torch.tensor(codes, dtype=torch.long).reshape(grid)
    if image_tokenizer is not None:
        return Image.fromarray(partial_image(t, image_tokenizer).cpu().numpy())
    rgb = torch.stack([(t * 37) % 256, (t * 91) % 256, (t * 53) % 256], -1)
    rgb[t < 0] = 128
    return Image.fromarray(rgb.to(torch.uint8).numpy())


def strip_png(rollouts: list[list[dict]], path: str, title: str, image_tokenizer=None) -> str:
    """One row per rollout, one column per recorded step: the partial image above the partial text.

    rollouts: per rollout, its trajectories rows in step order (step, text, image_codes, text_mask_frac,
    image_mask_frac, reward, instruction, sample_id, round). Writes a PNG and returns its path.
    """
    font = _font()
    cell_w, head_h = max(CELL, TEXT_COLS * 6) + 12, 30
    cell_h = 26 + CELL + 6 + 11 * TEXT_LINES
    steps = max(len(r) for r in rollouts)
    canvas = Image.new("RGB", (PAD // 2 + steps * cell_w, 24 + len(rollouts) * (head_h + cell_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD // 2, 6), title, fill=(0, 0, 0), font=font)
    side = round(math.sqrt(len(rollouts[0][0]["image_codes"])))
    grid = tuple(image_tokenizer.grid) if image_tokenizer is not None else (side, side)
    for i, rows in enumerate(rollouts):
        y = 24 + i * (head_h + cell_h)
        head = f"round {rows[0]['round']}  sample {rows[0]['sample_id']}  > {rows[0]['instruction'] or ''}"
        draw.text((PAD // 2, y + 4), textwrap.shorten(head, cell_w * steps // 6, placeholder="..."),
                  fill=(20, 20, 120), font=font)
        for k, r in enumerate(rows):
            x, top = PAD // 2 + k * cell_w, y + head_h
            reward = "" if r.get("reward") is None else f"  reward {r['reward']:.2f}"
            draw.text((x, top), f"step {r['step']}{reward}", fill=(0, 0, 0), font=font)
            draw.text((x, top + 12), f"masked: img {r['image_mask_frac']:.0%} txt {r['text_mask_frac']:.0%}",
                      fill=(90, 90, 90), font=font)
            img = _code_image(r["image_codes"], image_tokenizer, grid).resize((CELL, CELL), Image.Resampling.NEAREST)
            canvas.paste(img, (x, top + 26))
            draw.rectangle([x - 1, top + 25, x + CELL, top + 26 + CELL], outline=(150, 150, 190))  # the image's edge
            lines = textwrap.wrap(r["text"] or "(no text yet: masked or padding)", TEXT_COLS)[:TEXT_LINES]
            for j, line in enumerate(lines):
                draw.text((x, top + 32 + CELL + 11 * j), line, fill=(30, 30, 30), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def pick_rounds(rounds: list[int], most: int = 3) -> list[int]:
    """The first, the last and evenly spaced rounds between them (at most `most`)."""
    rounds = sorted(set(rounds))
    if len(rounds) <= most:
        return rounds
    return sorted({rounds[round(k * (len(rounds) - 1) / (most - 1))] for k in range(most)})


def trajectory_rollouts(root: str, run_id: str, per_round: int = 2, most_rounds: int = 3) -> dict[int, list[list[dict]]]:
    """{round: [rollout rows in step order]} for group member 0 of the first `per_round` prompts of picked rounds."""
    from storage.query import query

    where = f"run_id = {_sql_text(run_id)} AND group_index = 0"
    rounds = pick_rounds(query(root, f"SELECT DISTINCT round FROM trajectories WHERE {where}").column("round").to_pylist(),
                         most_rounds)
    if not rounds:
        return {}
    rows = query(root, "SELECT round, sample_id, step, text, image_codes, text_mask_frac, image_mask_frac, reward, "
                       f"instruction FROM trajectories WHERE {where} AND round IN ({', '.join(map(str, rounds))}) "
                       "ORDER BY round, sample_id, step").to_pylist()
    out: dict[int, dict[str, list[dict]]] = {}
    for r in rows:
        by_sample = out.setdefault(r["round"], {})
        if r["sample_id"] in by_sample or len(by_sample) < per_round:
            by_sample.setdefault(r["sample_id"], []).append(r)
    return {rnd: list(s.values()) for rnd, s in out.items()}


def trajectory_markdown(root: str, run_id: str, out: str, checkpoint: str | None) -> str:
    """Denoising strips of a ParaRL run (PNG per round under out/strips/) as markdown with the images embedded."""
    from tasks.common.generate import load_image_tokenizer

    picked = trajectory_rollouts(root, run_id)
    if not picked:
        return f"## ParaRL {run_id}: denoising trajectories\n\nno trajectories rows for run_id `{run_id}`"
    vq = load_image_tokenizer(checkpoint) if checkpoint else None
    parts = [f"## ParaRL {run_id}: denoising trajectories",
             "Each row is one rollout; each column one recorded denoising step: the partial image (grey = still "
             "masked) above the partial text (masked tokens dropped), with the step's normalised reward."]
    strips = [(f"round {rnd}", strip_png(rollouts, os.path.join(out, "strips", f"{run_id}-round{rnd:05d}.png"),
                                          f"ParaRL {run_id}, round {rnd}", vq)) for rnd, rollouts in sorted(picked.items())]
    parts += embed_pngs(strips)
    return "\n\n".join(parts)
