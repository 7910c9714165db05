"""`pipeline`: the whole ParaPipe job on one dataset, stage by stage.

Stages so far: aggregate -> reasoning traces (the toy teacher by default) -> fit the image tokenizer
-> (SFT lands in a later issue: until then a tiny random checkpoint) -> generate reasoning + images
for held-out edits. The embedded default is
the toy world's tiny preset on local storage.
"""
import os

from prefect import flow, task

from flows.aggregate import aggregate
from flows.traces import traces
from model.sampling import SamplerConfig
from tasks.generate import generate_examples_fn, init_tiny_checkpoint_fn
from tasks.image_codes import fit_image_tokenizer

init_tiny_checkpoint = task(init_tiny_checkpoint_fn, name="init-tiny-checkpoint")
generate_examples = task(generate_examples_fn, name="generate-examples")


@flow(name="pipeline", log_prints=True)
def pipeline(out: str = "runs/default", dataset: str = "toy-tiny", toy_samples: int = 2000, seed: int = 0,
             steps: int = 16, image_steps: int = 8, text_tokens: int = 32) -> dict:
    root = os.path.join(out, "data")
    sources = [{"type": "toy", "name": dataset, "preset": "tiny", "n": toy_samples, "seed": seed}]
    summary = aggregate(sources=sources, root=root, dataset=dataset, resolution=32)
    trace_stats = traces(root=root, dataset=dataset, generator={"kind": "teacher", "seed": seed})
    vq_dir = fit_image_tokenizer(root, dataset, os.path.join(out, "image_tokenizer"), patch_size=8,
                                 codebook_size=16, seed=seed)
    checkpoint = init_tiny_checkpoint(os.path.join(out, "checkpoints", "tiny-random"), root, dataset, vq_dir, seed)
    sampler = SamplerConfig(steps=steps, image_steps=image_steps, text_block_length=text_tokens)
    examples = generate_examples(checkpoint, root, dataset, os.path.join(out, "examples"), sampler,
                                 text_tokens=text_tokens, seed=seed)
    for e in examples:
        print(f"{e['sample_id']}: {e['instruction']!r} -> {e['text']!r}")
    return {"samples": summary["samples"], "quarantined": summary["quarantined"], "traces": trace_stats,
            "checkpoint": checkpoint,
            "examples": examples}
