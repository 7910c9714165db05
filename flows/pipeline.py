"""`pipeline`: the whole ParaPipe job on one dataset, stage by stage.

aggregate -> reasoning traces (the toy teacher by default) -> SFT on Ray Train (fits the image
tokenizer, trains, scores the final checkpoint on held-out edits next to two baselines) ->
generate reasoning + images for a few held-out edits with the trained checkpoint.
The embedded default is the toy world's tiny preset on local storage.
"""
import os

from prefect import flow, task

from flows.aggregate import aggregate
from flows.sft import sft
from flows.traces import traces
from model.sampling import SamplerConfig
from tasks.generate import generate_examples_fn
from tasks.recipe import PRESETS

generate_examples = task(generate_examples_fn, name="generate-examples")


@flow(name="pipeline", log_prints=True)
def pipeline(out: str = "runs/default", dataset: str = "toy-tiny", toy_samples: int | None = None, seed: int = 0,
             sft_steps: int | None = None, num_workers: int = 2, examples: int = 4) -> dict:
    root = os.path.join(out, "data")
    recipe = PRESETS["toy-tiny"]
    n = toy_samples or recipe.toy_samples
    # the toy recipe trains the categories it can learn on 2 cores in ~15 minutes (see tasks/sft_loop.py)
    sources = [{"type": "toy", "name": dataset, "preset": "tiny", "n": n, "seed": seed,
                "categories": list(recipe.categories or [])}]
    summary = aggregate(sources=sources, root=root, dataset=dataset, resolution=32)
    trace_stats = traces(root=root, dataset=dataset, generator={"kind": "teacher", "seed": seed})
    trained = sft(root=root, dataset=dataset, out=os.path.join(out, "sft"), run_id=f"sft-{dataset}", recipe=recipe,
                  total_steps=sft_steps, num_workers=num_workers)
    sampler = SamplerConfig(**recipe.sampler)
    shown = generate_examples(trained["checkpoint"], root, dataset, os.path.join(out, "examples"), sampler, n=examples,
                              split="test", seed=seed)
    for e in shown:
        print(f"{e['sample_id']}: {e['instruction']!r} -> {e['text']!r}")
    return {"samples": summary["samples"], "quarantined": summary["quarantined"], "traces": trace_stats,
            "checkpoint": trained["checkpoint"], "eval": trained["eval"], "examples": shown}
