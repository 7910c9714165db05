"""A-variant (Lumina-DiMOO / MMaDA-Parallel-A) layout: hand-written id lists on a 2x3 grid, regions, the
splice position, CFG prompts, the Vocab, batching."""
import pytest
import torch

from model.layout import IMAGE, PAD, PROMPT, TEXT, collate
from model.layout_dimoo import (DIMOO_IDS, EDIT_SYSTEM_PROMPT, DimooIds, DimooOutputShape, PromptTags,
                                PAD_ID, dimoo_vocab, edit_cfg_prompts, edit_prompt, generation_prompt, image_block,
                                instruction_ids, instruction_text, output_regions, output_target, output_template)
from model.tokens import Vocab

M, NL, BOI, EOI, ANS, END, EOS = 126336, 126084, 126349, 126350, 126354, 126355, 126081
GRID = (2, 3)
CODES = [0, 5, 8191, 2, 1, 7]  # row-major: row 0 = 0 5 8191, row 1 = 2 1 7
BLOCK = [BOI, 126356, 126361, 134547, NL, 126358, 126357, 126363, NL, EOI]
TAGS = PromptTags(system_open=(900,), system_close=(901,), user_open=(902,), user_close=(903,))
SHAPE = DimooOutputShape(grid=GRID, text_tokens=4)


def test_image_block_has_a_newline_after_every_row():
    assert image_block(CODES, GRID) == BLOCK
    assert image_block(CODES, (3, 2)) == [BOI, 126356, 126361, NL, 134547, 126358, NL, 126357, 126363, NL, EOI]


def test_output_part_image_first_then_text_then_answer_end():
    assert SHAPE.image_tokens == 6 and SHAPE.length == 16 == len(output_template(SHAPE))
    assert output_template(SHAPE) == [ANS, BOI, M, M, M, NL, M, M, M, NL, EOI, M, M, M, M, END]
    assert output_target(SHAPE, CODES, [31, 32]) == [ANS] + BLOCK + [31, 32, EOS, EOS, END]
    P, I, T = PROMPT, IMAGE, TEXT
    assert output_regions(SHAPE) == [P, P, I, I, I, P, I, I, I, P, P, T, T, T, T, P]
    # PA inference.py L152-156 offsets, relative to the output part: image_start = 2,
    # image_end = image_start + h*(w+1), text = [image_end + 1, + T), then </answer>
    regions = output_regions(SHAPE)
    image_end = 2 + 2 * 4
    assert [i for i, r in enumerate(regions) if r == TEXT] == list(range(image_end + 1, image_end + 1 + 4))
    assert [i for i, r in enumerate(regions) if r == IMAGE] == [2, 3, 4, 6, 7, 8]
    assert output_template(SHAPE)[image_end] == EOI


def test_image_only_answer_matches_upstream_training():
    shape = DimooOutputShape(grid=GRID, text_tokens=0)
    assert output_target(shape, CODES, []) == [ANS] + BLOCK + [END]  # PA train/train.py L120
    assert output_regions(shape) == [PROMPT] + [PROMPT if x in (BOI, NL, EOI) else IMAGE for x in BLOCK] + [PROMPT]


def test_edit_prompt_splices_the_image_before_the_last_instruction_id():
    instr = instruction_ids(TAGS, [11, 12], [21, 22, 23])
    assert instr == [900, 11, 12, 901, 902, 21, 22, 23, 903]
    assert edit_prompt(instr, CODES, GRID) == [900, 11, 12, 901, 902, 21, 22, 23] + BLOCK + [903]
    assert edit_prompt(instr, None) == instr
    assert generation_prompt(instr) == instr


def test_cfg_prompts_uncondition_keeps_the_image_and_no_image_keeps_the_instruction():
    instr = instruction_ids(TAGS, [11, 12], [21, 22, 23])
    uncond = instruction_ids(TAGS, [11, 12], None)
    assert uncond == [900, 11, 12, 901, 902, 126351, 903]
    cond, no_text, no_image = edit_cfg_prompts(instr, uncond, CODES, GRID)
    assert cond == edit_prompt(instr, CODES, GRID)
    assert no_text == [900, 11, 12, 901, 902, 126351] + BLOCK + [903]
    assert no_image == [900, 11, 12, 901, 902, 21, 22, 23, 903]
    assert edit_prompt(uncond, None) == uncond  # training dropout: both dropped


