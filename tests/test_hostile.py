"""Hostile and broken inputs (tests/hostile_corpus.py) across every source format.

The ingestion runs in a subprocess under a wall-clock timeout and an address-space limit, with an audit hook that
records every file it opens: no source may crash or stall the run, every bad record gets its own quarantine row with
a reason and a detail naming the file, nothing outside a source's root is opened (unless the source opts in), what a
user expects to be normalised is (BOM, EXIF, 16-bit, transparency, GIF), counts reconcile per source and a second run
changes nothing.
"""
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.aggregate import check_sources
from storage.parquet import read_table
from tests.hostile_corpus import build

CURATE = dict(resolution=32, resize="squash", min_side=16, max_aspect=3.0, near_duplicate_bits=2)
TOY = {"type": "toy", "name": "toy", "preset": "tiny", "n": 10, "seed": 1}
TIMEOUT_S = 120
RUNNER = r"""
import json, os, resource, sys
args = json.load(open(sys.argv[1]))
limit = 6 << 30  # /dev/zero read to the end would hit this instead of the machine's memory
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
opened = []
def audit(event, a):
    if event == "open" and isinstance(a[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(a[0])
        if path.startswith((args["tmp"], "/dev/")):
            opened.append(path)
sys.addaudithook(audit)
import tasks.aggregate.aggregate as agg
stats = [agg.ingest_source.fn(s, args["lake"], "hostile", args["curate"]) for s in args["sources"]]
result = {"stats": stats, "opened": list(opened)}  # before opening the output file
json.dump(result, open(sys.argv[2], "w"))
"""


def _run(tmp: Path, sources: list[dict], tag: str) -> dict:
    args, out = tmp / f"args-{tag}.json", tmp / f"out-{tag}.json"
    args.write_text(json.dumps({"tmp": str(tmp), "lake": str(tmp / "lake"), "curate": CURATE, "sources": sources}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(args), str(out)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    result["seconds"] = time.perf_counter() - t0
    return result


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _lake(tmp: Path) -> tuple[dict, dict]:
    quarantine = read_table(str(tmp / "lake"), "quarantine").to_pylist()
    keys = Counter((q["source"], q["source_ref"]) for q in quarantine)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]  # one row per bad record
    samples = {(s["source"], json.loads(s["extra_json"])["source_ref"]): s
               for s in read_table(str(tmp / "lake"), "samples").to_pylist()}
    return {(q["source"], q["source_ref"]): q for q in quarantine}, samples


def _check_outcomes(expected: dict, quarantine: dict, samples: dict) -> None:
    assert {k for k, c in expected.items() if c.reason} == {k for k in quarantine if k[0] != "toy"}
    assert {k for k, c in expected.items() if not c.reason} == {k for k in samples if k[0] != "toy"}
    for key, case in expected.items():
        if case.reason:
            q = quarantine[key]
            assert (q["reason"], case.mention in q["detail"]) == (case.reason, True), (key, q["detail"])
            assert "<_io." not in q["detail"] and " at 0x" not in q["detail"], q["detail"]
            assert re.fullmatch(r"manifest\.jsonl:\d+|[a-l]/[\w.]+(:[\w/]+(#\d+)?|:\d+)?", q["source_ref"]), key


def _check_normalised(samples: dict) -> None:
    by_instruction = {s["instruction"]: s for s in samples.values()}
    assert {"bom first line", "wds bom text", "pq binary prompt"} <= set(by_instruction)
    assert (_pixels(by_instruction["normalise grey16.png"]["output_image"]) == 156).all()  # 40000 / 257, not 255
    exif = _pixels(by_instruction["normalise exif.jpg"]["output_image"])  # stored left red / right blue
    assert exif[2, 16, 0] > 200 > exif[2, 16, 2] and exif[29, 16, 2] > 200 > exif[29, 16, 0]  # upright: top/bottom
    for name, opaque in (("palette.png", (0, 200, 0)), ("la.png", (30, 30, 30))):
        px = _pixels(by_instruction[f"normalise {name}"]["output_image"])
        assert (px[:, :14] == 255).all() and (abs(px[:, 18:] - opaque) <= 2).all(), name  # transparent -> white
    for instruction in ("gif input", "wds gif input", "pq struct path"):
        assert by_instruction[instruction]["kind"] == "edit", instruction
    assert by_instruction["make it red"]["reference_trace"] == "red."


def test_hostile_corpus_quarantined_record_by_record_and_rerun_idempotent(tmp_path):
    sources, expected, forbidden = build(tmp_path)
    sources.append(TOY)
    first = _run(tmp_path, sources, "1")
    quarantine, samples = _lake(tmp_path)
    _check_outcomes(expected, quarantine, samples)
    _check_normalised(samples)
    per_source = Counter(src for src, _ in expected)
    bad = Counter(src for (src, _), c in expected.items() if c.reason)
    for s in first["stats"]:
        assert s["read"] == s["accepted"] + s["already_present"] + s["quarantined"], s
        if s["source"] != "toy":
            assert (s["read"], s["quarantined"], s["already_present"]) == (per_source[s["source"]], bad[s["source"]], 0)
        else:
            assert s["accepted"] == s["read"] > 0
    roots = [str(tmp_path / d) + os.sep for d in ("jsonl", "jsonl-open", "jsonl-empty", "parquet", "wds", "lake")]
    allowed_outside = str(tmp_path / "outside" / "shared.png")  # only jsonl-open, which opts in, reads it
    leaks = [p for p in first["opened"] if not p.startswith(tuple(roots)) and p != allowed_outside]
    assert not leaks and not set(forbidden) & set(first["opened"]), leaks
    assert allowed_outside in first["opened"]

    second = _run(tmp_path, sources, "2")
    for a, b in zip(first["stats"], second["stats"]):
        assert (b["read"], b["accepted"], b["already_present"], b["quarantined"]) == \
            (a["read"], 0, a["accepted"], a["quarantined"]), (a, b)
    again_q, again_s = _lake(tmp_path)
    assert again_q.keys() == quarantine.keys() and again_s.keys() == samples.keys()
    print(f"hostile corpus: {len(expected)} records in 5 sources + toy, {sum(bad.values())} quarantined, "
          f"{len(expected) - sum(bad.values())} accepted; runs {first['seconds']:.1f} s and {second['seconds']:.1f} s")


def test_broken_configuration_fails_before_any_source_is_read(tmp_path):
    (tmp_path / "manifest.jsonl").write_text("")
    ok = {"type": "jsonl", "name": "a", "path": str(tmp_path)}
    check_sources([ok, TOY])
    cases = [([ok, {**ok}], ValueError, "named more than once"),
             ([{"type": "jsonl", "name": "b", "path": str(tmp_path / "nowhere")}], FileNotFoundError, "no manifest"),
             ([{"type": "parquet", "name": "p", "path": str(tmp_path / "*.parquet")}], FileNotFoundError,
              "no .parquet"),
             ([{**TOY, "preset": "huge"}], ValueError, "toy preset 'huge'"),
             ([{**ok, "allow_outside": True}], ValueError, "unknown keys"),
             ([{**ok, "allow_outside_root": "yes"}], ValueError, "use true or false"),
             ([{"type": "parquet", "name": "p", "path": str(tmp_path), "columns": {"prompt": "text"}}], ValueError,
              "unknown fields \\['prompt'\\]")]
    for sources, error, message in cases:
        with pytest.raises(error, match=message):
            check_sources(sources)
