"""`parapipe` as a user runs it: errors, help, config files and query output (fast, no Prefect start), then
`generate` / `init-tiny` on a tiny random checkpoint and `run` end to end (slow)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from flows.cli import main
from flows.cli_parser import parse
from flows.cli_support import CLIError
from storage.parquet import write_rows
from tasks.common.generate import example_folder_name
from tests.test_query import populate, trace
from tests.test_storage import sample

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
    assert (meta["device"], meta["dtype"]) == (("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32"))
    main([*args, "--out", str(tmp_path / "bf16"), "--device", "cpu", "--dtype", "bfloat16"])  # bf16 weights sample too
    meta = json.loads((tmp_path / "bf16" / "meta.json").read_text())
    assert (meta["device"], meta["dtype"], meta["nfe"]) == ("cpu", "bfloat16", 16)
    assert len((tmp_path / "bf16" / "image_codes.txt").read_text().splitlines()) == 4
    fast = ["--cache", "dual", "--cache-refresh", "2", "--text-threshold", "0.0", "--image-threshold", "0.0",
            "--image-cache-ratio", "0.5"]
    main([*args, "--out", str(tmp_path / "fast"), *fast])  # the fast-sampling options reach the sampler
    meta = json.loads((tmp_path / "fast" / "meta.json").read_text())
    keys = ("cache", "cache_refresh", "text_threshold", "image_threshold", "image_cache_ratio")
    assert {k: meta["sampler"][k] for k in keys} == \
        {"cache": "dual", "cache_refresh": 2, "text_threshold": 0.0, "image_threshold": 0.0, "image_cache_ratio": 0.5}
    assert meta["nfe"] < 16  # threshold 0 commits a whole block / the whole image at once
    code, _, err = run_cli(capsys, *args, "--text-threshold", "1.5")
    assert code == 2 and "text_threshold=1.5 is a probability; use a value in [0, 1]" in err
    code, _, err = run_cli(capsys, *args, "--image-cache-ratio", "0.9")
    assert code == 2 and "image_cache_ratio=0.9 skips image columns of a dual-cache pass; set cache='dual'" in err


def test_inference_device_defaults_and_refusals():
    from tasks.common.generate import inference_device

    want = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    assert inference_device() == want and inference_device("cpu", "bfloat16") == ("cpu", torch.bfloat16)
    assert inference_device("cpu") == ("cpu", torch.float32)  # exact toy figures on cpu
    with pytest.raises(ValueError, match=r"dtype='fp16'; use one of \['auto', 'float32', 'bfloat16'\]"):
        inference_device("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device here; use device='cpu'"):
            inference_device("cuda")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) as the console script runs it: (exit code, stdout, stderr)."""
    try:
        main(list(argv), console=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def lake(tmp_path, monkeypatch) -> str:
    """A root with dataset 'a' (samples, quarantine, traces, trajectories), the working directory a bare tmp dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PARAPIPE_ROOT", raising=False)
    root = str(tmp_path / "lake")
    populate(root)
    write_rows(root, "traces", [trace("s003", "g1", "ok", "word " * 20, 1.0, 20)], run="syn1")
    return root


def test_missing_root_is_an_error_naming_what_exists(lake, tmp_path, capsys):
    (tmp_path / "runs" / "old" / "data" / "samples").mkdir(parents=True)
    for argv in (["query", "--root", "nope", "SELECT * FROM samples_by_source"], ["traces", "--root", "nope"],
                 ["inspect", "--root", "nope"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "", argv
        first = err.splitlines()[0]
        assert first.startswith(f"parapipe {argv[0]}: error: --root 'nope' does not exist; roots found here: "
                                f"{os.path.join('runs', 'old', 'data')}"), first
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "query", "--root", str(tmp_path / "empty"), "SELECT 1")  # a folder, no tables
    assert code == 2 and "holds no ParaPipe tables" in err


def test_missing_checkpoint_lists_make_runs_links_first(lake, tmp_path, capsys):
    ckpt = tmp_path / "runs" / "default" / "sft" / "checkpoints" / "sft-toy-tiny-0123abcd" / "final"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    os.symlink(os.path.relpath(ckpt, ckpt.parents[2]), tmp_path / "runs" / "default" / "sft" / "final")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", "runs/default/sft/checkpoints/sft-toy-tiny/final")
    assert code == 2 and out == ""
    assert [ln for ln in err.splitlines() if "error:" in ln] == [("parapipe eval: error: --checkpoint 'runs/default/sft/checkpoints/sft-toy-tiny/"
                                   "final' does not exist; checkpoints found here: runs/default/sft/final, "
                                   "runs/default/sft/checkpoints/sft-toy-tiny-0123abcd/final")], err


def test_missing_dataset_lists_the_datasets_under_the_root(lake, capsys):
    write_rows(lake, "samples", [sample(9)], run="b")
    code, out, err = run_cli(capsys, "traces", "--root", lake, "--dataset", "c")
    assert code == 2 and out == ""
    assert f"--dataset 'c' is not under --root '{lake}' (datasets under {lake}: a, b)" in err


def test_bad_json_option_is_named_in_one_line_and_debug_shows_the_traceback(lake, capsys):
    code, _, err = run_cli(capsys, "traces", "--root", lake, "--dataset", "a", "--filters", "{min_words: 3")
    assert code == 2
    assert err.splitlines() == ["parapipe traces: error: --filters '{min_words: 3' is not valid JSON (Expecting "
                                "property name enclosed in double quotes at character 1) and is not a file; give a "
                                "JSON object like '{\"key\": 1}' or a path to a .json / .yaml file",
                                "(run again with --debug for the traceback)"]
    code, _, err = run_cli(capsys, "traces", "--root", lake, "--dataset", "a", "--generator", '{"kind": "vlm"}')
    assert code == 2 and "--generator kind 'vlm' is unknown; use one of teacher, vllm, http, ray" in err
    argv = ["traces", "--root", lake, "--dataset", "a", "--filters", "{min_words: 3"]
    with pytest.raises(CLIError, match="--filters"):
        main(argv + ["--debug"], console=True)
    with pytest.raises(ValueError, match="--filters"):  # from Python, errors are exceptions (CLIError is one)
        main(argv)


def test_rl_learner_group_flags_are_checked_before_any_work(lake, tmp_path, capsys):
    main(["init-tiny", "--out", str(tmp_path / "ckpt")])
    rl = ["rl", "--checkpoint", str(tmp_path / "ckpt"), "--root", lake, "--dataset", "a"]
    code, _, err = run_cli(capsys, *rl, "--fsdp")
    assert code == 2 and "--fsdp shards a learner group; add --learner-workers 2 (or more), not 1" in err
    code, _, err = run_cli(capsys, *rl, "--learner-workers", "0")
    assert code == 2 and "--learner-workers 0 must be at least 1" in err


def test_errors_as_the_console_script_prints_them():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "flows.cli", "query", "--root", "does-not-exist", "SELECT 1"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and plain.stdout == "" and "Traceback" not in plain.stderr
    assert len(plain.stderr.splitlines()) == 2 and "--root 'does-not-exist' does not exist" in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("flows.cli_support.CLIError: --root 'does-not-exist'")


def test_version_and_help_show_defaults_and_examples(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("parapipe ")
    code, out, _ = run_cli(capsys, "traces", "--help")
    flat = " ".join(out.split())
    assert code == 0 and "examples:" in out and "parapipe traces --dataset toy-tiny" in out
    assert "samples per generator call (default: 16)" in flat
    from tasks.traces.generators import GENERATOR_KINDS

    assert f"kind is one of {', '.join(GENERATOR_KINDS)}" in flat  # the help names them without importing them
    assert "in seconds (0: after every batch) (default: 10.0)" in flat
    assert "--root ROOT storage root" in flat and "$PARAPIPE_ROOT" in flat
    code, out, _ = run_cli(capsys, "sft", "--help")
    flat = " ".join(out.split())
    assert "checkpoint every N optimiser steps (default: 100)" in flat and "--sft.lr" in flat


def test_default_root_is_said_and_config_files_fill_options(lake, tmp_path, monkeypatch, capsys):
    import flows.cli as cli

    monkeypatch.setenv("PARAPIPE_ROOT", lake)
    a = parse(["traces"], cli)
    assert a.root == lake and capsys.readouterr().err == f"root: {lake} ($PARAPIPE_ROOT)\n"
    monkeypatch.delenv("PARAPIPE_ROOT")
    (tmp_path / "runs" / "default" / "data").mkdir(parents=True)
    assert parse(["query", "SELECT 1"], cli).root == os.path.join("runs", "default", "data")
    cfg = tmp_path / "traces.yaml"
    cfg.write_text("batch_size: 8\ncommit-every-s: 0\ngenerator: {kind: teacher, seed: 3}\n")
    a = parse(["traces", "--config", str(cfg), "--batch-size", "4"], cli)  # the flag wins over the file
    assert (a.batch_size, a.commit_every_s, json.loads(a.generator)) == (4, 0, {"kind": "teacher", "seed": 3})
    cfg.write_text("resize: stretch\n")
    with pytest.raises(CLIError, match="resize='stretch' is not allowed; choose from squash, center_crop"):
        parse(["aggregate", "--config", str(cfg)], cli)
    cfg.write_text(json.dumps({"rounds": 2, "credit": "uniform", "root": lake, "sampler": {"steps": 8}}))
    a = parse(["rl", "--checkpoint", "ckpt", "--config", str(cfg), "--root", "elsewhere"], cli)
    assert (a.rounds, a.root, json.loads(a.sampler), a.rl_fields) == (2, "elsewhere", {"steps": 8},
                                                                      {"credit": "uniform"})
    cfg.write_text("workers: 4\nsft.lr: 0.001\ncategories: [add, remove]\n")
    a = parse(["sft", "--config", str(cfg)], cli)  # recipe fields by their flag names, as the flags' text
    assert (a.workers, getattr(a, "recipe:sft.lr"), getattr(a, "recipe:categories")) == (4, "0.001", "add,remove")
    cfg.write_text("bach_size: 8\n")
    with pytest.raises(CLIError, match=r"\['bach_size'\] are not options of `parapipe traces`"):
        parse(["traces", "--config", str(cfg)], cli)


def test_query_width_formats_and_intervals(lake, capsys):
    sql = "SELECT text FROM traces WHERE sample_id = 's003'"
    cut = run_cli(capsys, "query", "--root", lake, sql)[1].splitlines()[2]
    assert len(cut) == 40 and cut.endswith("…")
    assert run_cli(capsys, "query", "--root", lake, "--width", "12", sql)[1].splitlines()[2] == "word word w…"
    full = run_cli(capsys, "query", "--root", lake, "--max-width", "0", sql)[1]
    assert full.splitlines()[2] == ("word " * 20).strip()
    code, out, _ = run_cli(capsys, "query", "--root", lake, "--format", "csv", "SELECT sample_id, latency_s, text FROM "
                           "traces WHERE generator = 'g1' ORDER BY sample_id")
    assert out.splitlines() == ["sample_id,latency_s,text", "s000,1,abc", "s001,2,abcdefg", "s002,3,",
                                "s003,1,word word word word word word word word word word word word word word word "
                                "word word word word word "]
    sql = ("SELECT INTERVAL 90 SECOND AS a, INTERVAL '1 day 3 hours' AS b, INTERVAL 14 MONTH AS c, "
           "TIMESTAMP '2026-01-01 10:00:00' - TIMESTAMP '2026-01-01 09:58:01.5' AS d")
    assert run_cli(capsys, "query", "--root", lake, sql)[1].splitlines()[2] == \
        "1 min 30 s | 1 d 3 h | 14 mon | 1 min 58.5 s"
    assert json.loads(run_cli(capsys, "query", "--root", lake, "--format", "json", sql)[1]) == [
        {"a": "1 min 30 s", "b": "1 d 3 h", "c": "14 mon", "d": "1 min 58.5 s"}]


def test_example_folder_names_read_as_what_they_hold():
    name = example_folder_name(0, "recolour", "Paint the blue square green!")
    assert name == "00-recolour-paint-the-blue-square-green"
    assert example_folder_name(12, None, "x " * 40, max_chars=9) == "12-x-x-x-x-x"


@pytest.mark.slow
def test_run_pipeline_then_query_and_inspect(tmp_path):
    """`parapipe run` (its own ephemeral Prefect server), then DuckDB over what it wrote."""
    # a relative --out, as `make run` passes: Ray workers run elsewhere, so the flows must resolve it
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    small = tmp_path / "run.yaml"  # every stage, tiny: 1 ParaRL round, 12 benchmark items
    small.write_text("reward_steps: 10\neval_limit: 12\nrl: {rounds: 1, prompts_per_round: 4, group_size: 2, "
                     "norm_min_prompts: 8}\n")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--out", "rel", "--toy-samples", "200", "--sft-steps", "4",
           "--config", str(small)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ParaPipe run finished" in run.stdout and "200 samples" in run.stdout and "Traceback" not in run.stdout
    assert "stages: aggregate ran, fit-reward ran, traces ran, sft ran, pararl ran, evaluate ran" in run.stdout
    table = [ln.split() for ln in run.stdout.splitlines() if ln.startswith(("  SFT (", "  ParaRL ("))]
    assert [t[:2] for t in table] == [["SFT", "(parallel)"], ["SFT", "(sequential)"], ["ParaRL", "(parallel)"],
                                      ["ParaRL", "(sequential)"]]
    assert all(0 <= float(t[-1]) <= 100 for t in table)
    assert "parapipe query --root" in run.stdout and "Started a local Ray instance" not in run.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)  # unchanged inputs: skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stages: aggregate cached, fit-reward cached, traces cached, sft cached, pararl cached, " \
           "evaluate cached" in again.stdout
    tmp_path = tmp_path / "rel"
    # one stable path per stage's final checkpoint, printed in the summary, whatever run id the stage key chose
    for stage, label, made_by in (("sft", "SFT checkpoint", "sft-"), ("rl", "ParaRL checkpoint", "round-")):
        link = tmp_path / stage / "final"
        assert link.is_symlink() and made_by in os.readlink(link) and not os.path.isabs(os.readlink(link))
        assert (link / "config.json").is_file()
        target = os.path.relpath(os.path.realpath(link), tmp_path.parent)
        shown = next(ln for ln in again.stdout.splitlines() if ln.startswith(f"  {label}"))
        assert shown.split(None, 2)[2] == f"rel/{stage}/final (-> {target})", shown
    from tasks.common.generate import recorded_sampler
    from tasks.sft.recipe import PRESETS

    sampler, source = recorded_sampler(str(tmp_path / "sft" / "final"))  # what `parapipe generate` samples with
    assert sampler == PRESETS["toy-tiny"].sampler and source.startswith("recorded in"), (sampler, source)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eval_limit"] == 12 and config["rl"]["rounds"] == 1 and config["sft_steps"] == 4
    examples = sorted((tmp_path / "examples").iterdir())
    assert len(examples) == 4 and examples[0].name.startswith("00-")
    for ex in examples:
        files = {p.name for p in ex.iterdir()}
        assert {"input.png", "target.png", "model_output.png", "text.txt", "meta.json"} <= files
        assert (ex / "text.txt").read_text().startswith("instruction:\n")
        assert json.loads((ex / "meta.json").read_text())["sampler"]["text_block_length"] is not None
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
    rows = con.sql("SELECT end_time > start_time, timings_json FROM runs WHERE stage = 'pipeline' "
                   "ORDER BY start_time").fetchall()
    assert [r[0] for r in rows] == [True, True]
    first, second = (json.loads(r[1]) for r in rows)
    per_stage = dict(con.sql("SELECT stage, count(*) FROM runs WHERE end_time >= start_time AND timings_json "
                             "NOT LIKE '%\"error\"%' GROUP BY stage").fetchall())
    assert per_stage == {"aggregate": 1, "traces": 1, "sft": 1, "rl": 1, "eval": 1, "pipeline": 2}  # cached: no row
    sft_row = json.loads(con.sql("SELECT timings_json FROM runs WHERE stage = 'sft'").fetchall()[0][0])
    assert sft_row["fit_s"] > 0 and sft_row["seconds"] >= sft_row["fit_s"] + sft_row["prepare_s"]
    stages = ["aggregate", "fit-reward", "traces", "sft", "pararl", "evaluate"]
    assert list(first) == stages and {v["state"] for v in first.values()} == {"ran"}
    assert {v["state"] for v in second.values()} == {"cached"} and all(v["seconds"] >= 0 for v in second.values())
    overall = con.sql("SELECT count(*) FROM eval_results WHERE metric = 'overall/overall'").fetchall()
    assert overall == [(4,)]  # SFT and ParaRL, parallel and sequential
    session = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", "--root", root],
                             input="SELECT count(*) AS n FROM quarantine;\n.quit\n", capture_output=True, text=True)
    assert session.returncode == 0 and "0" in session.stdout


def test_generate_defaults_to_the_checkpoint_sampler_and_warns_on_departures(tmp_path, capsys):
    import argparse

    from flows.cli import ONE_BLOCK, _sampler_config
    from model.sampling import SamplerConfig
    from tasks.common.generate import sampler_meta

    flags = dict(settings=None, steps=None, image_steps=None, block_length=None, text_cfg=None, image_cfg=None,
                 text_temperature=None, image_temperature=None, text_length=None, mode="parallel", cache=None,
                 cache_refresh=None, text_threshold=None, image_threshold=None, image_cache_ratio=None)
    ours = {"steps": 20, "image_steps": 10, "text_block_length": 32, "text_temperature": 0.0,
            "image_temperature": 0.0, "image_noise": 0.0}
    for name, extra in (("recorded", {"parapipe_sampler": ours}), ("older", {"parapipe_sequence": {"text_tokens": 32}}),
                        ("released", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"d_model": 8, **extra}))
    for name in ("recorded", "older"):  # the SFT recipes' evaluation sampler: greedy, one block per text
        sampler, text_tokens = _sampler_config(argparse.Namespace(checkpoint=str(tmp_path / name), **flags))
        assert (sampler.steps, sampler.image_steps, sampler.text_block_length, sampler.image_temperature,
                text_tokens) == (20, 10, 32, 0.0, None), name
    assert "warning" not in capsys.readouterr().err
    a = argparse.Namespace(checkpoint=str(tmp_path / "recorded"), **{**flags, "steps": 32, "image_temperature": 1.0})
    sampler, _ = _sampler_config(a)
    err = capsys.readouterr().err
    assert (sampler.steps, sampler.image_temperature) == (32, 1.0)
    assert "warning: --steps 32 departs from the sampler" in err and "(steps=20)" in err
    assert "warning: --image-temperature 1.0 departs" in err and "(image_temperature=0.0)" in err
    sampler, _ = _sampler_config(argparse.Namespace(checkpoint=str(tmp_path / "released"), **flags))
    assert (sampler.steps, sampler.text_block_length, sampler.image_temperature) == (32, ONE_BLOCK, 1.0)
    assert sampler_meta(sampler)["text_block_length"] is None  # meta.json: null, the whole text is one block
    assert sampler_meta(SamplerConfig(text_block_length=8))["text_block_length"] == 8


def test_run_summary_says_scores_outputs_and_how_to_look():
    from flows.cli_support import format_summary
    from flows.pipeline import summary_text

    row = {"text_quality": 90.0, "text_alignment": 40.0, "image_consistency": 99.0, "image_alignment": 70.0,
           "image_quality": 100.0, "output_alignment": 35.5, "overall": 72.4}
    text = summary_text({"out": "/w/runs/x", "root": "/w/runs/x/data", "samples": 2000, "quarantined": 0,
                         "config": "/w/runs/x/config.json", "stages": {"aggregate": "cached", "sft": "ran"},
                         "seconds": {"aggregate": 0.4, "sft": 612.0},
                         "traces": {"pending": 2000, "ok": 1990, "failed": 10, "filtered": 0, "without_trace": 10},
                         "sft": {"checkpoint": "/w/runs/x/sft/final",
                                 "eval": {"text_correct": {"overall": {"model": 0.4}}}},
                         "rl": {"checkpoint": "/w/runs/x/rl/round-00007"}, "flow_run_id": "abc",
                         "eval": {"items": 300, "table": {"sft/final (parallel)": row, "rl/round-00007 (sequential)": row},
                                  "reports": ["/w/runs/x/eval/metrics.png"]}})
    lines = text.splitlines()
    assert lines[1] == "stages: aggregate cached, sft ran"
    assert lines[2] == "minutes per stage: aggregate 0.0, sft 10.2"
    assert ("2000 samples, 0 quarantined; traces: 1990 of 2000 samples have one; this run wrote ok 1990, failed 10"
            in lines)
    assert any(ln.startswith("  ParaRL (sequential)") for ln in lines)
    assert any(ln.startswith("  SFT (parallel)") and ln.split()[-1] == "72.4" and "35.5" in ln for ln in lines)
    assert "SFT held-out check: reasoning text right 40% of the time" in lines
    assert "  ParaRL checkpoint  /w/runs/x/rl/round-00007" in lines
    assert any("parapipe query --root /w/runs/x/data" in ln for ln in lines)
    assert lines[-1].endswith("http://127.0.0.1:4200/runs/flow-run/abc")
    assert format_summary({"seconds": 1.3569398350000483, "samples_per_s": 154.2, "quarantine_reasons": {},
                           "by_split": {"train": 1800}}).splitlines() == [
        "seconds:            1.36 s", "samples per s:      154", "quarantine reasons: none", "by split:",
        "  train: 1,800"]