def test_instruction_strings():
    assert instruction_text(EDIT_SYSTEM_PROMPT, "make it red") == (
        "<system>Generate an image applying the following editing instruction based on the original image."
        "</system><user>make it red</user>")
    assert instruction_text("S", None) == "<system>S</system><user><uncondition></user>"


def test_instruction_ids_equal_tokenising_the_whole_string_when_tags_are_added_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tags = ["<system>", "</system>", "<user>", "</user>", "<uncondition>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=tags, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["generate an image applying the edit", "make the sky red"], trainer=trainer)

    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids

    ids = DimooIds(mask_id=400, newline_id=401, boi_id=402, eoi_id=403, uncondition_id=enc("<uncondition>")[0],
                   answer_start_id=404, answer_end_id=405, pad_id=406, bos_id=407, eos_id=408, image_offset=500,
                   codebook_size=16, vocab_size=516)
    t = PromptTags.from_encoder(enc)
    sys_ids, user_ids = enc(EDIT_SYSTEM_PROMPT), enc("make the sky red")
    assert instruction_ids(t, sys_ids, user_ids, ids) == enc(instruction_text(EDIT_SYSTEM_PROMPT, "make the sky red"))
    assert instruction_ids(t, sys_ids, None, ids) == enc(instruction_text(EDIT_SYSTEM_PROMPT, None))
    user_x = enc("<user>x</user>")
    assert edit_prompt(user_x, [3, 4], (1, 2), ids) == user_x[:-1] + [402, 503, 504, 401, 403] + enc("</user>")


def test_vocab_of_the_released_a_checkpoint():
    v = dimoo_vocab()
    assert isinstance(v, Vocab)
    assert (v.mask_id, v.bos_id, v.eos_id, v.soi_id, v.eoi_id, v.pad_id) == (126336, 126080, 126081, 126349, 126350,
                                                                             126339)
    assert (v.image_offset, v.codebook_size, v.vocab_size, v.text_vocab_size) == (126356, 8192, 134548, 126356)
    assert (v.edit_task_id, v.gen_task_id) == (126095, 126096)  # unused by the A layout: M's reserved slots
    assert v.image_id(8191) == 134547 and Vocab.from_dict(v.to_dict()) == v
    assert DIMOO_IDS.image_id(0) == 126356


def test_shared_collate_left_pads_and_aligns_the_a_output_regions():
    instr = instruction_ids(TAGS, [11], [21])
    prompts = [edit_prompt(instr, CODES, GRID), instr]
    outs = [output_target(SHAPE, CODES, [31]), output_target(SHAPE, [1] * 6, [31, 32, 33, 34])]
    b = collate(prompts, outs, SHAPE, PAD_ID)  # model.layout.collate: regions follow the shape's layout
    pad = len(prompts[0]) - len(prompts[1])
    assert b.input_ids.shape == (2, len(prompts[0]) + SHAPE.length)
    assert b.input_ids[1, :pad].tolist() == [126339] * pad
    assert b.attention_mask[1].tolist() == [False] * pad + [True] * (b.input_ids.shape[1] - pad)
    assert (b.regions[1, :pad] == PAD).all() and (b.regions[0] != PAD).all()
    assert (b.regions[:, -SHAPE.length:] == torch.tensor(output_regions(SHAPE))).all()


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="raise text_tokens"):
        output_target(SHAPE, CODES, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="2x3 output grid"):
        output_target(SHAPE, CODES[:4], [1])
    with pytest.raises(ValueError, match="outside"):
        image_block([0, 1, 2, 3, 4, 8192], GRID)
    with pytest.raises(ValueError, match="grid"):
        edit_prompt([1, 2], CODES)
    with pytest.raises(ValueError, match="6 image slots for a 3x3 grid"):
        image_block(CODES, (3, 3))
    with pytest.raises(ValueError, match="h, w >= 1"):
        DimooOutputShape(grid=(0, 3), text_tokens=1)
    with pytest.raises(ValueError, match="distinct"):
        DimooIds(**{**DIMOO_IDS.__dict__, "newline_id": DIMOO_IDS.boi_id})
    with pytest.raises(ValueError, match="does not match"):
        collate([[1]], [[1, 2]], SHAPE, PAD_ID)
