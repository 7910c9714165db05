"""Forward process and loss: only the output part is noised; loss values computed by hand."""
import math

import pytest
import torch

from model.diffusion import PAPER, PARALLEL_A, PARALLEL_M, Objective, diffusion_loss, forward_process, mask_probability
from model.layout import IMAGE, PAD, PROMPT, TEXT, OutputShape, collate, edit_prompt, output_target
from tests.helpers import VOCAB

LN2 = math.log(2)


def _batch(n=64, shape=OutputShape(16, 24)):
    prompts = [edit_prompt(VOCAB, [i % 16] * 16, [20 + i % 5] * (1 + i % 4)) for i in range(n)]
    outs = [output_target(VOCAB, shape, [(i + j) % 16 for j in range(16)], [30] * (i % 10)) for i in range(n)]
    return collate(prompts, outs, shape, VOCAB.pad_id)


def test_masking_touches_only_output_slots():
    b = _batch()
    for obj in (PAPER, PARALLEL_M, PARALLEL_A):
        noisy, masked, _, _ = forward_process(b.input_ids, b.regions, obj, VOCAB.mask_id, torch.Generator().manual_seed(0))
        assert masked.any()
        assert not masked[(b.regions == PROMPT) | (b.regions == PAD)].any()
        assert torch.equal(noisy[~masked], b.input_ids[~masked])
        assert (noisy[masked] == VOCAB.mask_id).all()


def test_mask_rates_follow_the_schedules():
    b = _batch(n=512)
    g = torch.Generator().manual_seed(1)
    _, masked, t_text, t_img = forward_process(b.input_ids, b.regions, PAPER, VOCAB.mask_id, g)
    assert torch.equal(t_text, t_img)  # shared timeline
    text_frac = (masked & (b.regions == TEXT)).sum(-1) / 24
    assert (text_frac - t_text).abs().mean() < 0.1  # Bernoulli(t) per slot
    img_count = (masked & (b.regions == IMAGE)).sum(-1)
    expected = torch.round(16 * mask_probability(t_img, "cosine")).long().clamp(min=1)
    assert torch.equal(img_count, expected)  # exact count round(N * cos(pi/2 (1 - t)))
    _, _, t_text, t_img = forward_process(b.input_ids, b.regions, PARALLEL_A, VOCAB.mask_id, g)
    assert not torch.equal(t_text, t_img)  # PA: independent draws per modality


def test_schedules_values():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(mask_probability(t, "linear"), t)
    torch.testing.assert_close(mask_probability(t, "cosine"), torch.tensor([0.0, math.cos(math.pi / 4), 1.0]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(mask_probability(torch.tensor([0.5]), "double_cosine"),
                               torch.tensor([math.cos(math.pi / 2 * math.cos(math.pi / 4))]))


def _hand_example():
    """2 rows of [PROMPT, IMAGE, TEXT, TEXT]; p(target) chosen so each CE is ln 2 or ln 4."""
    regions = torch.tensor([[PROMPT, IMAGE, TEXT, TEXT]] * 2)
    targets = torch.zeros(2, 4, dtype=torch.long)
    probs = torch.full((2, 4, 4), 0.0)
    target_p = torch.tensor([[1.0, 0.5, 0.25, 0.5], [1.0, 0.5, 0.5, 0.5]])
    probs[..., 0] = target_p
    probs[..., 1:] = ((1 - target_p) / 3)[..., None]
    masked = torch.tensor([[False, True, True, False], [False, False, True, True]])
    t = torch.tensor([0.5, 0.25])
    return probs.clamp_min(1e-12).log(), targets, masked, regions, t


@pytest.mark.parametrize("objective, total, text, image", [
    # text: row0 ln4/0.5/2 = 2ln2, row1 (2 ln2)/0.25/2 = 4ln2 -> mean 3ln2; image: masked mean ln2
    (PAPER, 4 * LN2, 3 * LN2, LN2),
    # PM: text per-sample sums added over the batch (6ln2); image per-sample mean over its slots, batch mean
    (PARALLEL_M, 6.5 * LN2, 6 * LN2, 0.5 * LN2),
    # PA: one pooled mean over the 4 masked tokens: (ln2 + ln4 + ln2 + ln2) / 4
    (PARALLEL_A, 1.25 * LN2, 4 / 3 * LN2, LN2),
])
def test_loss_on_hand_computed_example(objective, total, text, image):
    logits, targets, masked, regions, t = _hand_example()
    parts = diffusion_loss(logits, targets, masked, regions, t, t, objective)
    assert parts.total.item() == pytest.approx(total, rel=1e-5)
    assert parts.text.item() == pytest.approx(text, rel=1e-5)
    assert parts.image.item() == pytest.approx(image, rel=1e-5)


def test_loss_trains_a_tiny_model():
    from tests.helpers import tiny_model

    torch.manual_seed(0)
    m = tiny_model().train()
    b = _batch(n=16)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        noisy, masked, tt, ti = forward_process(b.input_ids, b.regions, PAPER, VOCAB.mask_id, g)
        loss = diffusion_loss(m(noisy, b.attention_mask), b.input_ids, masked, b.regions, tt, ti, PAPER).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_objective_validates_its_fields():
    with pytest.raises(ValueError, match="text_schedule='cos'"):
        Objective(text_schedule="cos")
