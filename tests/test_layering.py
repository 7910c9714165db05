"""model/ stays pure torch; heavy libraries are imported lazily."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "prefect", "vllm", "duckdb", "pyarrow", "open_clip", "numpy", "PIL", "transformers"}


def _top_level_imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_model_package_imports_only_torch_and_stdlib():
    files = sorted((ROOT / "model").glob("*.py"))
    assert len(files) >= 6
    for f in files:
        bad = _top_level_imports(f) & FORBIDDEN
        assert not bad, f"{f.name} imports {bad}; model/ must stay pure torch"


def test_importing_model_and_cli_does_not_pull_heavy_libraries():
    code = ("import sys, model.sampling, model.diffusion, model.checkpoint, flows.cli; "
            "print(sorted(m for m in ('ray','vllm','open_clip','prefect','duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
