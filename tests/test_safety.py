"""Safety of what is loaded and logged: no pickles, no remote code unless asked, no S3 secret anywhere.

- An AST scan of the package (every .py outside .venv / runs): no `weights_only=False`, no torch.load
  without `weights_only=True`, no `pickle.load(s)`, no `trust_remote_code=True`.
- What ParaPipe saves with torch.save (tokenised sets, SFT train state, RL learner state) loads with
  weights_only=True; the toy scenes are JSON.
- A user's S3-rooted run through the CLI against the real SeaweedFS server, with the credentials in
  the environment as a user sets them: the secret key is in no output, log line, error, traceback,
  stored object or Prefect record (its database holds flow parameters, artifacts and logs).
"""
import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.s3server import s3_root, s3_server  # noqa: F401  (pytest fixtures)

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "runs", ".git", "node_modules", "build", "dist", "data"}


def _package_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return out


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_calls(source: str) -> list[str]:
    """Descriptions of unsafe loads / remote-code switches in one file's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        weights_only = _keyword(node, "weights_only")
        if isinstance(weights_only, ast.Constant) and weights_only.value is False:
            found.append(f"line {node.lineno}: weights_only=False")
        elif name.endswith("torch.load") and not (isinstance(weights_only, ast.Constant) and weights_only.value):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load"):
            found.append(f"line {node.lineno}: {name}")
        remote = _keyword(node, "trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is True:
            found.append(f"line {node.lineno}: trust_remote_code=True")
    return found


def test_the_scanner_finds_each_kind_of_unsafe_call():
    bad = ("import pickle, torch\ntorch.load(p, weights_only=False)\ntorch.load(p)\npickle.loads(b)\n"
           "AutoModel.from_pretrained(m, trust_remote_code=True)\n")
    assert len(unsafe_calls(bad)) == 4
    assert unsafe_calls("torch.load(p, map_location='cpu', weights_only=True)\nf(trust_remote_code=spec.x)\n") == []


def test_nothing_in_the_package_loads_a_pickle_or_runs_remote_code():
    files = _package_files()
    assert len(files) > 50 and any(f.name == "sft.py" for f in files)
    problems = {str(f.relative_to(REPO)): found for f in files if (found := unsafe_calls(f.read_text()))}
    assert problems == {}


def test_trust_remote_code_is_off_unless_asked():
    from tasks.traces.generators import GeneratorSpec

    assert GeneratorSpec().trust_remote_code is False
    spec = GeneratorSpec(kind="vllm", model="/does/not/exist")
    assert spec.engine_kwargs()["trust_remote_code"] is False
    asked = GeneratorSpec(**{"kind": "vllm", "model": "/x", "trust_remote_code": True})  # a user asking for it
    assert asked.engine_kwargs()["trust_remote_code"] is True


def test_what_parapipe_saves_loads_with_weights_only(tmp_path):
    from rl.grpo import RewardStats
    from rl.learner import RLConfig
    from tasks.sft.sft import load_scenes, load_set, save_scenes, save_set
    from tasks.sft.sft_data import TokenisedSet
    from tasks.sft.sft_loop import SFTConfig, make_optimizer
    from tasks.sft.toy_eval import toy_scenes
    from tasks.toy.scene import PRESETS
    from tasks.toy.tasks import sample_tasks

    data = TokenisedSet(["a", "b"], ["edit", "generate"], ["recolour", "other"], ["train", "train"], [[1, 2], None],
                        [[3], [4, 5]], [[6, 7], [8, 9]], dropped={"too_long": 1})
    assert load_set(save_set(data, str(tmp_path / "set.pt"))) == data
    tasks = sample_tasks(PRESETS["tiny"], 3, "val", seed=0)
    rows = [{"sample_id": f"s{i}", "extra_json": json.dumps({"toy": t.to_dict()})} for i, t in enumerate(tasks)]
    assert load_scenes(save_scenes(rows, str(tmp_path / "scenes.json"))) == toy_scenes(rows)
    # SFT's train_state.pt and ParaRL's learner_state.pt: an AdamW state dict, numbers and plain dicts
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    sft = SFTConfig()
    optimizer = make_optimizer(model, sft)
    model(torch.arange(3)).sum().backward()
    optimizer.step()
    torch.save({"optimizer": optimizer.state_dict(), "step": 3, "sft": dataclasses.asdict(sft)}, tmp_path / "t.pt")
    state = torch.load(tmp_path / "t.pt", weights_only=True)
    assert state["step"] == 3 and len(state["optimizer"]["state"]) == 3
    torch.save({"optimizer": optimizer.state_dict(), "round": 1, "stats": RewardStats(0.5, 0.1).__dict__,
                "config": RLConfig().to_dict(), "start": "ckpt"}, tmp_path / "l.pt")
    assert torch.load(tmp_path / "l.pt", weights_only=True)["config"] == RLConfig().to_dict()


def test_s3_config_never_shows_the_secret():
    from storage.fs import S3Config

    cfg = S3Config(endpoint="http://127.0.0.1:1", access_key="AKIAFAKE", secret_key="sEcReT-never-print-me")
    assert "sEcReT-never-print-me" not in repr(cfg) and "sEcReT-never-print-me" not in str(cfg)


@pytest.mark.slow
def test_an_s3_rooted_run_never_shows_the_secret(s3_server, s3_root, tmp_path):
    secret = s3_server.secret_key
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(s3_server.env(), PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_LOGGING_TO_API_ENABLED="true",
               PARAPIPE_DEBUG="1")  # tracebacks in full: they must not carry the secret either
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps([{"type": "toy", "name": "toy", "preset": "tiny", "n": 12, "seed": 1}]))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                              timeout=600)

    runs = [cli("aggregate", "--sources", str(sources), "--root", s3_root, "--dataset", "d"),
            cli("traces", "--root", s3_root, "--dataset", "d", "--generator", '{"kind": "teacher"}'),
            cli("query", "--root", s3_root, "SELECT * FROM trace_stats")]
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-2000:] for r in runs]
    assert "n_ok" in runs[2].stdout and "(1 rows)" in runs[2].stdout
    # errors: a bucket that does not exist, and a wrong secret (the server's error text comes back)
    missing = cli("query", "--root", "s3://no-such-bucket-parapipe/x", "SELECT * FROM trace_stats")
    env["AWS_SECRET_ACCESS_KEY"] = secret + "-but-wrong"
    wrong = cli("traces", "--root", s3_root, "--dataset", "d", "--generator", '{"kind": "teacher", "seed": 9}')
    assert wrong.returncode != 0
    outputs = "".join(r.stdout + r.stderr for r in [*runs, missing, wrong])
    assert "Traceback" in wrong.stdout + wrong.stderr  # --debug: the whole traceback was printed
    assert secret not in outputs
    # every object the runs stored, and every file Prefect wrote (database, results, logs)
    client = s3_server.client()
    prefix = s3_root.removeprefix(f"s3://{s3_server.bucket}/")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]]
    assert any(k.endswith(".parquet") for k in keys) and any("traces" in k for k in keys)
    for key in keys:
        assert secret.encode() not in client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read(), key
    from storage.parquet import read_table
    from storage.schema import TABLES

    for table in TABLES:  # decoded, in case a compressed page hides it from the byte scan
        assert secret not in str(read_table(s3_root, table, s3=s3_server.config()).to_pylist()), table
    prefect_files = [p for p in (tmp_path / "prefect").rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in prefect_files)
    for path in prefect_files:
        assert secret.encode() not in path.read_bytes(), path
