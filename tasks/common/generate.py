"""Inference from a checkpoint folder to files, and the tiny random checkpoint of the embedded default.

A checkpoint folder holds config.json + safetensors (model/checkpoint.py), tokenizer.json
(tasks/common/tokenizer.py) and optionally image_tokenizer/ (model/image_tokenizer.py). Without an image
tokenizer the image is written as its code grid (image_codes.txt) instead of a PNG.
"""
import json
import os
from dataclasses import asdict

import torch

from model.checkpoint import CONFIG_FILE, from_pretrained, save_pretrained
from model.layout import IMAGE, TEXT, OutputShape, edit_prompt, generation_prompt, output_regions
from model.sampling import SamplerConfig, generate
from model.tokens import LUMINA_TEXT_VOCAB_SIZE, tiny_vocab
from model.transformer import DiffusionLM, ModelConfig
from tasks.common.tokenizer import TextTokenizer, build_tiny_tokenizer

IMAGE_TOKENIZER_DIR = "image_tokenizer"
GRID_KEY = "parapipe_image_grid"
SEQUENCE_KEY = "parapipe_sequence"  # the SequenceConfig a checkpoint was trained with
SAMPLER_KEY = "parapipe_sampler"  # the SamplerConfig fields its held-out evaluation sampled with
DEFAULT_GRID = (32, 32)  # MAGVIT-v2 at 512 x 512 (released checkpoints)
ONE_BLOCK = 1 << 30  # a text block length above any text length: the whole text is one block
# Published inference settings (upstream-facts §3), as `parapipe generate --settings NAME`. Upstream bugs
# fixed here, by construction of model/sampling.py: M's text guidance has its sign reversed upstream
# (Lc + w (Lu - Lc)); ours is u + (w + 1)(c - u). M's unconditional prompt fills the input image with
# token id 0 and A's overwrites the conditional prefix in place, leaving conditional tokens behind;
# ours are whole prompts without the instruction / image. A leaves one image slot masked at the last
# step and fills it with a random code; ours decodes every slot. M crashes with both guidance scales 0;
# ours does not. A's --text_block_length is ignored upstream (one block); ours honours the 32 given.
RELEASED_SETTINGS = {
    "mmada-parallel-m": dict(steps=128, image_steps=30, text_block_length=ONE_BLOCK, text_cfg=2.5, image_cfg=4.0,
                             text_temperature=0.0, image_temperature=1.0, text_tokens=256),
    "mmada-parallel-a": dict(steps=128, image_steps=64, text_block_length=32, text_cfg=0.0, image_cfg=4.0,
                             text_temperature=0.0, image_temperature=1.0, text_tokens=256),
}
TINY_MODEL = dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384, rope_theta=10000.0,
                  max_sequence_length=512)


