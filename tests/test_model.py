"""The LLaDA backbone: bidirectionality, padding, RoPE, checkpoints, the 8B layout on meta."""
import json
import math

import pytest
import torch

from model.checkpoint import INDEX_FILE, build_meta, from_pretrained, save_pretrained
from model.tokens import MMADA_VOCAB
from model.transformer import (EXPLICIT_ATTENTION_MAX_KEYS, DiffusionLM, ModelConfig, RMSNorm, apply_rope, attention,
                               image_position_ids, rope_cos_sin)
from tests.helpers import VOCAB, tiny_model


def test_logits_shape_and_bidirectional_attention():
    m = tiny_model()
    x = torch.randint(0, VOCAB.vocab_size, (2, 12))
    logits = m(x)
    assert logits.shape == (2, 12, VOCAB.vocab_size)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % VOCAB.vocab_size  # change only the LAST token
    delta = (m(y)[:, 0] - logits[:, 0]).abs().max()
    assert delta > 1e-4, "position 0 must see a later token: attention is not bidirectional"


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_explicit_cpu_attention_matches_sdpa_with_pads_and_grouped_heads(kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=g)  # (B, H, Lq, hd): 5 queries against 11 keys, as forward_cols asks
    k, v = torch.randn(2, 3, kv_heads, 11, 8, generator=g)
    key_mask = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    key_mask[0, ..., :4] = False  # a left-padded row
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=kv_heads != 4)
    assert torch.allclose(attention(q, k, v, key_mask), ref, atol=1e-5)
    assert torch.allclose(attention(q, k, v, None), torch.nn.functional.scaled_dot_product_attention(
        q, k, v, enable_gqa=kv_heads != 4), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 in, bf16 out; scores and softmax in fp32
        out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_mask)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.03
    # past the limit, without autograd (sampling), or on a GPU, it is SDPA itself
    with torch.no_grad():
        assert torch.equal(attention(q, k, v, key_mask), ref)
    long_k, long_v = torch.randn(2, 1, kv_heads, EXPLICIT_ATTENTION_MAX_KEYS + 1, 8, generator=g)
    assert torch.equal(attention(q[:1], long_k, long_v, None), torch.nn.functional.scaled_dot_product_attention(
        q[:1], long_k, long_v, enable_gqa=kv_heads != 4))


