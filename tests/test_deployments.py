"""prefect.yaml: every deployment points at a real flow and its parameters validate against it."""
import pathlib

import yaml
from prefect.flows import load_flow_from_entrypoint

from model.sampling import SamplerConfig
from rl.learner import RLConfig
from tasks.generators import GeneratorSpec
from tasks.sources import SourceSpec
from tasks.traces import FilterConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_deployments_resolve_and_parameters_validate(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = spec["deployments"]
    assert len(deployments) >= 2
    for d in deployments:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        params = flow.validate_parameters(d.get("parameters", {}))
        for source in params.get("sources") or []:
            SourceSpec.from_dict(source)  # raises on an unknown key or type
        if params.get("generator"):
            GeneratorSpec(**params["generator"])
        if params.get("filters"):
            FilterConfig(**params["filters"])
        if d["entrypoint"].startswith("flows/pararl.py"):
            RLConfig(**params.get("config") or {})
            SamplerConfig(**params.get("sampler") or {})
        assert d["work_pool"]["name"]
