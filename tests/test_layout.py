"""Sequence layouts: editing / generation, regions, CFG prompts by concatenation, batching."""
import pytest
import torch

from model.layout import (IMAGE, PAD, PROMPT, TEXT, OutputShape, collate, edit_prompt, generation_prompt,
                          output_target, output_template)
from model.tokens import MMADA_VOCAB, TINY_SPECIAL_TOKENS, tiny_vocab
from tests.helpers import VOCAB

SHAPE = OutputShape(image_tokens=4, text_tokens=5)


def test_edit_layout_matches_parallel_m():
    v = MMADA_VOCAB
    p = edit_prompt(v, [0, 5, 8191, 2], [11, 12])
    assert p == [126095, 126084, 126349, 126354, 134540, 126351, 126085, 126080, 11, 12, 126081]
    out = output_target(v, SHAPE, [1, 2, 3, 4], [21, 22])
    assert out == [126084, 126350, 126351, 126352, 126353, 126085, 126080, 21, 22, 126081, 126081, 126081]
    assert output_template(v, SHAPE) == [126084] + [126336] * 4 + [126085, 126080] + [126336] * 5


def test_generation_layout_and_unconditional_prompts():
    v = VOCAB
    assert generation_prompt(v, [20, 21]) == [v.gen_task_id, v.bos_id, 20, 21, v.eos_id]
    assert generation_prompt(v, None) == [v.gen_task_id, v.bos_id, v.eos_id]
    no_text = edit_prompt(v, [1, 2], None)
    no_image = edit_prompt(v, None, [30, 31])
    assert no_text == [v.edit_task_id, v.soi_id, v.image_id(1), v.image_id(2), v.eoi_id, v.bos_id, v.eos_id]
    assert no_image == [v.edit_task_id, v.bos_id, 30, 31, v.eos_id]
    # built by concatenation: no conditional token survives in the unconditional prompt
    uncond = edit_prompt(v, None, None)
    assert not set(uncond) & {v.image_id(1), v.image_id(2), 30, 31}


def test_collate_left_pads_and_aligns_output_regions():
    v = VOCAB
    prompts = [edit_prompt(v, [1, 2, 3, 4], [30]), generation_prompt(v, [30, 31, 32])]
    outs = [output_target(v, SHAPE, [0, 1, 2, 3], [40]), output_target(v, SHAPE, [3, 3, 3, 3], [41, 42])]
    b = collate(prompts, outs, SHAPE, v.pad_id)
    assert b.input_ids.shape == (2, len(prompts[0]) + SHAPE.length)
    pad = len(prompts[0]) - len(prompts[1])
    assert b.attention_mask[1].tolist() == [False] * pad + [True] * (b.input_ids.shape[1] - pad)
    assert (b.regions[1, :pad] == PAD).all() and (b.regions[0] != PAD).all()
    tail = b.regions[:, -SHAPE.length:]
    assert (tail == torch.tensor([PROMPT] + [IMAGE] * 4 + [PROMPT] * 2 + [TEXT] * 5)).all()
    assert (b.regions[:, :-SHAPE.length][b.attention_mask[:, :-SHAPE.length]] == PROMPT).all()


def test_layout_errors_name_the_fix():
    with pytest.raises(ValueError, match="raise text_tokens"):
        output_target(VOCAB, SHAPE, [0, 1, 2, 3], [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="image codes"):
        output_target(VOCAB, SHAPE, [0, 1], [1])
    with pytest.raises(ValueError, match="outside"):
        output_target(VOCAB, SHAPE, [0, 1, 2, 16], [1])


def test_tiny_vocab_and_tokenizer_agree():
    from tasks.common.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["turn the red circle blue"])
    v = tiny_vocab(len(tok), 16)
    for name, vid in (("<|mdm_mask|>", v.mask_id), ("<|startoftext|>", v.bos_id), ("<|endoftext|>", v.eos_id),
                      ("<|soi|>", v.soi_id), ("<|eoi|>", v.eoi_id), ("<|interleave|>", v.edit_task_id),
                      ("<|t2it|>", v.gen_task_id), ("<|pad|>", v.pad_id)):
        assert tok.token_id(name) == vid
    assert len(TINY_SPECIAL_TOKENS) == 8 and v.image_offset == len(tok)
    ids = tok.encode("turn the red circle blue")
    assert min(ids) >= len(TINY_SPECIAL_TOKENS)
    assert tok.decode([v.bos_id] + ids + [v.eos_id, v.eos_id]) == "turn the red circle blue"