def test_pad_contents_do_not_change_real_positions():
    m = tiny_model()
    real = torch.randint(8, VOCAB.vocab_size, (1, 9))
    mask = torch.tensor([[False] * 3 + [True] * 9])
    a = m(torch.cat([torch.full((1, 3), 0), real], 1), mask)
    b = m(torch.cat([torch.randint(0, VOCAB.vocab_size, (1, 3)), real], 1), mask)
    alone = m(real)
    torch.testing.assert_close(a[:, 3:], b[:, 3:])
    # left padding skips positions too, so a padded row equals the row alone
    torch.testing.assert_close(a[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_last_n_matches_full_logits():
    m = tiny_model()
    x = torch.randint(0, VOCAB.vocab_size, (2, 10))
    torch.testing.assert_close(m(x, last_n=4), m(x)[:, -4:])
    cols = torch.tensor([0, 2])  # the head on two of the last 4 positions only
    torch.testing.assert_close(m(x, last_n=4, head_cols=cols), m(x)[:, [6, 8]])
    where = torch.tensor([[True, False, False, True], [False, True, False, False]])  # per row: 2 slots, then 1
    torch.testing.assert_close(m(x, last_n=4, head_mask=where), torch.stack([m(x)[0, 6], m(x)[0, 9], m(x)[1, 7]]))


def test_forward_cols_per_row_columns_match_the_full_pass_with_pads():
    m = tiny_model()
    x = torch.randint(8, VOCAB.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded row: positions come from the mask
    kv = []
    full = m(x, mask, kv=kv)  # (2, 10, V)
    cols = torch.tensor([[3, 8, 8], [2, 5, 9]])  # each row its own columns; row 0 repeats one
    torch.testing.assert_close(m.forward_cols(x, cols, mask, kv), torch.stack([full[0, [3, 8, 8]], full[1, [2, 5, 9]]]),
                               atol=1e-5, rtol=1e-5)
    where = torch.tensor([[False, True, False], [True, False, True]])  # the head on three of them
    torch.testing.assert_close(m.forward_cols(x, cols, mask, kv, head_mask=where),
                               torch.stack([full[0, 8], full[1, 2], full[1, 9]]), atol=1e-5, rtol=1e-5)
    # fresh k/v land in each row's own columns only: a changed token in row 1 reaches its cache
    y = x.clone()
    y[1, 5] = 8
    m.forward_cols(y, cols, mask, kv)
    kv2 = []
    m(y, mask, kv=kv2)
    torch.testing.assert_close(kv[0][0][1, :, 5], kv2[0][0][1, :, 5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv[0][0][0], kv2[0][0][0], atol=1e-5, rtol=1e-5)  # row 0 had nothing new

def test_rope_scores_depend_only_on_relative_position():
    hd = 8
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(i, j):
        cos, sin = rope_cos_sin(torch.tensor([[i, j]]), hd, 10000.0)
        qi = apply_rope(q, cos[:, :, :1], sin[:, :, :1])
        kj = apply_rope(k, cos[:, :, 1:], sin[:, :, 1:])
        return (qi * kj).sum().item()

    assert score(3, 7) == pytest.approx(score(10, 14), abs=1e-5)
    assert score(3, 7) != pytest.approx(score(3, 8), abs=1e-3)


def test_rope_rotate_half_on_first_pair():
    # NeoX layout: dims i and i + hd/2 rotate together with frequency theta^(-2i/hd)
    hd, pos = 4, 5
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, hd)
    cos, sin = rope_cos_sin(torch.tensor([[pos]]), hd, 10000.0)
    out = apply_rope(x, cos, sin).flatten()
    torch.testing.assert_close(out, torch.tensor([math.cos(pos), 0.0, math.sin(pos), 0.0]))


def test_rmsnorm_computes_in_fp32():
    n = RMSNorm(4, 1e-5)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = x / torch.sqrt((x ** 2).mean() + 1e-5)
    torch.testing.assert_close(n(x), expected)
    assert n(x.bfloat16()).dtype == torch.bfloat16


def test_image_position_ids_follow_each_soi_row_major():
    soi = 9  # two 2x3 image blocks; the codes' own ids do not matter, only the <soi> before them
    ids = torch.tensor([[5, soi, 1, 2, 3, 4, 5, 6, 7, soi, 0, 0, 0, 0, 0, 0, 3, 3]])
    row, col, inside = image_position_ids(ids, soi, (2, 3))
    assert inside[0].int().tolist() == [0, 0] + [1] * 6 + [0, 0] + [1] * 6 + [0, 0]
    assert row[0, inside[0]].tolist() == [0, 0, 0, 1, 1, 1] * 2
    assert col[0, inside[0]].tolist() == [0, 1, 2] * 2 * 2


def test_image_position_embeddings_change_only_image_blocks_and_survive_save_load(tmp_path):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, vocab_size=VOCAB.vocab_size,
                      embedding_size=VOCAB.vocab_size, image_pos_grid=[2, 2], soi_id=VOCAB.soi_id)
    assert cfg.image_pos_grid == (2, 2)
    m = DiffusionLM(cfg).init_weights(0)
    ids = torch.tensor([[VOCAB.bos_id, VOCAB.soi_id, 11, 12, 13, 14, VOCAB.eoi_id, 15]])
    emb = m.embed(ids)  # (1, 8, D)
    plain = m.model.transformer.wte(ids)
    changed = (emb - plain).abs().amax(-1)[0] > 0
    assert changed.tolist() == [False, False, True, True, True, True, False, False]
    kv = []
    full = m(ids, kv=kv)
    cols = torch.tensor([0, 3, 7])
    torch.testing.assert_close(m.forward_cols(ids, cols, None, kv), full[:, cols], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.forward_cols(ids, cols, None, kv, head_cols=torch.tensor([2])), full[:, [7]],
                               atol=1e-5, rtol=1e-5)
    save_pretrained(m, VOCAB, tmp_path / "pos")
    loaded, _ = from_pretrained(str(tmp_path / "pos"))
    assert loaded.config == cfg
    torch.testing.assert_close(loaded(ids), full)
    with pytest.raises(ValueError, match="soi_id=None"):
        ModelConfig(image_pos_grid=(2, 2))


def test_save_load_round_trip_single_and_sharded(tmp_path):
    m = tiny_model(seed=3)
    x = torch.randint(0, VOCAB.vocab_size, (1, 8))
    save_pretrained(m, VOCAB, tmp_path / "single")
    save_pretrained(m, VOCAB, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 3
    for folder in ("single", "sharded"):
        loaded, vocab = from_pretrained(str(tmp_path / folder))
        assert vocab == VOCAB
        torch.testing.assert_close(loaded(x), m(x))
    bf16, _ = from_pretrained(str(tmp_path / "single"), dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_load_errors_name_the_problem(tmp_path):
    m = tiny_model()
    save_pretrained(m, VOCAB, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="parameters missing"):
        from_pretrained(str(tmp_path))
    cfg["n_layers"], cfg["d_model"] = 2, 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=30, n_heads=4)


def test_8b_config_on_meta_has_released_names_and_shapes():
    # LLaDA-8B / MMaDA-8B config.json values (upstream-facts §1.1, §1.2)
    cfg = ModelConfig.from_dict({"model_type": "llada", "d_model": 4096, "n_layers": 32, "n_heads": 32,
                                 "n_kv_heads": 32, "mlp_hidden_size": 12288, "vocab_size": 126464,
                                 "embedding_size": 134656, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                                 "weight_tying": False, "include_bias": False, "use_cache": False})
    m = build_meta(cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["model.transformer.wte.weight"] == (134656, 4096)
    assert shapes["model.transformer.ff_out.weight"] == (134656, 4096)
    assert shapes["model.transformer.ln_f.weight"] == (4096,)
    per_block = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096),
                 "attn_out": (4096, 4096), "ff_proj": (12288, 4096), "up_proj": (12288, 4096),
                 "ff_out": (4096, 12288), "attn_norm": (4096,), "ff_norm": (4096,)}
    for i in (0, 31):
        for name, shape in per_block.items():
            assert shapes[f"model.transformer.blocks.{i}.{name}.weight"] == shape
    assert len(shapes) == 3 + 32 * 9
    assert next(m.parameters()).is_meta
    assert m.num_params() == 8_082_690_048  # 2*134656*4096 + 4096 + 32*(4*4096^2 + 3*4096*12288 + 2*4096)
    assert MMADA_VOCAB.image_offset + MMADA_VOCAB.codebook_size <= cfg.rows
