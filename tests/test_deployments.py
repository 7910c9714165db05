"""prefect.yaml: every deployment points at a real flow and its parameters validate against it; every
flow has one; pools, schedules and the pull step are what flows.deploy provides. (tests/test_prefect_server.py
deploys one of them to a real server and runs it through a worker.)"""
import os
import pathlib

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

from flows.deploy import HOME_VAR, POOLS, enter_home
from model.sampling import SamplerConfig
from rl.learner import RLConfig
from tasks.aggregate.sources import SourceSpec
from tasks.traces.generators import GeneratorSpec
from tasks.traces.traces import FilterConfig

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


FLOWS = ("aggregate", "traces", "sft", "pararl", "evaluate", "pipeline")


def test_every_flow_has_a_deployment_on_a_known_pool_with_valid_schedules():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = spec["deployments"]
    names = [d["name"] for d in deployments]
    assert len(names) == len(set(names)), f"deployment names repeat: {names}"
    assert {d["entrypoint"] for d in deployments} >= {f"flows/{f}.py:{f}" for f in FLOWS}
    assert {d["work_pool"]["name"] for d in deployments} == set(POOLS)
    assert spec["pull"] == [{"flows.deploy.enter_home": {}}]
    crons = {}
    for d in deployments:
        for s in d.get("schedules") or []:
            CronSchedule(cron=s["cron"], timezone=s["timezone"])  # raises on a bad cron or time zone
            crons[d["name"]] = (s["cron"], s.get("active", True))
    # nightly aggregation and traces (traces after aggregation), weekly RL; GPU schedules wait for a GPU worker
    assert crons["aggregate-toy-nightly"] == ("0 3 * * *", True)
    assert crons["traces-toy-nightly"] == ("30 3 * * *", True)
    assert crons["pararl-toy-weekly"] == ("0 4 * * 0", True)
    assert all(not crons[d["name"]][1] for d in deployments
               if d["work_pool"]["name"] == "parapipe-gpu" and d["name"] in crons)
    pipeline = next(d for d in deployments if d["entrypoint"] == "flows/pipeline.py:pipeline")
    assert pipeline["parameters"] == {"config": {"out": "runs/default", "dataset": "toy-tiny"}}


def test_pull_step_enters_parapipe_home_or_this_checkout(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(HOME_VAR, raising=False)
    assert enter_home() == {"directory": str(ROOT)} and os.getcwd() == str(ROOT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(HOME_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{HOME_VAR}=.*not a ParaPipe checkout.*prefect worker start"):
        enter_home()
    assert os.getcwd() == str(tmp_path)
