"""SFT core: sequences, drops, cache, sharding, dropout, lr schedule, train steps, toy evaluation."""
import contextlib
import copy
import dataclasses
import json

import pytest
import torch

from model.image_tokenizer import PatchVQ
from model.layout import IMAGE, PROMPT, TEXT, OutputShape, edit_prompt, output_target
from model.tokens import tiny_vocab
from model.transformer import DiffusionLM, ModelConfig
from tasks.sft import sft_data
from tasks.sft.image_codes import png_to_tensor
from tasks.sft.sft_data import (SequenceConfig, TokenisedSet, batch_stream, build_prompt, dropout_flags, epoch_batches,
                                epoch_order, load_or_tokenise, pick_traces, tokenise_rows)
from tasks.sft.sft_loop import (SFTConfig, lr_at, make_optimizer, micro_batch_loss, resume_state, train, train_step,
                                training_module, training_state)
from tasks.common.tokenizer import build_tiny_tokenizer
from tasks.toy import PRESETS
from tasks.sft.toy_eval import (decode_outputs, evaluate, greedy_sampler, score, select_per_category, to_eval_results,
                                toy_rows, toy_scenes)

PRESET = PRESETS["tiny"]
SEQ = SequenceConfig(text_tokens=40, instruction_tokens=24)
CATS = ("recolour", "remove", "replace")


@pytest.fixture(scope="module")
def toy():
    rows = toy_rows(PRESET, 48, "train", seed=0, categories=CATS)
    val = toy_rows(PRESET, 12, "val", seed=0, categories=CATS)
    images = torch.stack([png_to_tensor(r[k]) for r in rows for k in ("input_image", "output_image")])
    vq = PatchVQ.fit(images, patch_size=8, codebook_size=16)
    tok = build_tiny_tokenizer([r["instruction"] for r in rows] + [r["reference_trace"] for r in rows], 512)
    vocab = tiny_vocab(len(tok), vq.codebook_size)
    return dict(rows=rows, val=val, vq=vq, tok=tok, vocab=vocab)


def _tokenise(toy, rows, seq=SEQ, traces=None):
    return tokenise_rows(rows, pick_traces(rows, traces), toy["tok"], toy["vq"], toy["vocab"], seq)


def test_sequences_have_the_layout_and_regions(toy):
    vocab, vq, tok = toy["vocab"], toy["vq"], toy["tok"]
    data = _tokenise(toy, toy["rows"])
    assert len(data) == 48 and data.dropped == {"no_trace": 0, "trace_too_long": 0, "instruction_too_long": 0}
    r = toy["rows"][0]
    in_codes = vq.encode(png_to_tensor(r["input_image"])).flatten().tolist()
    out_codes = vq.encode(png_to_tensor(r["output_image"])).flatten().tolist()
    instr, trace = tok.encode(r["instruction"]), tok.encode(r["reference_trace"])
    shape = OutputShape(image_tokens=16, text_tokens=40)
    assert data.input_codes[0] == in_codes and data.instruction[0] == instr
    assert data.output[0] == output_target(vocab, shape, out_codes, trace)
    prompt = build_prompt(vocab, SEQ, data.input_codes[0], data.instruction[0])
    assert prompt == edit_prompt(vocab, in_codes, instr + [vocab.eos_id] * (24 - len(instr)))
    assert len(prompt) == 1 + 18 + 1 + 24 + 1  # task, <soi> 16 codes <eoi>, <bos> padded instruction <eos>
    batch = next(epoch_batches(data, vocab, SEQ, 8, epoch=0, seed=0))
    assert batch.input_ids.shape == (8, len(prompt) + shape.length)  # fixed prompt length: no padding at all
    assert batch.attention_mask.all()
    assert ((batch.regions == IMAGE).sum(1) == 16).all() and ((batch.regions == TEXT).sum(1) == 40).all()
    assert (batch.regions[:, :len(prompt)] == PROMPT).all()
    # output image slot j sits at the same distance from input image slot j in every row
    out_img = (batch.regions == IMAGE).nonzero()[:, 1].view(8, 16)
    assert (out_img - torch.arange(2, 18) == out_img[0, 0] - 2).all()