def make_tiny_checkpoint(folder: str, codebook_size: int = 16, grid: tuple[int, int] = (4, 4),
                         corpus: list[str] = (), seed: int = 0, image_tokenizer=None) -> str:
    """A randomly initialised tiny model + offline tokenizer (+ image tokenizer if given)."""
    tok = build_tiny_tokenizer(list(corpus))
    vocab = tiny_vocab(len(tok), codebook_size)
    cfg = ModelConfig(**TINY_MODEL, vocab_size=vocab.vocab_size, embedding_size=vocab.vocab_size)
    model = DiffusionLM(cfg).init_weights(seed)
    save_pretrained(model, vocab, folder, extra={GRID_KEY: list(grid)})
    tok.save(folder)
    if image_tokenizer is not None:
        image_tokenizer.save(os.path.join(folder, IMAGE_TOKENIZER_DIR))
    return folder


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_device(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """(device, weight dtype) for sampling. "auto": cuda when one is visible, else cpu; bf16 on cuda
    (the released 8B checkpoints are bf16 and upstream samples in bf16), fp32 on cpu (exact toy figures)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device here; use device='cpu' (or 'auto')")
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; use one of {['auto', *DTYPES]}")
    return device, DTYPES[dtype]


def open_image_tokenizer(path: str, device: str = "cpu"):
    """The image tokenizer in a folder, by the files it holds: image_tokenizer.json (PatchVQ, the toy
    world's), config.json of class MAGVITv2 (showlab/magvitv2, the M variant's), or a diffusers VQModel
    in the folder or its vqvae/ (aMUSEd VQ, the A variant's)."""
    from model.image_tokenizer import CONFIG_FILE as PATCH_VQ_CONFIG, PatchVQ

    if os.path.isfile(os.path.join(path, PATCH_VQ_CONFIG)):
        return PatchVQ.load(path)
    for folder in (path, os.path.join(path, "vqvae")):
        config = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(config):
            continue
        with open(config) as f:
            kind = json.load(f).get("_class_name")
        if kind == "MAGVITv2":
            from model.magvit2 import load_magvit2

            return load_magvit2(folder, device=device)
        if kind == "VQModel":  # "parapipe_image_size": [H, W] in its config.json overrides the released 512 x 512
            from model.vq_amused import AmusedVQ

            with open(config) as f:
                size = json.load(f).get("parapipe_image_size")
            return AmusedVQ.load(folder, device=device, **({"image_size": tuple(size)} if size else {}))
    raise ValueError(f"{path!r} holds no known image tokenizer: expected {PATCH_VQ_CONFIG} (PatchVQ), or a "
                     f"{CONFIG_FILE} whose _class_name is MAGVITv2 (showlab/magvitv2) or VQModel (aMUSEd VQ, also "
                     f"under vqvae/)")


def load_image_tokenizer(folder: str, device: str = "cpu"):
    """A checkpoint folder's image_tokenizer/, or the vqvae/ a released A folder ships (None without either)."""
    path = os.path.join(folder, IMAGE_TOKENIZER_DIR)
    if os.path.isdir(path):
        return open_image_tokenizer(path, device)
    return open_image_tokenizer(folder, device) if os.path.isdir(os.path.join(folder, "vqvae")) else None


def image_grid(folder: str, image_tokenizer) -> tuple[int, int]:
    if image_tokenizer is not None:
        return tuple(image_tokenizer.grid)
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        return tuple(json.load(f).get(GRID_KEY, DEFAULT_GRID))


def read_png(path: str, size: tuple[int, int] | None = None, policy: str = "squash") -> torch.Tensor:
    """PNG/JPEG file -> uint8 (H, W, 3), resized to size (H, W) as aggregation does when given."""
    import numpy as np
    from PIL import Image

    from tasks.aggregate.curate import resize_image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"input image {path!r} does not exist")
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = resize_image(im, tuple(size), policy)
        return torch.from_numpy(np.asarray(im).copy())


def write_png(image: torch.Tensor, path: str) -> None:
    from PIL import Image

    Image.fromarray(image.cpu().numpy()).save(path)


def sequence_layout(folder: str) -> dict:
    """The SequenceConfig fields a checkpoint was trained with (config.json), {} if none recorded."""
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        return json.load(f).get(SEQUENCE_KEY, {})


def recorded_sampler(folder: str) -> tuple[dict, str]:
    """(SamplerConfig fields, where they come from) a checkpoint should be sampled with by default.

    A checkpoint our SFT wrote records the sampler its evaluation used (`parapipe_sampler` in config.json). An
    older one of ours (a `parapipe_sequence` but no sampler) gets the recipes' evaluation sampler: greedy, one
    text block per output text. Anything else (released checkpoints) gets {} (the caller's defaults)."""
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        raw = json.load(f)
    if raw.get(SAMPLER_KEY):
        return dict(raw[SAMPLER_KEY]), f"recorded in {folder}/{CONFIG_FILE}"
    if SEQUENCE_KEY in raw:
        from tasks.sft.recipe import Recipe

        sampler = Recipe.model_fields["sampler"].default_factory()
        text_tokens = raw[SEQUENCE_KEY].get("text_tokens")
        return ({**sampler, **({"text_block_length": text_tokens} if text_tokens else {})},
                "the SFT recipes' evaluation sampler (the checkpoint records none)")
    return {}, "defaults (the checkpoint records no sampler)"


def sampler_meta(sampler: SamplerConfig) -> dict:
    """SamplerConfig fields for meta.json: the one-block sentinel is recorded as null (the whole text)."""
    d = asdict(sampler)
    if d.get("text_block_length", 0) >= ONE_BLOCK:
        d["text_block_length"] = None
    return d


def pad_instruction_ids(ids: list[int], layout: dict, eos_id: int) -> list[int]:
    """Instruction ids <eos>-padded as in training (tasks/sft/sft_data.pad_instruction)."""
    n = layout.get("instruction_tokens", 0)
    if n and len(ids) > n:
        raise ValueError(f"instruction of {len(ids)} tokens is longer than the {n} the checkpoint was trained "
                         f"with; shorten it")
    return ids + [eos_id] * max(n - len(ids), 0)


def generate_to_files(checkpoint: str, prompt: str, out_dir: str, sampler: SamplerConfig,
                      text_tokens: int | None = None, image_path: str | None = None, seed: int = 0,
                      device: str = "cpu", resize: str = "squash", image_tokenizer: str | None = None,
                      image_name: str = "image.png", dtype: str = "auto") -> dict:
    """Samples one (image, reasoning text) for a prompt (and input image for editing) and writes
    text.txt, `image_name` (or image_codes.txt), and meta.json into out_dir. Returns the meta dict.
    image_tokenizer: a tokenizer folder for checkpoints that ship without image_tokenizer/ (released
    MMaDA-Parallel-M pairs with showlab/magvitv2). device / dtype: see inference_device."""
    device, weights = inference_device(device, dtype)
    model, vocab = from_pretrained(checkpoint, dtype=weights, device=device)
    tok = TextTokenizer.load(checkpoint)
    img_tok = open_image_tokenizer(image_tokenizer, device) if image_tokenizer else load_image_tokenizer(checkpoint, device)
    if img_tok is not None and img_tok.codebook_size != vocab.codebook_size:
        raise ValueError(f"the image tokenizer has {img_tok.codebook_size} codes but {checkpoint!r} has "
                         f"{vocab.codebook_size} image rows; pass the tokenizer the model was trained with")
    h, w = image_grid(checkpoint, img_tok)
    layout = sequence_layout(checkpoint)
    text_tokens = text_tokens or layout.get("text_tokens", 64)
    codes = None
    if image_path is not None:
        if img_tok is None:
            raise ValueError(f"{checkpoint!r} has no {IMAGE_TOKENIZER_DIR}/, so the input image "
                             f"{image_path!r} cannot be encoded; pass --image-tokenizer FOLDER or drop --image")
        image = read_png(image_path, tuple(img_tok.image_size), resize)  # any size, resized as aggregation does
        codes = img_tok.encode(image[None])[0].flatten().tolist()
    if vocab.image_offset == LUMINA_TEXT_VOCAB_SIZE:  # MMaDA-Parallel-A / Lumina-DiMOO
        shape, cond, uncond = _dimoo_prompts(tok, vocab, prompt, codes, (h, w), text_tokens)
    else:
        shape = OutputShape(image_tokens=h * w, text_tokens=text_tokens)
        instruction = pad_instruction_ids(tok.encode(prompt), layout, vocab.eos_id)
        empty = pad_instruction_ids([], layout, vocab.eos_id)
        if codes is not None:
            cond, uncond = edit_prompt(vocab, codes, instruction), edit_prompt(vocab, None, empty)
        else:
            cond, uncond = generation_prompt(vocab, instruction), generation_prompt(vocab, empty)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, vocab, shape, [cond], sampler, uncond_prompts=[uncond], generator=gen)
    regions = torch.tensor(output_regions(shape))
    y = out.tokens[0].cpu()
    text = tok.decode(y[regions == TEXT].tolist())
    grid = (y[regions == IMAGE] - vocab.image_offset).view(h, w)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "text.txt"), "w") as f:
        f.write(text + "\n")
    if img_tok is not None:
        write_png(img_tok.decode(grid[None])[0], os.path.join(out_dir, image_name))
    else:
        with open(os.path.join(out_dir, "image_codes.txt"), "w") as f:
            f.write("\n".join(" ".join(str(c) for c in row) for row in grid.tolist()) + "\n")
    meta = {"checkpoint": checkpoint, "prompt": prompt, "input_image": image_path, "seed": seed,
            "nfe": out.nfe, "text": text, "sampler": sampler_meta(sampler), "grid": [h, w], "device": device,
            "dtype": str(weights).removeprefix("torch.")}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


