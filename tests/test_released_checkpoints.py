"""Released checkpoint folders load as they are: LLaDA-8B (text-only), MMaDA-8B, Lumina-DiMOO /
MMaDA-Parallel-A. The vocabulary comes from config.json + the tokenizer files; config values the
backbone does not compute, and true conflicts, are refused with the field and value named.

Weights are random, in the published key names, at shrunken dims but with the full vocabulary
rows; the LLaDA tokenizer is rebuilt offline (a word-level tokenizer of the published size with
the published special ids), so nothing is downloaded.
"""
import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import (CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, VOCAB_KEY, add_image_codebook,
                              build_meta, from_pretrained, read_config, save_pretrained)
from model.tokens import (BOS_ID, EOS_ID, INTERLEAVE_ID, LLADA_TOKENIZER_SIZE, LLADA_VOCAB, LUMINA_TEXT_VOCAB_SIZE,
                          MASK_ID, MMADA_VOCAB, T2IT_ID, TINY_SPECIAL_TOKENS, Vocab, tiny_vocab)
from model.transformer import BACKBONE_FIELDS, ModelConfig
from tests.helpers import tiny_model

# GSAI-ML/LLaDA-8B-Instruct config.json: the values of upstream-facts §1.1 plus the other keys
# LLaDAConfig serialises (configuration_llada.py: every ModelConfig field, use_cache, HF metadata).
LLADA_8B = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False,
}
# MMaDA-8B: MMadaConfig keys of configs/mmada_demo.yaml; 134656 rows (inferred, upstream-facts §1.2).
MMADA_8B = {**LLADA_8B, "model_type": "mmada", "architectures": ["MMadaModelLM"], "vocab_size": 134656,
            "embedding_size": 134656, "llm_vocab_size": 126464, "codebook_size": 8192, "num_vq_tokens": 1024,
            "num_new_special_tokens": 0, "new_vocab_size": 134656}
# Lumina-DiMOO / MMaDA-Parallel-A: text ids end at 126356 and the 8192 codes follow; its generators
# infer text_vocab_size = logits width - 8192, so the rows are 126356 + 8192 (inferred).
LUMINA_ROWS = LUMINA_TEXT_VOCAB_SIZE + 8192
LUMINA = {**LLADA_8B, "architectures": ["LLaDAForMultiModalGeneration"], "vocab_size": LUMINA_ROWS,
          "embedding_size": LUMINA_ROWS}
TINY_DIMS = {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "mlp_hidden_size": 24}
BLOCK_TENSORS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm")
LLADA_NAMED = {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>",
               126346: "<|start_header_id|>", 126347: "<|end_header_id|>", 126348: "<|eot_id|>"}


def published_names(n_layers: int) -> set[str]:
    blocks = {f"model.transformer.blocks.{i}.{t}.weight" for i in range(n_layers) for t in BLOCK_TENSORS}
    return blocks | {f"model.transformer.{t}.weight" for t in ("wte", "ln_f", "ff_out")}


def published_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the released safetensors names, shapes from config.json alone."""
    D, F, L = cfg["d_model"], cfg["mlp_hidden_size"], cfg["n_layers"]
    kv = cfg["n_kv_heads"] * (D // cfg["n_heads"])
    rows = cfg["embedding_size"] or cfg["vocab_size"]
    shapes = {"q_proj": (D, D), "k_proj": (kv, D), "v_proj": (kv, D), "attn_out": (D, D), "ff_proj": (F, D),
              "up_proj": (F, D), "ff_out": (D, F), "attn_norm": (D,), "ff_norm": (D,)}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(published_names(L)):
        part = name.split(".")[-2]
        shape = {"wte": (rows, D), "ff_out": (rows, D), "ln_f": (D,)}[part] if ".blocks." not in name else shapes[part]
        w = torch.randn(shape, generator=g) * (0.1 if len(shape) == 2 else 0.05)
        state[name] = (w + 1 if len(shape) == 1 else w).to(torch.bfloat16)  # stored bf16, as released
    return state


def write_folder(folder, cfg: dict, weights: bool = True, tokenizer: str | None = None) -> str:
    """config.json as given (+ 2 weight shards and index, + tokenizer.json copied from `tokenizer`)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(cfg, f)
    if tokenizer:
        shutil.copy(tokenizer, os.path.join(folder, TOKENIZER_FILE))
    if weights:
        state = published_state(cfg)
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for shard, names in shards.items():
            save_file({k: state[k] for k in names}, os.path.join(folder, shard), metadata={"format": "pt"})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: s for s, ns in shards.items() for k in ns}}, f)
    return str(folder)


