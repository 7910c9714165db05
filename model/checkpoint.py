"""Hugging Face-format checkpoint folders: config.json + single or sharded safetensors.

Reads the released LLaDA / MMaDA / MMaDA-Parallel folders as they are and writes the same format.
The model is built on the meta device first, so an 8B config costs no memory until its weights
arrive shard by shard. Our own folders add a `parapipe_vocab` entry to config.json; released
folders without it get the MMaDA vocabulary.
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.tokens import MMADA_VOCAB, Vocab
from model.transformer import DiffusionLM, ModelConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
VOCAB_KEY = "parapipe_vocab"


def read_config(folder: str) -> tuple[ModelConfig, Vocab]:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder!r}; pass a checkpoint folder "
                                f"(config.json + *.safetensors), e.g. one written by save_pretrained")
    with open(path) as f:
        raw = json.load(f)
    cfg = ModelConfig.from_dict(raw)
    vocab = Vocab.from_dict(raw[VOCAB_KEY]) if VOCAB_KEY in raw else MMADA_VOCAB
    if vocab.vocab_size > cfg.rows:
        raise ValueError(f"vocabulary needs {vocab.vocab_size} embedding rows but {path} has "
                         f"embedding_size={cfg.rows}; add '{VOCAB_KEY}' to config.json for a custom vocabulary")
    return cfg, vocab


def weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder!r}")


def build_meta(cfg: ModelConfig) -> DiffusionLM:
    """The module tree with parameters on the meta device (no memory, any size)."""
    with torch.device("meta"):
        return DiffusionLM(cfg)


def from_pretrained(folder: str, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[DiffusionLM, Vocab]:
    """Loads a checkpoint folder; every parameter must be present with the right shape."""
    cfg, vocab = read_config(folder)
    model = build_meta(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for path in weight_files(folder):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key not in expected:
                    raise ValueError(f"unexpected tensor {key!r} in {path}; is this a LLaDA-family checkpoint?")
                t = f.get_tensor(key)
                if t.shape != expected[key]:
                    raise ValueError(f"{key} has shape {tuple(t.shape)} in {path} but config.json "
                                     f"implies {tuple(expected[key])}")
                state[key] = t.to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{len(missing)} parameters missing from {folder!r}, e.g. {missing[:3]}")
    model.load_state_dict(state, assign=True)
    return model.eval(), vocab


def save_pretrained(model: DiffusionLM, vocab: Vocab, folder: str, max_shard_bytes: int | None = None,
                    dtype: torch.dtype | None = None, extra: dict | None = None) -> None:
    """Writes config.json (plus `extra` keys) and model.safetensors, or shards + index when
    max_shard_bytes is set."""
    os.makedirs(folder, exist_ok=True)
    for stale in [INDEX_FILE, SINGLE_FILE] + [n for n in os.listdir(folder) if n.startswith("model-")]:
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump({**model.config.to_dict(), VOCAB_KEY: vocab.to_dict(),
                   "mask_token_id": vocab.mask_id, "codebook_size": vocab.codebook_size, **(extra or {})}, f, indent=2)
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    if max_shard_bytes is None:
        save_file(state, os.path.join(folder, SINGLE_FILE), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = t, size + nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
