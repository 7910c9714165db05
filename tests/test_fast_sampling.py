"""Fast sampling: exact modes reproduce the reference sampler token for token; the approximate
ones (KV caches, threshold decoding) respect their options and their caches invalidate."""
import dataclasses

import pytest
import torch

from model.cache import ImageLogitCache, StepForward, image_slots_to_recompute
from model.layout import TEXT, OutputShape, edit_prompt, generation_prompt, output_regions
from model.sampling import SamplerConfig, generate
from model.schedules import image_keep_count, image_step_indices
from tests.helpers import VOCAB, MockModel, tiny_model
from tests.sampler_reference import reference_generate

SHAPE = OutputShape(image_tokens=16, text_tokens=16)
TXT = torch.tensor(output_regions(SHAPE)) == TEXT
PROMPTS = [edit_prompt(VOCAB, list(range(16)), [20, 21]), generation_prompt(VOCAB, [22, 23, 24])]
UNCOND = [edit_prompt(VOCAB, None, None), generation_prompt(VOCAB, None)]
BASES = {
    "greedy": dict(steps=8, image_steps=4, text_block_length=16, image_temperature=0.0),
    "sampled+cfg": dict(steps=8, image_steps=4, text_block_length=16, text_temperature=1.0, text_cfg=1.0,
                        image_cfg=2.0),
    "blocks+image_cfg": dict(steps=8, image_steps=4, text_block_length=8, image_cfg=1.5),
    "sequential": dict(steps=8, image_steps=4, text_block_length=8, text_temperature=0.7, image_cfg=1.0,
                       mode="sequential"),
}
EXACT = {"default": {}, "separate_cfg_passes": dict(batch_cfg=False),
         "prefix_refresh_1": dict(cache="prefix", cache_refresh=1),
         "dual_refresh_1": dict(cache="dual", cache_refresh=1)}


def _run(sampler, cfg, model, seed=5, **kw):
    return sampler(model, VOCAB, SHAPE, PROMPTS, cfg, UNCOND, num_samples=2,
                   generator=torch.Generator().manual_seed(seed), **kw)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.mark.parametrize("base", BASES)
def test_exact_modes_give_the_reference_tokens(model, base):
    cfg = SamplerConfig(**BASES[base])
    ref = _run(reference_generate, cfg, model)
    for name, extra in EXACT.items():
        out = _run(generate, dataclasses.replace(cfg, **extra), model)
        assert torch.equal(out.tokens, ref.tokens), name
        assert out.nfe == ref.nfe and out.partial_passes == 0, name


def test_exact_trace_matches_the_reference(model):
    cfg = SamplerConfig(steps=8, image_steps=4, text_block_length=8, text_temperature=1.0)
    ref = _run(reference_generate, cfg, model, trace=True)
    out = _run(generate, dataclasses.replace(cfg, cache="dual", cache_refresh=1), model, trace=True)
    assert torch.equal(out.step_map, ref.step_map)
    assert torch.allclose(out.logp, ref.logp, equal_nan=True)


def test_threshold_one_degenerates_to_one_token_per_step(model):
    # T == S, one block: conf > 1.0 never holds, so exactly the most confident slot per step, as the
    # fixed schedule transfer_counts(16, 16) = [1] * 16 does
    base = SamplerConfig(steps=16, image_steps=4, text_block_length=16, text_temperature=1.0)
    ref = _run(reference_generate, base, model)
    out = _run(generate, dataclasses.replace(base, text_threshold=1.0), model, record_steps=tuple(range(16)))
    assert torch.equal(out.tokens, ref.tokens)
    for k in range(16):
        assert ((out.snapshots[k][:, TXT] == VOCAB.mask_id).sum(-1) == 15 - k).all()


def test_threshold_one_keeps_pace_when_text_outnumbers_steps(model):
    base = SamplerConfig(steps=8, image_steps=4, text_block_length=16)  # 2 tokens per step
    ref = _run(reference_generate, base, model)
    out = _run(generate, dataclasses.replace(base, text_threshold=1.0), model)
    assert torch.equal(out.tokens, ref.tokens)


