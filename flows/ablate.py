"""`ablate`: the paper's ablation tables, one command each, on the same benchmark and seed.

    decoding       Table 3: one checkpoint, parallel vs sequential decoding
    sft-vs-rl      Table 2: the SFT checkpoint vs ParaRL from it (trajectory reward, K = 3)
    reward-level   Table 4: trajectory-level vs output-level reward
    sampled-steps  Table 5: ParaRL with K sampled steps for each K in `ks`

study -> the ParaRL arms it needs (flows/pararl.py; run ids `{run_id}-{arm}`, so a re-run resumes each
arm) -> every checkpoint scored side by side by flows/evaluate.py (Table 2 layout, a metric chart and
sample grids under `{out}/{study}/`) -> a markdown artifact naming what each arm changed.
"""
import os

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.evaluate import TOY_BENCHMARK, evaluate
from flows.pararl import pararl

STUDIES = ("decoding", "sft-vs-rl", "reward-level", "sampled-steps")


def arms(study: str, ks: list[int]) -> dict[str, dict]:
    """ParaRL config overrides per arm of a study ({} for decoding: no training)."""
    if study == "decoding":
        return {}
    if study == "sft-vs-rl":
        return {"rl": {}}
    if study == "reward-level":
        return {"trajectory": {"reward_mode": "trajectory"}, "output": {"reward_mode": "output"}}
    if study == "sampled-steps":
        return {f"k{k}": {"sampled_steps": k} for k in ks}
    raise ValueError(f"study={study!r}; choose one of {', '.join(STUDIES)}")


@flow(name="ablate", log_prints=True)
def ablate(study: str, checkpoint: str, root: str = "data", dataset: str = "toy-tiny", out: str = "runs/ablations",
           run_id: str = "ablation", rl: dict | None = None, ks: list[int] = (1, 3, 5),
           benchmark: str = TOY_BENCHMARK, judge: str = "exact", limit: int | None = None, seed: int = 0,
           clip_folder: str | None = None, sampler: dict | None = None) -> dict:
    plan = arms(study, list(ks))  # a bad study fails here, before any work
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise ValueError(f"checkpoint={checkpoint!r} is not a checkpoint folder (no config.json)")
    folder = os.path.abspath(os.path.join(out, study))
    trained = {}
    for arm, overrides in plan.items():
        result = pararl(checkpoint=checkpoint, root=root, dataset=dataset, out=os.path.join(folder, "rl"),
                        run_id=f"{run_id}-{study}-{arm}", config={**(rl or {}), **overrides}, clip_folder=clip_folder,
                        sampler=sampler)
        trained[arm] = result["checkpoint"]
    modes = ["parallel", "sequential"] if study == "decoding" else ["parallel"]
    report = evaluate(checkpoints=[checkpoint, *trained.values()], benchmark=benchmark, root=root,
                      run_id=f"{run_id}-{study}", modes=modes, judge=judge, seed=seed, limit=limit,
                      report_dir=folder, sampler=sampler)
    arms_md = "\n".join(f"- `{arm}`: ParaRL with `{ {**(rl or {}), **o} }` -> `{trained[arm]}`"
                        for arm, o in plan.items()) or "- no training: one checkpoint, two decoding modes"
    create_markdown_artifact(f"# ablation {study}\n\nstarting checkpoint `{checkpoint}`\n\n{arms_md}\n\n"
                             + report["markdown"], key=f"ablation-{run_id}-{study}".lower().replace("_", "-")[:100])
    return {"study": study, "checkpoints": {"start": checkpoint, **trained}, "items": report["items"],
            "table": {name: r["table"]["overall"] for name, r in report["results"].items()},
            "reports": report["reports"], "markdown": report["markdown"]}
