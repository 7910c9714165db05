"""`parapipe generate` / `init-tiny` / `run` end to end on a tiny random checkpoint."""
import json
import subprocess
import sys

from flows.cli import main


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


def test_console_script_runs(tmp_path):
    exe = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--out", str(tmp_path), "--steps", "8",
                          "--image-steps", "4", "--text-length", "16", "--block-length", "16"],
                         capture_output=True, text=True)
    assert exe.returncode == 0, exe.stderr
    assert "run finished" in exe.stdout
    assert (tmp_path / "generate" / "meta.json").exists()