def test_low_threshold_decodes_the_block_at_once_and_skips_idle_steps():
    cfg = SamplerConfig(steps=16, image_steps=4, text_block_length=8, text_threshold=0.0)
    m = MockModel(VOCAB.vocab_size)
    out = _run(generate, cfg, m, record_steps=(0, 1))
    text0, text1 = out.snapshots[0][:, TXT], out.snapshots[1][:, TXT]
    assert (text0[:, :8] != VOCAB.mask_id).all() and (text0[:, 8:] == VOCAB.mask_id).all()  # block 0 only
    assert (text1 != VOCAB.mask_id).all()
    img = image_step_indices(16, 4, 4)
    assert out.nfe == 2 + len(img) and m.calls == 4 * out.nfe  # 4 rows; text in 2 passes, then image steps only
    assert not (out.tokens == VOCAB.mask_id).any()


def test_threshold_finishes_text_by_step_s_per_row():
    # a model whose confidence is never high: the pace floor still finishes every row in S steps
    cfg = SamplerConfig(steps=4, image_steps=2, text_block_length=4, text_threshold=0.99)
    out = _run(generate, cfg, MockModel(VOCAB.vocab_size), record_steps=(3,))
    assert ((out.snapshots[3][:, TXT] == VOCAB.mask_id).sum() == 0)


IMG = torch.tensor(output_regions(SHAPE)) != TEXT  # image slots and the sentinels around them


def test_image_threshold_one_is_the_fixed_schedule(model):
    for base in ("greedy", "sampled+cfg", "sequential"):
        cfg = SamplerConfig(**BASES[base])
        ref = _run(reference_generate, cfg, model)
        out = _run(generate, dataclasses.replace(cfg, image_threshold=1.0), model)
        assert torch.equal(out.tokens, ref.tokens) and out.nfe == ref.nfe, base


def test_image_threshold_zero_decodes_the_image_in_one_step(model):
    cfg = SamplerConfig(steps=8, image_steps=4, text_block_length=8, mode="sequential", image_threshold=0.0)
    out = _run(generate, cfg, model, record_steps=(8,))
    assert out.nfe == 8 + 1  # 8 text steps, then one image step; the other 3 are skipped
    assert not (out.snapshots[8] == VOCAB.mask_id).any()


