"""`parapipe generate` / `init-tiny` / `run` end to end on a tiny random checkpoint."""
import json
import os
import pathlib
import subprocess

import pytest
import sys

from flows.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generate_from_a_tiny_checkpoint(tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    main(["init-tiny", "--out", str(ckpt), "--seed", "1"])
    assert (ckpt / "config.json").exists() and (ckpt / "tokenizer.json").exists()
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "turn the red circle blue", "--out", str(out),
            "--steps", "8", "--image-steps", "4", "--text-length", "16", "--block-length", "8", "--seed", "3",
            "--text-cfg", "0.5"]
    main(args)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["nfe"] == 16 and meta["grid"] == [4, 4]
    grid = [[int(c) for c in line.split()] for line in (out / "image_codes.txt").read_text().splitlines()]
    assert len(grid) == 4 and all(len(r) == 4 and all(0 <= c < 16 for c in r) for r in grid)
    text = (out / "text.txt").read_text()
    main(args)  # same seed, same files
    assert (out / "text.txt").read_text() == text
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_run_pipeline_then_query_and_inspect(tmp_path):
    """`parapipe run` (its own ephemeral Prefect server), then DuckDB over what it wrote."""
    # a relative --out, as `make run` passes: Ray workers run elsewhere, so the flows must resolve it
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--out", "rel", "--toy-samples", "200",
                          "--sft-steps", "4"], capture_output=True, text=True, cwd=tmp_path, env=env)
    tmp_path = tmp_path / "rel"
    assert run.returncode == 0, run.stderr[-3000:]
    assert "run finished" in run.stdout and "200 samples" in run.stdout and "held-out exact" in run.stdout
    examples = sorted((tmp_path / "examples").iterdir())
    assert len(examples) == 4
    for ex in examples:
        assert {"image.png", "text.txt", "meta.json", "input_image.png", "output_image.png"} <= \
            {p.name for p in ex.iterdir()}
    root = str(tmp_path / "data")
    q = subprocess.run([sys.executable, "-m", "flows.cli", "query", "--root", root,
                        "SELECT split, sum(n) AS n FROM samples_by_source GROUP BY split ORDER BY split"],
                       capture_output=True, text=True, check=True)
    counts = {line.split("|")[0].strip(): int(line.split("|")[1]) for line in q.stdout.splitlines()[2:-1]}
    assert counts == {"test": 10, "train": 180, "val": 10}
    sql = tmp_path / "views.sql"
    subprocess.run([sys.executable, "-m", "flows.cli", "inspect", "--root", root, "--write-sql", str(sql)],
                   check=True, capture_output=True)
    import duckdb

    con = duckdb.connect()
    con.execute(sql.read_text())
    assert con.sql("SELECT count(*) FROM samples").fetchall() == [(200,)]
    assert con.sql("SELECT count(*) FROM train_metrics").fetchall() == [(4,)]
    session = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", "--root", root],
                             input="SELECT count(*) AS n FROM quarantine;\n.quit\n", capture_output=True, text=True)
    assert session.returncode == 0 and "0" in session.stdout
