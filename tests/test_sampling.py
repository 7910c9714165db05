"""Schedules (upstream-facts §7), the parallel / sequential sampler and LLaDA text mode."""
import math

import pytest
import torch

from model.layout import IMAGE, TEXT, OutputShape, edit_prompt, generation_prompt, output_regions
from model.llada_generate import generate_text
from model.sampling import SamplerConfig, decode_image, generate, sample_categorical
from model.schedules import image_keep_count, image_step_indices, text_schedule, transfer_counts
from tests.helpers import VOCAB, MockModel, tiny_model

SHAPE = OutputShape(image_tokens=16, text_tokens=16)
REGIONS = torch.tensor(output_regions(SHAPE))
PROMPTS = [edit_prompt(VOCAB, list(range(16)), [20, 21]), generation_prompt(VOCAB, [22, 23, 24])]
UNCOND = [edit_prompt(VOCAB, None, None), generation_prompt(VOCAB, None)]


def test_text_transfer_counts():
    assert transfer_counts(256, 128) == [2] * 128  # PA text: 2 tokens per step
    c = transfer_counts(10, 4)
    assert c == [3, 3, 2, 2] and sum(c) == 10  # base + 1 on the first n mod S steps
    plan = text_schedule(64, 16, 8)
    assert [b for b, _ in plan] == [0, 0, 1, 1, 2, 2, 3, 3] and all(k == 8 for _, k in plan)
    with pytest.raises(ValueError, match="multiple"):
        text_schedule(64, 16, 6)


def test_categorical_draws_follow_the_probabilities_and_never_pick_a_zero():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(50000, 1)  # (100000, 4)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws[0::2], minlength=4) / 50000
    assert torch.allclose(freq, probs[0], atol=0.01) and freq[1] == 0  # 4 sigma is ~0.009 at p = 0.6
    assert (draws[1::2] == 3).all()