def test_long_traces_and_missing_traces_are_dropped_and_counted(toy):
    rows = [dict(r) for r in toy["rows"]]
    rows[0]["reference_trace"] = None
    lengths = [len(toy["tok"].encode(r["reference_trace"])) for r in rows[1:]]
    seq = SequenceConfig(text_tokens=24, instruction_tokens=5)
    too_long = sum(n + 1 > 24 for n in lengths)
    instr_long = sum(n + 1 <= 24 and len(toy["tok"].encode(r["instruction"])) > 5 for n, r in zip(lengths, rows[1:]))
    assert too_long > 0 and instr_long > 0
    data = _tokenise(toy, rows, seq)
    assert data.dropped == {"no_trace": 1, "trace_too_long": too_long, "instruction_too_long": instr_long}
    assert len(data) + sum(data.dropped.values()) == len(rows)
    # a traces-table 'ok' trace wins over the reference trace; failed ones are ignored
    traces = [{"sample_id": rows[0]["sample_id"], "generator": "g1", "text": "short one", "status": "ok"},
              {"sample_id": rows[1]["sample_id"], "generator": "g1", "text": "bad", "status": "failed"}]
    assert pick_traces(rows[:2], traces) == ["short one", rows[1]["reference_trace"]]


def test_second_call_loads_from_cache(toy, tmp_path, monkeypatch):
    calls = []
    real = sft_data.tokenise_rows
    monkeypatch.setattr(sft_data, "tokenise_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = (toy["tok"], toy["vq"], toy["vocab"], SEQ, str(tmp_path))
    first = load_or_tokenise(toy["rows"], *args)
    second = load_or_tokenise(toy["rows"], *args)
    assert len(calls) == 1 and not first.from_cache and second.from_cache
    assert len(list(tmp_path.glob("sft-*.parquet"))) == 1
    for col in sft_data.COLUMNS:
        assert getattr(first, col) == getattr(second, col)
    assert second.dropped == first.dropped
    # a changed trace, layout or traces table is a different key
    load_or_tokenise(toy["rows"], *args[:3], SequenceConfig(text_tokens=40, instruction_tokens=25), str(tmp_path))
    load_or_tokenise(toy["rows"], *args, traces=[{"sample_id": toy["rows"][0]["sample_id"], "generator": "g",
                                                  "text": "other text", "status": "ok"}])
    assert len(calls) == 3


def _fake_set(n: int) -> TokenisedSet:
    vocab = tiny_vocab(32, 16)
    shape = OutputShape(image_tokens=4, text_tokens=6)
    out = [output_target(vocab, shape, [i % 16] * 4, [10, 11]) for i in range(n)]
    return TokenisedSet(sample_id=[f"s{i}" for i in range(n)], kind=["edit"] * n, category=["x"] * n,
                        split=["train"] * n, input_codes=[[1, 2, 3, 4]] * n, instruction=[[20, 21, 22]] * n,
                        output=out), vocab, SequenceConfig(text_tokens=6)


def test_shards_are_disjoint_and_cover_the_data():
    for epoch in (0, 1):
        r0, r1 = (epoch_order(10, epoch, seed=3, rank=r, world_size=2) for r in (0, 1))
        assert len(r0) == len(r1) == 5 and not set(r0) & set(r1) and set(r0) | set(r1) == set(range(10))
    assert epoch_order(10, 0, 3, 0, 2) != epoch_order(10, 1, 3, 0, 2)  # reshuffled per epoch
    assert len(epoch_order(11, 0, 3, 1, 2)) == 5  # equal step counts on every rank
    data, vocab, seq = _fake_set(20)
    n0 = sum(1 for _ in epoch_batches(data, vocab, seq, 4, 0, 0, rank=0, world_size=2))
    assert n0 == 2
    with pytest.raises(ValueError, match="rank=2"):
        epoch_order(10, 0, 0, rank=2, world_size=2)


def test_stream_resumes_at_a_step():
    data, vocab, seq = _fake_set(20)
    full = batch_stream(data, vocab, seq, 4, seed=1, cond_dropout=0.3)
    ref = [next(full).input_ids for _ in range(9)]  # crosses an epoch boundary (5 batches per epoch)
    resumed = batch_stream(data, vocab, seq, 4, seed=1, cond_dropout=0.3, start_step=6)
    for k in range(6, 9):
        assert torch.equal(next(resumed).input_ids, ref[k])


def test_cond_dropout_rate_is_p_and_independent():
    drop_instr, drop_img = dropout_flags(40000, 0.1, epoch=0, seed=0)
    assert abs(drop_instr.mean() - 0.1) < 0.006 and abs(drop_img.mean() - 0.1) < 0.006
    assert abs((drop_instr & drop_img).mean() - 0.01) < 0.003
    data, vocab, seq = _fake_set(2000)
    no_img = no_text = 0
    for b in epoch_batches(data, vocab, seq, 100, epoch=0, seed=0, cond_dropout=0.25):
        prompt = b.input_ids[:, :-OutputShape(4, 6).length]
        no_img += int((~(prompt >= vocab.image_offset).any(1)).sum())
        no_text += int((~(prompt == 20).any(1)).sum())
    assert abs(no_img / 2000 - 0.25) < 0.03 and abs(no_text / 2000 - 0.25) < 0.03


def test_lr_schedule_warmup_then_cosine():
    cfg = SFTConfig(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: cos = 0
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + 2 ** -0.5))  # quarter way: cos(pi/4)
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)