def test_image_threshold_rows_go_at_their_own_pace_never_slower_than_the_schedule():
    # row r's image logits are sure (one code far ahead) on half the slots when r is odd, unsure elsewhere
    def fn(ids):
        logits = torch.zeros(*ids.shape, VOCAB.vocab_size)
        odd = torch.arange(ids.shape[0]) % 2 == 1
        logits[odd, -SHAPE.length::2, VOCAB.image_offset + 7] = 30.0
        return logits
    cfg = SamplerConfig(steps=8, image_steps=8, text_block_length=16, mode="sequential", image_threshold=0.9,
                        image_temperature=0.0, image_noise=0.0)
    out = _run(generate, cfg, MockModel(VOCAB.vocab_size, fn), record_steps=tuple(range(8, 16)))
    n = SHAPE.image_tokens
    for j, step in enumerate(range(8, 16)):
        left = (out.snapshots[step][:, IMG] == VOCAB.mask_id).sum(-1)  # (4,) rows: prompt-major, 2 samples each
        planned = image_keep_count(n, (j + 1) / 8, n if j == 0 else planned_prev, j == 7)
        assert (left <= planned).all(), (step, left, planned)
        if j == 0:
            assert left[1] == min(planned, n // 2) and left[0] == planned  # odd rows: the sure half is kept
        planned_prev = planned
    assert not (out.tokens == VOCAB.mask_id).any()


def test_rows_with_nothing_left_to_decode_are_not_run():
    # the generation prompt's rows (it holds id 22) are sure of everything and finish in one pass; the edit
    # prompt's rows follow the schedule. Rows are run only while they have work: the sure rows once for text
    # and once at the first image step, the others at every step; tokens as if each prompt ran alone.
    def fn(ids):
        logits = torch.zeros(*ids.shape, VOCAB.vocab_size)
        sure = (ids == 22).any(1)
        logits[sure, :, VOCAB.image_offset + 7] = 30.0  # image slots: one code far ahead
        logits[sure[:, None] & TXT_ALL[None, -ids.shape[1]:], 40] = 60.0  # text slots: one word further ahead
        return logits
    cfg = SamplerConfig(steps=8, image_steps=4, text_block_length=16, text_threshold=0.9, image_threshold=0.9,
                        image_temperature=0.0, mode="sequential")
    m = MockModel(VOCAB.vocab_size, fn)
    out = _run(generate, cfg, m)
    alone = []
    for p, u in zip(PROMPTS, UNCOND):
        one = MockModel(VOCAB.vocab_size, fn)
        res = generate(one, VOCAB, SHAPE, [p], cfg, [u], num_samples=2, generator=torch.Generator().manual_seed(5))
        alone.append((res, one.calls))
    assert torch.equal(out.tokens, torch.cat([res.tokens for res, _ in alone]))
    assert alone[1][0].nfe == 2 and out.nfe == alone[0][0].nfe == 8 + 4  # sure: 1 text + 1 image pass
    assert m.calls == sum(calls for _, calls in alone) == 2 * 12 + 2 * 2  # row passes: 28, not 4 x 12 = 48


TXT_ALL = torch.cat([torch.zeros(64, dtype=torch.bool), TXT])  # text slots, the output part last, any prompt


def test_approximate_caches_run_and_count_their_passes(model):
    for cache in ("prefix", "dual"):
        for R in (2, 3):
            cfg = SamplerConfig(steps=8, image_steps=4, text_block_length=16, cache=cache, cache_refresh=R)
            out = _run(generate, cfg, model)
            assert not (out.tokens == VOCAB.mask_id).any()
            assert out.full_passes == -(-8 // R) and out.full_passes + out.partial_passes == 8, (cache, R)
    # cond and uncond rows cached separately, joined for the passes that need both
    cfg = SamplerConfig(steps=8, image_steps=4, text_block_length=16, text_cfg=1.0, image_cfg=2.0, cache="dual",
                        cache_refresh=3)
    out = _run(generate, cfg, model)
    assert not (out.tokens == VOCAB.mask_id).any() and out.partial_passes > 0
    # a new text block forces a refresh: blocks start at steps 0, 2, 4, 6
    out = _run(generate, SamplerConfig(steps=8, image_steps=4, text_block_length=4, cache="dual", cache_refresh=8),
               model)
    assert out.full_passes == 4


def _forward(model, cache, refresh=8):
    fwd = StepForward(model, [PROMPTS[0]], None, VOCAB.pad_id, SHAPE.length, cache=cache, refresh=refresh)
    y = torch.full((1, SHAPE.length), VOCAB.mask_id)
    return fwd, y


def test_a_pass_returns_the_logits_of_the_needed_slots_only(model):
    # the head runs on the slots a step reads (DiffusionLM: head_cols; any other model: sliced after)
    need = torch.zeros(SHAPE.length, dtype=torch.bool)
    need[[2, 5, SHAPE.length - 1]] = True
    y = torch.full((2, SHAPE.length), VOCAB.mask_id)
    for m in (model, MockModel(VOCAB.vocab_size, fn=lambda ids: torch.randn(*ids.shape, VOCAB.vocab_size,
                                                                             generator=torch.Generator().manual_seed(0)))):
        fwd = StepForward(m, PROMPTS, UNCOND, VOCAB.pad_id, SHAPE.length)
        c, u = fwd(y, True, need)
        every_c, every_u = fwd(y, True)
        assert c.shape == u.shape == (2, 3, VOCAB.vocab_size)
        assert every_c.shape == (2, SHAPE.length, VOCAB.vocab_size)
        torch.testing.assert_close(c, every_c[:, need], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u, every_u[:, need], atol=1e-5, rtol=1e-5)


def test_cache_recomputes_needed_and_changed_columns_and_refreshes(model):
    fwd, y = _forward(model, "dual", refresh=3)
    need = torch.zeros(SHAPE.length, dtype=torch.bool)
    need[-4:] = True
    full, _ = fwd(y, False, need)  # first call: full pass, fills the cache
    assert fwd.full_passes == 1 and fwd.columns == fwd.P + SHAPE.length
    same, _ = fwd(y, False, need)  # nothing changed: the cache is exact for this sequence
    assert fwd.partial_passes == 1 and fwd.columns == fwd.P + SHAPE.length + 4
    assert same.shape == full.shape == (1, 4, VOCAB.vocab_size)  # only the needed columns' logits
    assert torch.allclose(same, full, atol=1e-5)
    y2 = y.clone()
    y2[0, 3] = VOCAB.image_offset + 2  # a changed slot is recomputed with the need
    before = fwd.columns
    fwd(y2, False, need)
    assert fwd.columns - before == 5 and fwd.halves[0].written[0, fwd.P + 3] == VOCAB.image_offset + 2
    fwd(y2, False, need)  # third use since the refresh: a full pass again
    assert fwd.full_passes == 2


def test_dual_cache_runs_each_rows_own_columns(model):
    # row 0 needs 3 slots, row 1 one: a partial pass runs 3 columns per row (row 1 repeats its one), returns
    # the union's 4 columns, and each row's needed logits equal that row's own pass
    fwd = StepForward(model, PROMPTS, UNCOND, VOCAB.pad_id, SHAPE.length, cache="dual", refresh=8)
    y = torch.full((2, SHAPE.length), VOCAB.mask_id)
    need = torch.zeros(2, SHAPE.length, dtype=torch.bool)
    need[0, [1, 4, 9]] = True
    need[1, 6] = True
    fwd(y, True, need)  # the first pass fills the cache
    before = fwd.columns
    c, u = fwd(y, True, need)
    assert fwd.partial_passes == 1 and fwd.columns - before == 3 and c.shape == (2, 4, VOCAB.vocab_size)
    for row, cols in ((0, [0, 1, 3]), (1, [2])):  # places of the row's slots among [1, 4, 6, 9]
        alone = StepForward(model, [PROMPTS[row]], [UNCOND[row]], VOCAB.pad_id, SHAPE.length, cache="dual")
        alone(y[:1], True, need[row])
        ca, ua = alone(y[:1], True, need[row])
        torch.testing.assert_close(c[row, cols], ca[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u[row, cols], ua[0], atol=1e-5, rtol=1e-5)
    assert (c[1, [0, 1, 3]] == 0).all()  # what a row did not need is not computed for it


@pytest.mark.parametrize("extra", [dict(), dict(image_cache_ratio=0.75, image_start=0.0, image_steps=8),
                                   dict(text_block_length=8, image_cfg=2.0)])
def test_a_dual_cache_rows_tokens_do_not_depend_on_its_batch(model, extra):
    # greedy, so the random stream plays no part: each prompt alone gives the batch's tokens for its row
    cfg = SamplerConfig(**{**dict(steps=8, image_steps=4, text_block_length=16, image_temperature=0.0,
                                  cache="dual", cache_refresh=4), **extra})
    prompts = [edit_prompt(VOCAB, [(j * (i + 1)) % 16 for j in range(16)], [20 + i, 21]) for i in range(3)]
    uncond = [edit_prompt(VOCAB, None, None)] * 3
    batch = generate(model, VOCAB, SHAPE, prompts, cfg, uncond).tokens
    for i in range(3):
        assert torch.equal(generate(model, VOCAB, SHAPE, prompts[i:i + 1], cfg, uncond[:1]).tokens[0], batch[i]), i

@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_a_pass_over_some_rows_is_those_rows_alone_and_leaves_the_rest_cached(model, cache):
    # 4 rows (2 prompts x cond / uncond halves) vs a forward holding only rows 1 and 3: same logits and
    # cache entries for the rows run, untouched entries (and zero logits) for the idle ones
    prompts = [edit_prompt(VOCAB, [(j + i) % 16 for j in range(16)], [20 + i, 21]) for i in range(4)]
    uncond = [edit_prompt(VOCAB, None, None)] * 4
    run = torch.tensor([False, True, False, True])
    every = StepForward(model, prompts, uncond, VOCAB.pad_id, SHAPE.length, cache=cache, refresh=3)
    some = StepForward(model, prompts[1::2], uncond[1::2], VOCAB.pad_id, SHAPE.length, cache=cache, refresh=3)
    y = torch.full((4, SHAPE.length), VOCAB.mask_id)
    need = torch.zeros(SHAPE.length, dtype=torch.bool)
    need[-5:] = True
    every(y, True, need, active=run)  # a cache's first pass runs every row
    some(y[run], True, need)
    kept = [[t.clone() for t in layer] for h in every.halves for layer in (h.kv or [])]
    for step in range(3):  # partial, partial, then a refresh over the 2 rows
        y[run, step] = VOCAB.image_offset + step
        y[~run, 5 + step] = VOCAB.image_offset + 9  # idle rows' changes are not looked at
        c, u = every(y, True, need, active=run)
        c1, u1 = some(y[run], True, need)
        assert torch.allclose(c[run], c1, atol=1e-5) and torch.allclose(u[run], u1, atol=1e-5), (cache, step)
        assert (c[~run] == 0).all() and (u[~run] == 0).all()
    assert every.full_passes == some.full_passes and every.partial_passes == some.partial_passes
    if cache != "none":
        for h, h1 in zip(every.halves, some.halves):
            assert torch.equal(h.written[run], h1.written)
            for (k, v), (k1, v1) in zip(h.kv, h1.kv):
                assert torch.allclose(k[run], k1, atol=1e-5) and torch.allclose(v[run], v1, atol=1e-5)
        idle = [[t[~run] for t in layer] for h in every.halves for layer in h.kv]
        assert all(torch.equal(a, b[~run]) for la, lb in zip(idle, kept) for a, b in zip(la, lb))


def test_prefix_cache_recomputes_the_whole_output_and_refresh_one_is_a_full_pass(model):
    fwd, y = _forward(model, "prefix")
    need = torch.zeros(SHAPE.length, dtype=torch.bool)
    need[-1] = True
    full, _ = fwd(y, False, need)
    again, _ = fwd(y, False, need)
    assert fwd.columns == fwd.P + 2 * SHAPE.length
    assert torch.allclose(again, full, atol=1e-5)
    fwd1, y = _forward(model, "prefix", refresh=1)
    for _ in range(3):
        fwd1(y, False, need)
    assert fwd1.full_passes == 3 and fwd1.partial_passes == 0


def test_ml_cache_picks_each_rows_least_sure_masked_slots():
    # top probabilities per slot: row 0 (.9, .4, .6, .5), row 1 (.7, .3, .8, .4); slot 3 of row 0 is decoded
    top = torch.tensor([[0.9, 0.4, 0.6, 0.5], [0.7, 0.3, 0.8, 0.4]])
    logits = torch.log(torch.stack([top] + [(1 - top) / 4] * 4, dim=-1))  # (2, 4, 5)
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # ratio 0.5: ceil(0.5 * 3) = 2 of row 0 (.4, .6; the unsure decoded slot .5 is not a candidate), 2 of row 1
    assert image_slots_to_recompute(logits, masked, 0.5).tolist() == [[False, True, True, False],
                                                                      [False, True, False, True]]
    # ratio 0.9: ceil(0.1 * n) = 1 per row, the least sure masked slot
    assert image_slots_to_recompute(logits, masked, 0.9).tolist() == [[False, True, False, False],
                                                                      [False, True, False, False]]


def test_ml_cache_hands_skipped_slots_their_last_logits():
    cache = ImageLogitCache(0.5, image_steps=4, n_slots=3)  # warm-up: ceil(0.3 * 4) = 2 steps
    masked, every = torch.ones(1, 3, dtype=torch.bool), torch.arange(3)
    first = torch.randn(1, 3, 5)  # (B, slots computed, K)
    lc, lu = cache.image_logits(first, None, every, every)
    assert torch.equal(lc, first) and lu is None
    assert cache.to_recompute(masked).all()  # still warming up
    second = torch.randn(1, 2, 5)
    lc, _ = cache.image_logits(second, None, torch.tensor([0, 2]), every)  # the pass skipped slot 1
    assert torch.equal(lc[0, 1], first[0, 1])  # skipped: last logits
    assert torch.equal(lc[0, 0], second[0, 0]) and torch.equal(lc[0, 2], second[0, 1])
    assert cache.to_recompute(masked).sum() == 2  # warmed up: ceil(0.5 * 3) slots
    assert cache.to_recompute(masked, full=True).all()  # a full pass computes every masked slot anyway
    lc, _ = cache.image_logits(second, None, torch.tensor([0, 2]), torch.tensor([2]))  # only the slots asked for
    assert torch.equal(lc, second[:, 1:])
    off = ImageLogitCache(0.0, image_steps=4, n_slots=3)  # ratio 0: nothing is ever reused
    assert off.to_recompute(masked).all() and off.image_logits(first, None, every, every)[0] is first


def test_ml_cache_recomputes_fewer_image_columns_and_still_finishes(model):
    base = SamplerConfig(steps=8, image_steps=8, image_start=0.0, text_block_length=16, cache="dual",
                         cache_refresh=8)
    one = [PROMPTS[0]]
    dual = generate(model, VOCAB, SHAPE, one, base, generator=torch.Generator().manual_seed(1))
    ml = generate(model, VOCAB, SHAPE, one, dataclasses.replace(base, image_cache_ratio=0.75),
                  generator=torch.Generator().manual_seed(1), trace=False)
    assert not (ml.tokens == VOCAB.mask_id).any()
    assert ml.full_passes == dual.full_passes == 1 and ml.partial_passes == dual.partial_passes == 7
    assert ml.columns < dual.columns  # after 3 warm-up image steps only a quarter of the masked codes run
    # with a full pass every step nothing is ever reused: the tokens are the dual cache's (= exact)
    exact = dataclasses.replace(base, cache_refresh=1)
    a = generate(model, VOCAB, SHAPE, PROMPTS, exact, generator=torch.Generator().manual_seed(1))
    b = generate(model, VOCAB, SHAPE, PROMPTS, dataclasses.replace(exact, image_cache_ratio=0.75),
                 generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"image_cache_ratio=1.0 is the share"):
        SamplerConfig(cache="dual", image_cache_ratio=1.0)
    with pytest.raises(ValueError, match="set cache='dual'"):
        SamplerConfig(image_cache_ratio=0.5)
    with pytest.raises(ValueError, match="cache"):
        SamplerConfig(cache="kv")
    with pytest.raises(ValueError, match="cache_refresh"):
        SamplerConfig(cache_refresh=0)
    with pytest.raises(ValueError, match=r"image_threshold=1.5 is a probability"):
        SamplerConfig(image_threshold=1.5)
    with pytest.raises(ValueError, match="low_confidence"):
        SamplerConfig(text_threshold=0.9, text_remasking="random")
    with pytest.raises(ValueError, match="forward_cols"):
        generate(MockModel(VOCAB.vocab_size), VOCAB, SHAPE, PROMPTS, SamplerConfig(cache="dual", steps=8,
                                                                                   image_steps=4))