def test_an_image_step_draws_only_masked_slots_and_keeps_known_codes():
    codes = torch.tensor([[5, -1, -1, 7]])
    logits = torch.full((1, 4, 8), -30.0)
    logits[0, :, 2] = 30.0  # every slot is sure of code 2
    cfg = SamplerConfig(image_temperature=1.0, image_noise=0.0)
    out = decode_image(codes, logits, keep=0, ratio=1.0, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == [[5, 2, 2, 7]]  # known codes stay even though their logits say 2
    out = decode_image(codes, logits, keep=1, ratio=0.5, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert out[0, 0] == 5 and out[0, 3] == 7 and sorted(out[0, 1:3].tolist()) == [-1, 2]  # one re-masked


def test_image_step_indices_and_keep_counts():
    idx = image_step_indices(128, 64, 128 // 4)
    assert len(idx) == 64 and idx[0] == 32 and idx[-1] == 127
    assert len(image_step_indices(128, 30, 32)) == 30
    assert image_keep_count(1024, 33 / 128, unknown=1024, last=False) == 941
    assert image_keep_count(1024, 1.0, unknown=5, last=False) == 1  # upstream clamp
    assert image_keep_count(1024, 1.0, unknown=5, last=True) == 0  # ... but nothing left masked at the end
    assert image_keep_count(1024, 0.01, unknown=10, last=False) == 9  # always progress


def _masked(y):
    return ((y == VOCAB.mask_id) & (REGIONS == TEXT)).sum(-1), ((y == VOCAB.mask_id) & (REGIONS == IMAGE)).sum(-1)


def test_parallel_sampler_follows_both_schedules_step_by_step():
    cfg = SamplerConfig(steps=16, image_steps=6, text_block_length=8, image_temperature=1.0)
    out = generate(MockModel(VOCAB.vocab_size), VOCAB, SHAPE, PROMPTS, cfg, num_samples=2,
                   generator=torch.Generator().manual_seed(0), record_steps=tuple(range(16)))
    assert out.tokens.shape == (4, SHAPE.length) and out.nfe == 16
    img_steps = image_step_indices(16, 6, 4)
    text_left, img_left = SHAPE.text_tokens, SHAPE.image_tokens
    for k, (block, n) in enumerate(text_schedule(16, 8, 16)):
        t_masked, i_masked = _masked(out.snapshots[k])
        text_left -= n
        assert (t_masked == text_left).all(), f"step {k}"
        if k in img_steps:
            img_left = image_keep_count(16, (k + 1) / 16, img_left, k == img_steps[-1])
        assert (i_masked == img_left).all(), f"step {k}"
        text = out.snapshots[k][:, REGIONS == TEXT]
        assert (text[:, (block + 1) * 8:] == VOCAB.mask_id).all(), "a later block was decoded early"
    assert not (out.tokens == VOCAB.mask_id).any()
    img = out.tokens[:, REGIONS == IMAGE]
    assert ((img >= VOCAB.image_offset) & (img < VOCAB.image_offset + VOCAB.codebook_size)).all()
    txt = out.tokens[:, REGIONS == TEXT]
    assert (txt < VOCAB.image_offset).all()


def test_sampler_is_deterministic_under_a_seed():
    m = tiny_model(seed=1)
    cfg = SamplerConfig(steps=8, image_steps=4, text_block_length=16, text_temperature=1.0, text_cfg=1.0,
                        image_cfg=2.0)
    run = lambda s: generate(m, VOCAB, SHAPE, PROMPTS, cfg, UNCOND, num_samples=3,  # noqa: E731
                             generator=torch.Generator().manual_seed(s)).tokens
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "samples of one prompt should differ"


def test_cfg_costs_extra_passes_only_when_enabled():
    m = MockModel(VOCAB.vocab_size)
    g = torch.Generator().manual_seed(0)
    base = dict(steps=8, image_steps=4, text_block_length=16)
    assert generate(m, VOCAB, SHAPE, PROMPTS, SamplerConfig(**base), generator=g).nfe == 8
    n_img = len(image_step_indices(8, 4, 2))
    assert generate(m, VOCAB, SHAPE, PROMPTS, SamplerConfig(**base, image_cfg=3.0), UNCOND, generator=g).nfe == 8 + n_img
    assert generate(m, VOCAB, SHAPE, PROMPTS, SamplerConfig(**base, text_cfg=1.0), UNCOND, generator=g).nfe == 16
    with pytest.raises(ValueError, match="uncond_prompts"):
        generate(m, VOCAB, SHAPE, PROMPTS, SamplerConfig(**base, text_cfg=1.0), generator=g)


def test_cfg_moves_logits_away_from_the_unconditional():
    # cond rows carry the instruction token 20, uncond rows do not; the mock makes text prefer id
    # 30 when conditioned and id 31 otherwise, by margins that only guidance can flip.
    def fn(ids):
        logits = torch.zeros(*ids.shape, VOCAB.vocab_size)
        cond = (ids == 20).any(-1)
        logits[cond, :, 30], logits[cond, :, 31] = 1.0, 1.2
        logits[~cond, :, 31] = 2.0
        return logits

    cfg = SamplerConfig(steps=4, image_steps=2, text_block_length=16)
    prompts, uncond = [edit_prompt(VOCAB, None, [20])], [edit_prompt(VOCAB, None, None)]
    plain = generate(MockModel(VOCAB.vocab_size, fn), VOCAB, SHAPE, prompts, cfg).tokens
    guided = generate(MockModel(VOCAB.vocab_size, fn), VOCAB, SHAPE, prompts,
                      SamplerConfig(**{**cfg.__dict__, "text_cfg": 1.0}), uncond).tokens
    assert (plain[:, REGIONS == TEXT] == 31).all()
    assert (guided[:, REGIONS == TEXT] == 30).all()  # u + 2(c - u): 30 -> 2, 31 -> 0.4


def test_sequential_mode_conditions_the_image_on_the_finished_text():
    # image logits favour code (first text token) mod 16 once the text is decoded, code 15 before
    t0 = SHAPE.image_tokens + 3

    def fn(ids):
        logits = torch.randn(*ids.shape, VOCAB.vocab_size, generator=torch.Generator().manual_seed(int(ids.sum())))
        first_text = ids[:, -SHAPE.length + t0]
        code = torch.where(first_text == VOCAB.mask_id, 15, first_text % 16)  # (B,)
        start = ids.shape[1] - SHAPE.length + 1
        for b in range(ids.shape[0]):
            logits[b, start:start + SHAPE.image_tokens, VOCAB.image_offset + code[b]] += 50.0
        return logits

    cfg = SamplerConfig(steps=8, image_steps=4, text_block_length=16, text_temperature=1.0, mode="sequential")
    out = generate(MockModel(VOCAB.vocab_size, fn), VOCAB, SHAPE, PROMPTS, cfg, num_samples=4,
                   generator=torch.Generator().manual_seed(0), record_steps=(7, 8))
    assert out.nfe == 8 + 4
    t_masked, i_masked = _masked(out.snapshots[7])
    assert (t_masked == 0).all() and (i_masked == SHAPE.image_tokens).all()  # text done, image untouched
    first_text = out.tokens[:, t0]
    assert len(set(first_text.tolist())) > 1
    codes = out.tokens[:, REGIONS == IMAGE] - VOCAB.image_offset
    assert (codes == (first_text % 16)[:, None]).all()


def _llada_reference(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, mask_id):
    """LLaDA generate.py (low-confidence remasking), written out step by step."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt
    prompt_index = x != mask_id
    n_blocks = gen_length // block_length
    steps //= n_blocks
    for nb in range(n_blocks):
        lo, hi = prompt.shape[1] + nb * block_length, prompt.shape[1] + (nb + 1) * block_length
        n = int((x[:, lo:hi] == mask_id).sum())
        counts = [n // steps + (1 if i < n % steps else 0) for i in range(steps)]
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                c, u = model(torch.cat([x, un_x])).chunk(2)
                logits = u + (cfg_scale + 1) * (c - u)
            else:
                logits = model(x)
            x0 = logits.argmax(-1)
            x0_p = torch.softmax(logits.double(), -1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, hi:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.tensor(-math.inf, dtype=torch.float64))
            sel = conf[0].topk(counts[i]).indices
            x[0, sel] = x0[0, sel]
    return x


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_llada_text_mode_matches_reference(cfg_scale):
    m = tiny_model(seed=2)
    prompt = torch.tensor([[9, 10, 11, 12]])
    ours = generate_text(m, prompt, VOCAB.mask_id, gen_length=16, steps=8, block_length=8, cfg_scale=cfg_scale)
    ref = _llada_reference(m, prompt, 8, 16, 8, 0.0, cfg_scale, VOCAB.mask_id)
    assert torch.equal(ours, ref)
    assert not (ours == VOCAB.mask_id).any()