def _tiny_model(vocab) -> DiffusionLM:
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=vocab.vocab_size,
                      embedding_size=vocab.vocab_size, rope_theta=10000.0)
    return DiffusionLM(cfg).init_weights(0)


def _eval_loss(model, batch, cfg, mask_id) -> float:
    with torch.no_grad():
        return float(micro_batch_loss(model, batch, cfg, mask_id, torch.Generator().manual_seed(123)).total)


def test_train_steps_reduce_the_loss(toy):
    vocab = toy["vocab"]
    data = _tokenise(toy, toy["rows"])
    cfg = SFTConfig(lr=3e-3, warmup_steps=2, total_steps=30, batch_size=8, grad_accum=2, bf16=False,
                    eval_interval=0, log_interval=0)
    model = _tiny_model(vocab)
    probe = next(epoch_batches(data, vocab, SEQ, 48, epoch=0, seed=9))
    before = _eval_loss(model, probe, cfg, vocab.mask_id)
    stream = batch_stream(data, vocab, SEQ, cfg.batch_size, seed=0)  # no dropout: every row is full length
    history = train(model, stream, cfg, vocab.mask_id)
    after = _eval_loss(model, probe, cfg, vocab.mask_id)
    assert len(history) == 30 and history[-1]["step"] == 30
    assert history[0]["tokens"] == 2 * 8 * (1 + 18 + 1 + 24 + 1 + 59)
    assert history[-1]["lr"] == pytest.approx(lr_at(29, cfg))
    assert after < 0.6 * before, (before, after)