# ---------------------------------------------------------------------------------------------
# Prefect tasks of the pipeline

def _dimoo_prompts(tok, vocab, prompt: str, codes: list[int] | None, grid: tuple[int, int], text_tokens: int):
    """The A layout's output shape and (conditional, unconditional) prompts. Editing guides the image
    against the prompt without the input image (PA's cfg_img); generation against <uncondition>."""
    from model import layout_dimoo as A

    ids = A.ids_for(vocab)
    shape = A.DimooOutputShape(grid=grid, text_tokens=text_tokens)
    if codes is not None:
        instruction = tok.encode(A.instruction_text(A.EDIT_SYSTEM_PROMPT, prompt))
        return shape, A.edit_prompt(instruction, codes, grid, ids), A.edit_prompt(instruction, None, grid, ids)
    instruction = tok.encode(A.instruction_text(A.GEN_SYSTEM_PROMPT, prompt))
    return shape, A.generation_prompt(instruction), A.generation_prompt(
        tok.encode(A.instruction_text(A.GEN_SYSTEM_PROMPT, None)))


def example_folder_name(index: int, category: str | None, instruction: str, max_chars: int = 48) -> str:
    """'00-recolor-paint-the-blue-square-green': index, category, then the instruction as a short slug."""
    words = "".join(c if c.isalnum() else " " for c in instruction.lower()).split()
    slug = "-".join(words)[:max_chars].rstrip("-")
    return "-".join(p for p in (f"{index:02d}", category, slug) if p)


