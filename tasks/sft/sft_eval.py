"""Held-out evaluation of an SFT checkpoint on any dataset (the toy world has its exact metrics in
tasks/sft/toy_eval.py; this is what works on real data).

- heldout_loss: cross-entropy per modality of the masked output slots at fixed mask ratios
  (0.25 / 0.5 / 0.75, seeded), unweighted by 1/t, so values are comparable across runs and
  recipes: "how well does the model fill in held-out reasoning text / image codes".
- clip_alignment: sample (image, reasoning text) for held-out prompts with the recipe's sampler,
  decode both and score the pair with a CLIP model (rl/reward.ClipScorer); the mean cosine is
  the same text-image alignment ParaRL rewards. Needs CLIP weights on local disk.
Rows go to eval_results as suite "heldout/model", metrics "loss_text", "loss_image", "clip_alignment".
"""
import torch
from prefect import task

from model.layout import IMAGE, TEXT, OutputShape, collate, output_regions
from model.sampling import SamplerConfig, generate
from model.tokens import Vocab
from tasks.sft.sft_data import SequenceConfig, TokenisedSet, build_prompt, output_shape

MASK_RATIOS = (0.25, 0.5, 0.75)


def _shape(data: TokenisedSet, seq: SequenceConfig) -> OutputShape:
    return output_shape(seq, len(data.output[0]))


@torch.no_grad()
def heldout_loss(model, data: TokenisedSet, vocab: Vocab, seq: SequenceConfig, batch_size: int = 16,
                 seed: int = 0) -> dict:
    """Mean CE over masked text slots and masked image slots of every sample at each ratio in MASK_RATIOS."""
    model.eval()
    dev = next(model.parameters()).device
    shape = _shape(data, seq)
    regions = torch.tensor(output_regions(shape), device=dev)  # (M,)
    gen = torch.Generator(device=dev).manual_seed(seed)
    sums = {TEXT: 0.0, IMAGE: 0.0}
    counts = {TEXT: 0, IMAGE: 0}
    for start in range(0, len(data), batch_size):
        idx = range(start, min(start + batch_size, len(data)))
        prompts = [build_prompt(vocab, seq, data.input_codes[i], data.instruction[i]) for i in idx]
        batch = collate(prompts, [data.output[i] for i in idx], shape, vocab.pad_id)
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        target = ids[:, -shape.length:]  # (B, M)
        for t in MASK_RATIOS:
            drop = (torch.rand(target.shape, generator=gen, device=dev) < t) & (regions != 0)  # (B, M)
            noisy = ids.clone()
            noisy[:, -shape.length:] = target.masked_fill(drop, vocab.mask_id)
            logits = model(noisy, mask, last_n=shape.length).float()  # (B, M, V)
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, M)
            for region in (TEXT, IMAGE):
                sel = drop & (regions == region)
                sums[region] += float(ce[sel].sum())
                counts[region] += int(sel.sum())
    return {"loss_text": sums[TEXT] / max(counts[TEXT], 1), "loss_image": sums[IMAGE] / max(counts[IMAGE], 1),
            "masked_text": counts[TEXT], "masked_image": counts[IMAGE]}


@torch.no_grad()
def sample_outputs(model, data: TokenisedSet, vocab: Vocab, seq: SequenceConfig, tokenizer, image_tokenizer,
                   sampler: SamplerConfig, n: int, seed: int = 0) -> tuple[list, list[str]]:
    """Decoded (uint8 (H, W, 3) image, text) for the first n held-out prompts."""
    shape = _shape(data, seq)
    rows = range(min(n, len(data)))
    prompts = [build_prompt(vocab, seq, data.input_codes[i], data.instruction[i]) for i in rows]
    uncond = [build_prompt(vocab, seq, data.input_codes[i], data.instruction[i], True, True) for i in rows]
    out = generate(model, vocab, shape, prompts, sampler, uncond_prompts=uncond,
                   generator=torch.Generator(device=next(model.parameters()).device).manual_seed(seed))
    regions = torch.tensor(output_regions(shape))
    y = out.tokens.cpu()
    codes = (y[:, regions == IMAGE] - vocab.image_offset).clamp(0, vocab.codebook_size - 1)  # (B, N)
    images = image_tokenizer.decode(codes.view(len(prompts), *image_tokenizer.grid))  # (B, H, W, 3)
    texts = [tokenizer.decode(row.tolist()) for row in y[:, regions == TEXT]]
    return list(images.numpy()), texts


