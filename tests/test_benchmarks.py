"""The sampler benchmarks run on a trained toy checkpoint of one edit family (as make run's is) and
their exact rows are exact: a benchmark that crashes or mislabels is only found by the next person."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> str:
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_sampler_benchmark_toy_table_and_drift(sft_checkpoint):
    _, ckpt, _ = sft_checkpoint
    import benchmarks.sampler as bench

    keep = {"exact: batched, CFG rows joined, idle steps skipped", "approx: dual 4 + text & image threshold 0.9"}
    out = _run("benchmarks/sampler.py", "--checkpoint", ckpt, "--items", "6", "--batch", "3", "--skip-speed",
               "--threads", "1", "--toy-repeats", "2", "--modes", *sorted(keep))
    assert "each the fastest of 2 runs" in out, out
    left_out = re.search(r"(\d+) of 300 toy ParaBench items do not fit", out)
    assert left_out and 0 < int(left_out.group(1)) < 300, out  # three edit families: the others are left out
    assert re.search(r"toy ParaBench 6 of \d+ items", out), out
    exact = next(ln for ln in out.splitlines() if ln.startswith("exact: batched"))
    assert re.search(r"\+0\.0\s+\+0\.0 100\.0% of rows$", exact), exact  # same OA, TQ and tokens as upstream's
    assert not any(m[0] in out for m in bench.MODES if m[0] not in keep), out  # --modes keeps only those
    assert "approx: dual 4 + text & image threshold 0.9" in out
    drift = out[out.index("## drift"):]
    assert re.search(r"exact \(no cache\)\s+0\.00e\+00\s+0\.00e\+00\s+0\.00%", drift), drift
    assert re.search(r"text & image threshold 0\.9\s+0\.00e\+00\s+0\.00e\+00", drift), drift  # replay stays exact


def test_sampler_benchmark_names_a_wrong_checkpoint_path(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/sampler.py", "--checkpoint", str(tmp_path / "nope"),
                           "--skip-speed"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"--checkpoint '{tmp_path / 'nope'}': no config.json there" in done.stderr, done.stderr