def word_tokenizer(path: str, size: int, named: dict[int, str]) -> str:
    """tokenizer.json with ids 0..size-1 and the given special tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {named.get(i, f"<|reserved_token_{i}|>" if i >= 126080 else f"w{i}"): i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(n, special=True) for n in named.values()])
    assert all(tok.token_to_id(n) == i for i, n in named.items())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def llada_tokenizer(tmp_path_factory) -> str:
    return word_tokenizer(str(tmp_path_factory.mktemp("tok") / "llada" / TOKENIZER_FILE), LLADA_TOKENIZER_SIZE,
                          LLADA_NAMED)


@pytest.fixture(scope="module")
def lumina_tokenizer(tmp_path_factory) -> str:
    added = {126349: "<boi>", 126350: "<eoi>", 126351: "<uncondition>", 126352: "<system>", 126353: "<user>",
             126354: "<answer>", 126355: "</answer>"}  # ids of upstream-facts §2.2; names 126352/3 assumed
    return word_tokenizer(str(tmp_path_factory.mktemp("tok") / "lumina" / TOKENIZER_FILE), LUMINA_TEXT_VOCAB_SIZE,
                          {**LLADA_NAMED, **added})


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory, llada_tokenizer) -> str:
    return write_folder(tmp_path_factory.mktemp("llada"), {**LLADA_8B, **TINY_DIMS}, tokenizer=llada_tokenizer)


# ---------------------------------------------------------------------------------------------
# released folders load as they are


def test_published_llada_folder_loads_as_a_text_only_model(llada_folder):
    from tasks.common.tokenizer import TextTokenizer

    model, vocab = from_pretrained(llada_folder)
    assert vocab == LLADA_VOCAB
    assert (vocab.codebook_size, vocab.image_offset, vocab.vocab_size) == (0, 126349, 126464)
    assert (vocab.mask_id, vocab.bos_id, vocab.eos_id, vocab.pad_id) == (126336, 126080, 126081, 126081)
    assert vocab.image_offset == len(TextTokenizer.load(llada_folder))
    x = torch.tensor([[BOS_ID, 11, 12, MASK_ID, MASK_ID, EOS_ID]])
    logits = model(x)
    assert logits.shape == (1, 6, 126464) and torch.isfinite(logits).all()
    written = published_state({**LLADA_8B, **TINY_DIMS})
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, written[name].float())


@pytest.mark.parametrize("config, rows", [(LLADA_8B, 126464), (MMADA_8B, 134656), (LUMINA, LUMINA_ROWS)],
                         ids=["llada-8b", "mmada-8b", "lumina-dimoo"])
def test_full_size_configs_on_meta_have_8b_parameters_and_released_names(config, rows):
    m = build_meta(ModelConfig.from_dict(config))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert set(shapes) == published_names(32)
    assert shapes["model.transformer.wte.weight"] == shapes["model.transformer.ff_out.weight"] == (rows, 4096)
    assert shapes["model.transformer.blocks.31.ff_out.weight"] == (4096, 12288)
    per_block = 4 * 4096 ** 2 + 3 * 4096 * 12288 + 2 * 4096
    assert m.num_params() == 2 * rows * 4096 + 4096 + 32 * per_block
    assert 8.0e9 < m.num_params() < 8.1e9 and next(m.parameters()).is_meta


def test_full_size_vocabularies_from_config_and_tokenizer(tmp_path, llada_tokenizer, lumina_tokenizer):
    _, v = read_config(write_folder(tmp_path / "llada", LLADA_8B, weights=False, tokenizer=llada_tokenizer))
    assert v == LLADA_VOCAB
    # MMaDA: with the LLaDA tokenizer it ships, or with none at all (the published LLaDA ids)
    _, v = read_config(write_folder(tmp_path / "mmada", MMADA_8B, weights=False, tokenizer=llada_tokenizer))
    assert v == MMADA_VOCAB
    _, v = read_config(write_folder(tmp_path / "mmada-bare", MMADA_8B, weights=False))
    assert v == MMADA_VOCAB
    cfg, v = read_config(write_folder(tmp_path / "lumina", LUMINA, weights=False, tokenizer=lumina_tokenizer))
    assert (v.image_offset, v.codebook_size, v.vocab_size) == (126356, 8192, LUMINA_ROWS) == (126356, 8192, cfg.rows)
    assert (v.soi_id, v.eoi_id, v.mask_id, v.bos_id, v.eos_id) == (126349, 126350, 126336, 126080, 126081)
    assert (v.edit_task_id, v.gen_task_id, v.pad_id) == (INTERLEAVE_ID, T2IT_ID, 126339)  # PA's pad, not the config's
    assert v.image_id(8191) == LUMINA_ROWS - 1


def test_mmada_folder_without_parapipe_vocab_gets_the_mmada_vocabulary(tmp_path):
    model, vocab = from_pretrained(write_folder(tmp_path, {**MMADA_8B, **TINY_DIMS}))
    assert vocab == MMADA_VOCAB
    assert model(torch.tensor([[vocab.soi_id, vocab.image_id(0), vocab.image_id(8191), vocab.eoi_id]])).shape \
        == (1, 4, 134656)


def test_tiny_tokenizer_ids_are_derived_by_name(tmp_path):
    from tasks.common.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["turn the red circle blue"])
    ours = tiny_vocab(len(tok), 16)
    save_pretrained(tiny_model(vocab_size=ours.vocab_size, embedding_size=ours.vocab_size), ours, tmp_path)
    tok.save(str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    del cfg[VOCAB_KEY]  # only codebook_size + mask_token_id remain, as in a released MMaDA config
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    assert read_config(str(tmp_path))[1] == ours
    # without codebook_size, fewer than 128 spare rows read as LLaDA-style row padding: text-only
    del cfg["codebook_size"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    assert read_config(str(tmp_path))[1] == dataclasses.replace(ours, codebook_size=0)
    # but 1000 spare rows match no released layout: say so rather than guess
    cfg["vocab_size"] = cfg["embedding_size"] = len(tok) + 1000
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="1000 embedding rows beyond the text ids.*add codebook_size"):
        read_config(str(tmp_path))


def test_text_only_model_grows_an_image_codebook_like_mmada(tmp_path, llada_folder):
    model, vocab = from_pretrained(llada_folder)
    x = torch.tensor([[BOS_ID, 11, MASK_ID, EOS_ID]])
    before = model(x)
    grown = add_image_codebook(model, vocab, 8192, seed=0)
    assert grown == MMADA_VOCAB and model.config.rows == 134656
    after = model(torch.cat([x, torch.tensor([[grown.image_id(8191)]])], 1))
    assert after.shape == (1, 5, 134656)
    torch.testing.assert_close(model(x)[..., :126464], before)  # old ids keep their logits
    save_pretrained(model, grown, tmp_path)
    assert from_pretrained(str(tmp_path))[1] == MMADA_VOCAB
    with pytest.raises(ValueError, match="already has 8192 image codes"):
        add_image_codebook(model, grown, 8192)


# ---------------------------------------------------------------------------------------------
# config values: refused when the backbone computes something else, accepted when it does not

REFUSED = [
    ("layer_norm_type", "default"), ("layer_norm_type", "low_precision"), ("layer_norm_type", "gemma_rms"),
    ("activation_type", "swiglu"), ("activation_type", "gelu"), ("activation_type", "relu"),
    ("block_type", "sequential"), ("block_type", "parallel"), ("input_emb_norm", True), ("scale_logits", True),
    ("include_bias", True), ("include_qkv_bias", True), ("bias_for_layer_norm", True),
    ("attention_layer_norm", True), ("layer_norm_with_affine", False), ("weight_tying", True), ("rope", False),
    ("rope_full_precision", False), ("alibi", True), ("block_group_size", 2), ("clip_qkv", 8.0),
    ("model_type", "llama"), ("weight_tying", 0), ("block_group_size", True),
]


@pytest.mark.parametrize("field, value", REFUSED, ids=[f"{f}={v!r}" for f, v in REFUSED])
def test_unsupported_config_values_are_refused_by_name(field, value):
    supported = " or ".join(repr(s) for s in BACKBONE_FIELDS[field])
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict({**LLADA_8B, field: value})
    assert f"{field}={value!r}" in str(e.value) and f"supported: {field}={supported}" in str(e.value)


def test_refusal_through_the_loader_names_the_file(tmp_path):
    write_folder(tmp_path, {**LLADA_8B, **TINY_DIMS, "layer_norm_type": "gemma_rms"}, weights=False)
    with pytest.raises(ValueError, match=r"config\.json: config\.json has layer_norm_type='gemma_rms'.*'rms'"):
        from_pretrained(str(tmp_path))


def test_values_without_effect_on_the_logits_are_accepted(tmp_path, llada_folder, llada_tokenizer):
    inert = {"embedding_dropout": 0.1, "attention_dropout": 0.1, "residual_dropout": 0.1, "flash_attention": True,
             "alibi_bias_max": 4.0, "attention_layer_norm_with_affine": False, "init_fn": "normal",
             "init_device": None, "precision": None, "use_cache": True, "bias_for_layer_norm": None,
             "include_qkv_bias": None, "multi_query_attention": False, "torch_dtype": "bfloat16"}
    other = write_folder(tmp_path, {**LLADA_8B, **TINY_DIMS, **inert}, tokenizer=llada_tokenizer)
    x = torch.tensor([[BOS_ID, 11, 12, MASK_ID, EOS_ID]])
    (a, va), (b, vb) = from_pretrained(llada_folder), from_pretrained(other)
    assert va == vb
    torch.testing.assert_close(a(x), b(x))


def test_multi_query_attention_and_mlp_ratio_are_read_as_upstream():
    cfg = ModelConfig.from_dict({**LLADA_8B, **TINY_DIMS, "n_kv_heads": None, "multi_query_attention": True})
    assert cfg.kv_heads == 1
    assert build_meta(cfg).state_dict()["model.transformer.blocks.0.k_proj.weight"].shape == (8, 16)
    assert ModelConfig.from_dict({**LLADA_8B, "mlp_hidden_size": None, "mlp_ratio": 2}).mlp_hidden_size == 8192
    with pytest.raises(ValueError, match="multi_query_attention=True but n_kv_heads=2"):
        ModelConfig.from_dict({**LLADA_8B, **TINY_DIMS, "multi_query_attention": True})


# ---------------------------------------------------------------------------------------------
# true conflicts


def test_tokenizer_that_contradicts_the_config_is_refused(tmp_path, llada_tokenizer):
    folder = write_folder(tmp_path, {**LLADA_8B, "mask_token_id": 126335}, weights=False, tokenizer=llada_tokenizer)
    with pytest.raises(ValueError, match=r"<\|mdm_mask\|> at id 126336 but config.json says mask_token_id=126335"):
        read_config(folder)
    write_folder(tmp_path, {**LLADA_8B, "eos_token_id": 126400}, weights=False)
    with pytest.raises(ValueError, match="<.endoftext.> at id 126081 but config.json says eos_token_id=126400"):
        read_config(folder)
    # an id the tokenizer does not have (a tiny tokenizer without <|endoftext|>; 64 ids, 64 rows)
    named = {i: n for i, n in enumerate(TINY_SPECIAL_TOKENS) if n != "<|endoftext|>"}
    small = word_tokenizer(str(tmp_path / "small" / TOKENIZER_FILE), 64, named)
    tiny = {**LLADA_8B, **TINY_DIMS, "vocab_size": 64, "embedding_size": 64, "mask_token_id": 1, "eos_token_id": 100,
            "pad_token_id": 0}
    folder = write_folder(tmp_path / "tiny", tiny, weights=False, tokenizer=small)
    with pytest.raises(ValueError, match="config.json eos_token_id=100 is not a text id: the text ids end at 64"):
        read_config(folder)
    write_folder(tmp_path / "tiny", {**tiny, "eos_token_id": 3}, weights=False)
    assert read_config(folder)[1] == tiny_vocab(64, 0)


def test_more_ids_than_embedding_rows_is_refused(tmp_path, llada_tokenizer):
    # the LLaDA tokenizer + an 8192-code codebook cannot fit LLaDA's 126464 rows
    folder = write_folder(tmp_path, {**LLADA_8B, "codebook_size": 8192}, weights=False, tokenizer=llada_tokenizer)
    with pytest.raises(ValueError, match="126349 text ids \\+ 8192 image codes need 134541 embedding rows "
                                         "but embedding_size=126464"):
        read_config(folder)
    write_folder(tmp_path, {**LLADA_8B, "vocab_size": 130000}, weights=False)
    with pytest.raises(ValueError, match="embedding_size=126464 is below vocab_size=130000"):
        read_config(folder)


def test_tokenizer_files_that_disagree_or_lack_specials_are_refused(tmp_path, llada_tokenizer):
    folder = write_folder(tmp_path, LLADA_8B, weights=False, tokenizer=llada_tokenizer)
    decoder = {"126000": {"content": "<|mdm_mask|>", "special": True}}
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"added_tokens_decoder": decoder}))
    with pytest.raises(ValueError, match="tokenizer.json has <.mdm_mask.> at id 126336 but tokenizer_config.json "
                                         "at id 126000"):
        read_config(folder)
    # a tokenizer of unknown size that does not name the image and task tokens
    small = word_tokenizer(str(tmp_path / "small" / TOKENIZER_FILE), 64, {1: "<|mdm_mask|>", 2: "<|startoftext|>",
                                                                           3: "<|endoftext|>"})
    folder = write_folder(tmp_path / "other", {**LLADA_8B, "vocab_size": 64, "embedding_size": 128,
                                               "mask_token_id": 1, "eos_token_id": 3, "pad_token_id": 3},
                          weights=False, tokenizer=small)
    with pytest.raises(ValueError, match="no <.soi.>, <.eoi.>, <.interleave.>, <.t2it.> and its size 64 matches no "
                                         "released layout.*add 'parapipe_vocab'"):
        read_config(folder)
    # no tokenizer files and rows that are not LLaDA's or MMaDA's: nothing to derive ids from
    folder = write_folder(tmp_path / "bare", LUMINA, weights=False)
    with pytest.raises(ValueError, match="no tokenizer files, and embedding_size=134548"):
        read_config(folder)


def test_vocab_dataclass_accepts_text_only_and_refuses_bad_layouts():
    assert LLADA_VOCAB.with_codebook(8192) == MMADA_VOCAB
    assert Vocab.from_dict(LLADA_VOCAB.to_dict()) == LLADA_VOCAB
    with pytest.raises(ValueError, match="image codes end at 134541 but vocab_size is 126464"):
        Vocab(**{**LLADA_VOCAB.to_dict(), "codebook_size": 8192})