def test_bf16_autocast_step_runs_and_matches_fp32(toy):
    vocab = toy["vocab"]
    data = _tokenise(toy, toy["rows"])
    batch = next(epoch_batches(data, vocab, SEQ, 16, epoch=0, seed=0))
    losses = {}
    for bf16 in (False, True):
        cfg = SFTConfig(bf16=bf16, warmup_steps=1, total_steps=10)
        model = _tiny_model(vocab)
        m = train_step(model, make_optimizer(model, cfg), [batch], cfg, torch.Generator().manual_seed(0), 0,
                       vocab.mask_id)
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values()) and m["grad_norm"] > 0
        assert all(p.dtype == torch.float32 for p in model.parameters())
        losses[bf16] = m["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=0.03)


def test_compiled_training_takes_the_same_steps_as_eager(toy):
    """SFTConfig.compile: the same three optimiser steps, within float rounding, and the plain module (what
    checkpoints and evaluation use) holds the trained weights under its own names."""
    vocab = toy["vocab"]
    data = _tokenise(toy, toy["rows"])
    runs = {}
    for compiled in (False, True):
        cfg = SFTConfig(lr=3e-3, warmup_steps=1, total_steps=3, batch_size=8, bf16=False, compile=compiled,
                        eval_interval=0, log_interval=0)
        model = _tiny_model(vocab)
        history = train(model, batch_stream(data, vocab, SEQ, cfg.batch_size, seed=0), cfg, vocab.mask_id)
        runs[compiled] = ([h["loss"] for h in history], model.state_dict())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4) and runs[True][0][0] > runs[True][0][-1]
    assert runs[True][1].keys() == runs[False][1].keys()
    assert all(torch.allclose(runs[True][1][k], v, atol=1e-4) for k, v in runs[False][1].items())
    model = _tiny_model(vocab)
    assert training_module(model, SFTConfig()) is model
    assert isinstance(training_module(model, SFTConfig(compile=True)), torch._dynamo.eval_frame.OptimizedModule)


class OracleModel(torch.nn.Module):
    """Logits that put all mass on the true output part of each prompt (looked up by its ids)."""

    def __init__(self, prompts: list[list[int]], outputs: list[list[int]], vocab_size: int):
        super().__init__()
        self.table = {tuple(p): o for p, o in zip(prompts, outputs)}
        self.V = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, last_n=None):
        M = last_n
        logits = torch.zeros(len(input_ids), M, self.V)
        for b in range(len(input_ids)):
            prompt = input_ids[b][attention_mask[b]][:-M].tolist()
            logits[b, torch.arange(M), torch.tensor(self.table[tuple(prompt)])] = 30.0
        return logits


def test_toy_eval_scores_an_oracle_1_and_copy_input_0_on_recolour(toy):
    vocab, vq, tok = toy["vocab"], toy["vq"], toy["tok"]
    train_set = _tokenise(toy, toy["rows"])
    val = select_per_category(_tokenise(toy, toy["val"]), 4)
    scenes = toy_scenes(toy["val"])
    assert len(val) == 12
    # the true output parts, decoded and scored, are right on every metric
    images, texts = decode_outputs(torch.tensor(val.output), OutputShape(16, 40), vocab, tok, vq)
    truth = [scenes[s] for s in val.sample_id]
    rows = score(list(images), texts, truth, val.category, PRESET)
    assert {(r["metric"], r["category"]) for r in rows} == {(m, c) for m in ("exact_image", "text_correct", "agreement")
                                                            for c in CATS + ("overall",)}
    assert all(r["value"] == 1.0 for r in rows)
    # through the sampler: an oracle model scores 1.0; the copy-input baseline never solves an edit
    prompts = [build_prompt(vocab, SEQ, val.input_codes[i], val.instruction[i]) for i in range(len(val))]
    oracle = OracleModel(prompts, val.output, vocab.vocab_size)
    rows = evaluate(oracle, val, scenes, train_set, vocab, SEQ, tok, vq, PRESET, greedy_sampler(40, 8, 4),
                    batch_size=5)
    got = {(r["method"], r["metric"], r["category"]): r for r in rows}
    assert all(got[("model", m, c)]["value"] == 1.0 for m in ("exact_image", "text_correct", "agreement")
               for c in CATS + ("overall",))
    assert got[("copy_input", "exact_image", "recolour")]["value"] == 0.0
    assert got[("copy_input", "exact_image", "overall")] == {"method": "copy_input", "metric": "exact_image",
                                                             "category": "overall", "value": 0.0, "n": 12}
    assert 0.0 <= got[("common_output", "exact_image", "overall")]["value"] < 1.0
    out = to_eval_results(rows, "run-1", "ckpt/step-10", 10)
    assert out[0]["suite"].startswith("toy/") and out[0]["metric"].count("/") == 1
    assert json.loads(toy["val"][0]["extra_json"])["toy"]["category"] in CATS