def clip_alignment(images: list, texts: list[str], eval_clip: dict) -> dict:
    """Mean CLIP cosine of the sampled pairs; eval_clip = {"clip_folder"} or {"model_name", "pretrained"}."""
    from rl.reward import ClipScorer

    scorer = (ClipScorer.from_folder(eval_clip["clip_folder"]) if eval_clip.get("clip_folder")
              else ClipScorer(eval_clip["model_name"], eval_clip.get("pretrained")))
    scores, stats = scorer.score_with_stats(images, texts)
    return {"clip_alignment": sum(scores) / len(scores), "clip_pairs": len(scores), **stats}


def to_rows(metrics: dict, run_id: str, checkpoint: str, n: int) -> list[dict]:
    keep = ("loss_text", "loss_image", "clip_alignment")
    return [{"run_id": run_id, "checkpoint": checkpoint, "step": None, "suite": "heldout/model", "metric": k,
             "value": float(metrics[k]), "num_samples": n} for k in keep if k in metrics]


@task
def evaluate_heldout(checkpoint: str, root: str, dataset: str, run_id: str, recipe: dict,
                     device: str = "cpu") -> dict:
    """Held-out loss per modality on the test split (val if it has no test rows), plus CLIP alignment of
    sampled outputs when recipe['eval_clip'] names CLIP weights; writes eval_results rows. device:
    where the model runs (a GPU run evaluates there, in bf16: an 8B model is hours on CPU)."""
    import os

    from model.checkpoint import from_pretrained
    from storage.parquet import write_rows
    from tasks.common.generate import inference_device, load_image_tokenizer
    from tasks.common.tokenizer import TextTokenizer
    from tasks.sft.sft_data import load_or_tokenise, read_samples
    from tasks.sft.toy_eval import select_per_category

    device, dtype = inference_device(device)
    model, vocab = from_pretrained(checkpoint, dtype=dtype, device=device)
    tok, vq = TextTokenizer.load(checkpoint), load_image_tokenizer(checkpoint)
    seq = SequenceConfig(**recipe["seq"])
    select = {k: tuple(recipe[k]) if recipe.get(k) else None for k in ("categories", "kinds")}
    for split in ("test", "val"):
        try:
            rows, traces = read_samples(root, dataset, split, traces_run=dataset, **select)
            break
        except ValueError:
            rows = None
    if rows is None:
        return {"skipped": f"no test or val samples in {dataset!r}"}
    data = select_per_category(load_or_tokenise(rows, tok, vq, vocab, seq, os.path.join(root, "cache", "sft"), traces),
                               recipe.get("eval_per_category", 32))
    if len(data) == 0:
        return {"skipped": f"every {split} sample was dropped ({data.dropped})", "split": split}
    metrics = {"split": split, "samples": len(data), "dropped": data.dropped, "device": device,
               "dtype": str(dtype).removeprefix("torch."), **heldout_loss(model, data, vocab, seq)}
    if recipe.get("eval_clip"):
        images, texts = sample_outputs(model, data, vocab, seq, tok, vq, SamplerConfig(**recipe["sampler"]),
                                       n=len(data))
        metrics.update(clip_alignment(images, texts, recipe["eval_clip"]))
    else:
        metrics["clip_alignment"] = "skipped: the recipe names no eval_clip weights"
    write_rows(root, "eval_results", to_rows({k: v for k, v in metrics.items() if isinstance(v, float)}, run_id,
                                             checkpoint, len(data)), run=run_id)
    return metrics
