"""Hugging Face-format checkpoint folders: config.json + single or sharded safetensors.

Reads the released LLaDA / MMaDA / MMaDA-Parallel / Lumina-DiMOO folders as they are and writes
the same format. The model is built on the meta device first, so an 8B config costs no memory
until its weights arrive shard by shard. Our own folders add a `parapipe_vocab` entry to
config.json; a released folder gets its vocabulary from its config.json and the tokenizer files
that ship with it (model.tokens.released_vocab). Config values the backbone does not compute are
refused (model.transformer.BACKBONE_FIELDS).
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.tokens import Vocab, released_vocab
from model.transformer import DiffusionLM, ModelConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VOCAB_KEY = "parapipe_vocab"


def read_config(folder: str) -> tuple[ModelConfig, Vocab]:
    """The architecture and vocabulary of a checkpoint folder (ours, or a released one as it is)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder!r}; pass a checkpoint folder "
                                f"(config.json + *.safetensors), e.g. one written by save_pretrained")
    with open(path) as f:
        raw = json.load(f)
    try:
        cfg = ModelConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if VOCAB_KEY in raw:
        vocab = Vocab.from_dict(raw[VOCAB_KEY])
    else:
        try:
            vocab = released_vocab(raw, cfg.rows, *read_tokenizer_ids(folder))
        except ValueError as e:
            raise ValueError(f"{folder}: {e}; or add '{VOCAB_KEY}' to config.json") from e
    if vocab.vocab_size > cfg.rows:
        raise ValueError(f"vocabulary needs {vocab.vocab_size} embedding rows but {path} has "
                         f"embedding_size={cfg.rows}; fix '{VOCAB_KEY}' or embedding_size in config.json")
    return cfg, vocab


def read_tokenizer_ids(folder: str) -> tuple[dict[str, int] | None, int | None]:
    """Token name -> id and the tokenizer size (first unused id) from the Hugging Face tokenizer
    files in folder: tokenizer.json (model vocab + added_tokens) and tokenizer_config.json
    (added_tokens_decoder). (None, None) when neither ships; the size is None without tokenizer.json."""
    ids: dict[str, int] = {}
    size = None
    path = os.path.join(folder, TOKENIZER_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            tok = json.load(f)
        vocab = (tok.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            vocab = {piece[0]: i for i, piece in enumerate(vocab)}
        ids.update(vocab)
        ids.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
        size = max(ids.values(), default=-1) + 1
    path = os.path.join(folder, TOKENIZER_CONFIG_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            decoder = json.load(f).get("added_tokens_decoder", {})
        for i, t in decoder.items():
            name = t["content"] if isinstance(t, dict) else t
            if name in ids and ids[name] != int(i):
                raise ValueError(f"{TOKENIZER_FILE} has {name} at id {ids[name]} but {TOKENIZER_CONFIG_FILE} "
                                 f"at id {i}; the tokenizer files disagree")
            ids.setdefault(name, int(i))
    elif size is None:
        return None, None
    return ids, size


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


def add_image_codebook(model: DiffusionLM, vocab: Vocab, codebook_size: int,
                       seed: int | None = None) -> Vocab:
    """Grows a text-only model (e.g. plain LLaDA-8B) by codebook_size image ids for SFT, as MMaDA
    grew LLaDA: codes from the end of the tokenizer, codebook_size new embedding and head rows.
    Returns the new vocabulary; save both with save_pretrained."""
    if vocab.vocab_size != model.config.rows:
        raise ValueError(f"vocabulary has {vocab.vocab_size} rows but the model {model.config.rows}; "
                         f"pass the vocabulary read with this model")
    grown = vocab.with_codebook(codebook_size)
    model.add_rows(grown.vocab_size - model.config.rows, seed)
    return grown