def _reference_traces(root: str, dataset: str, sample_ids: list[str]) -> dict[str, str]:
    """sample_id -> the ok trace text the model was trained on (traces table), where one exists."""
    import pyarrow.compute as pc

    from storage.parquet import list_runs, read_table

    if dataset not in list_runs(root, "traces"):
        return {}
    tbl = read_table(root, "traces", run=dataset, columns=["sample_id", "text"],
                     filter=pc.field("sample_id").isin(sample_ids) & (pc.field("status") == "ok"))
    return {r["sample_id"]: r["text"] for r in tbl.to_pylist()}


EXAMPLE_FILES = {"input.png": "the input image", "target.png": "the reference output image (the dataset's)",
                 "model_output.png": "the image the model generated", "text.txt": "instruction, model text, "
                 "reference trace", "meta.json": "checkpoint, sampler, seed, sample id"}


def _example_text(instruction: str, model_text: str, reference: str | None) -> str:
    return (f"instruction:\n  {instruction}\n\nmodel text:\n  {model_text}\n\n"
            f"reference trace:\n  {reference if reference else '(none recorded)'}\n")


def generate_examples_fn(checkpoint: str, root: str, dataset: str, out_dir: str, sampler: SamplerConfig,
                         n: int = 4, split: str = "val", text_tokens: int | None = None, seed: int = 0,
                         device: str = "cpu") -> list[dict]:
    """Generates for the first n editing samples of a split, one readable folder each (`EXAMPLE_FILES`), named
    `{index}-{category}-{instruction slug}`, e.g. 00-recolor-paint-the-blue-square-green/."""
    import pyarrow.compute as pc

    from storage.parquet import read_table

    tbl = read_table(root, "samples", run=dataset, filter=(pc.field("split") == split) & (pc.field("kind") == "edit"),
                     columns=["sample_id", "category", "instruction", "input_image", "output_image",
                              "reference_trace"]).slice(0, n)
    rows = tbl.to_pylist()
    traces = _reference_traces(root, dataset, [r["sample_id"] for r in rows])
    results = []
    for i, row in enumerate(rows):
        folder = os.path.join(out_dir, example_folder_name(i, row["category"], row["instruction"]))
        os.makedirs(folder, exist_ok=True)
        for name, key in (("input.png", "input_image"), ("target.png", "output_image")):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(row[key])
        meta = generate_to_files(checkpoint, row["instruction"], folder, sampler, text_tokens=text_tokens,
                                 image_path=os.path.join(folder, "input.png"), seed=seed, image_name="model_output.png",
                                 device=device)
        reference = traces.get(row["sample_id"]) or row["reference_trace"]
        with open(os.path.join(folder, "text.txt"), "w") as f:
            f.write(_example_text(row["instruction"], meta["text"], reference))
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump({**meta, "sample_id": row["sample_id"], "category": row["category"], "split": split,
                       "files": EXAMPLE_FILES}, f, indent=2)
        results.append({"sample_id": row["sample_id"], "instruction": row["instruction"], "text": meta["text"],
                        "folder": folder})
    return results