def test_recipe_fits_its_model_and_sampler():
    from tasks.sft.sft_loop import TOY_TINY_RECIPE

    r = TOY_TINY_RECIPE
    cfg = ModelConfig(**r.model, vocab_size=600, embedding_size=600)
    prompt = 1 + 18 + 1 + r.seq.instruction_tokens + 1
    assert prompt + OutputShape(16, r.seq.text_tokens).length <= cfg.max_sequence_length
    sampler = greedy_sampler(r.seq.text_tokens, r.sampler_steps, r.sampler_image_steps)
    assert sampler.image_temperature == 0 and sampler.text_block_length == r.seq.text_tokens
    assert lr_at(r.sft.total_steps - 1, r.sft) < lr_at(r.sft.warmup_steps, r.sft) == r.sft.lr
    with pytest.raises(ValueError, match="objective"):
        dataclasses.replace(r.sft, objective="nope")
    with pytest.raises(ValueError, match="warmup_steps"):
        dataclasses.replace(r.sft, warmup_steps=r.sft.total_steps + 1)


def test_image_coeff_scales_only_the_image_term(toy):
    vocab = toy["vocab"]
    batch = next(epoch_batches(_tokenise(toy, toy["rows"]), vocab, SEQ, 8, epoch=0, seed=0))
    model = _tiny_model(vocab)
    parts = {}
    for coeff in (1.0, 3.0):
        cfg = SFTConfig(image_coeff=coeff, bf16=False)
        with torch.no_grad():
            parts[coeff] = micro_batch_loss(model, batch, cfg, vocab.mask_id, torch.Generator().manual_seed(5))
    assert float(parts[3.0].image) == pytest.approx(float(parts[1.0].image))
    assert float(parts[3.0].total - parts[1.0].total) == pytest.approx(2 * float(parts[1.0].image), rel=1e-5)


class NoSyncCounter(DiffusionLM):
    """A DiffusionLM with DDP's no_sync() hook, counting how often gradient sync is skipped."""

    skipped = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.skipped += 1
        yield


def test_resume_from_training_state_repeats_the_run_and_skips_sync_on_accumulation(toy):
    vocab = toy["vocab"]
    data = _tokenise(toy, toy["rows"])
    cfg = SFTConfig(batch_size=8, grad_accum=3, warmup_steps=1, total_steps=4, bf16=False)
    model = NoSyncCounter(_tiny_model(vocab).config).init_weights(0)
    opt, gen = make_optimizer(model, cfg), torch.Generator().manual_seed(0)
    stream = batch_stream(data, vocab, SEQ, 8, seed=0)
    step = lambda m, o, g, s, k: train_step(m, o, [next(s) for _ in range(3)], cfg, g, k, vocab.mask_id)  # noqa: E731
    step(model, opt, gen, stream, 0)
    assert model.skipped == 2  # 3 micro-batches: the first two skip the all-reduce
    state = copy.deepcopy(training_state(model, opt, 1, gen))
    ref = [step(model, opt, gen, stream, k) for k in (1, 2)]
    model2 = NoSyncCounter(model.config)
    opt2, gen2 = make_optimizer(model2, cfg), torch.Generator()
    start = resume_state(state, model2, opt2, gen2)
    stream2 = batch_stream(data, vocab, SEQ, 8, seed=0, start_step=start * cfg.grad_accum)
    got = [step(model2, opt2, gen2, stream2, k) for k in (start, start + 1)]
    assert start == 1 and got == ref
