"""MMaDA-Parallel-A (Lumina-DiMOO layout, aMUSEd VQ) through the same SFT, evaluation, sampling and RL code as
the M layout: a released-format A folder (Lumina vocabulary at tiny dims, vqvae/ inside) fine-tuned on photos,
its sequences checked id by id, a held-out loss, a checkpoint that records the layout, `generate`, and an RL
rollout whose replayed log-probs equal the behaviour ones."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import from_pretrained, save_pretrained
from model.layout import IMAGE, TEXT, output_regions
from model.layout_dimoo import ANSWER_END_ID, ANSWER_START_ID, NEWLINE_ID
from model.tokens import LUMINA_BOI_ID, LUMINA_EOI_ID
from tests.test_released_checkpoints import LLADA_NAMED, LUMINA, TINY_DIMS, word_tokenizer, write_folder

ADDED = {126349: "<boi>", 126350: "<eoi>", 126351: "<uncondition>", 126352: "<system>", 126353: "<user>",
         126354: "<answer>", 126355: "</answer>"}


@pytest.fixture(scope="module")
def a_folder(tmp_path_factory):
    from model.vq_amused import AMUSED_VQ_CONFIG, build_vqmodel

    work = tmp_path_factory.mktemp("variant-a")
    tok = word_tokenizer(str(work / "tok" / "tokenizer.json"), LUMINA["vocab_size"] - 8192, {**LLADA_NAMED, **ADDED})
    ckpt = write_folder(work / "MMaDA-Parallel-A", {**LUMINA, **TINY_DIMS}, tokenizer=tok)
    torch.manual_seed(0)
    build_vqmodel(dict(AMUSED_VQ_CONFIG, block_out_channels=[8, 8, 16, 16, 16], latent_channels=4,
                       norm_num_groups=4)).save_pretrained(os.path.join(ckpt, "vqvae"))
    cfg_path = os.path.join(ckpt, "vqvae", "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "parapipe_image_size": [64, 48]}, open(cfg_path, "w"))  # a 4 x 3 code grid
    return work, ckpt


def _rows(n: int = 10) -> list[dict]:
    import io

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        blobs = []
        for _ in range(2):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        rows.append({"sample_id": f"s{i}", "kind": "edit", "category": "other", "split": "train",
                     "instruction": f"w{10 + i} w11", "input_image": blobs[0], "output_image": blobs[1],
                     "reference_trace": f"w{20 + i} w21 w22"})
    return rows


def test_variant_a_sft_sequences_eval_checkpoint_generate_and_rl_replay(a_folder, tmp_path):
    from rl.replay import replay_logprobs
    from rl.rollout import RolloutWorker
    from tasks.common.generate import open_image_tokenizer
    from tasks.common.tokenizer import TextTokenizer
    from tasks.pararl.pararl import checkpoint_layout
    from tasks.sft.sft_data import (SequenceConfig, build_prompt, dimoo_prompt_ids, epoch_batches, output_shape,
                                    tokenise_rows)
    from tasks.sft.sft_eval import heldout_loss
    from tasks.sft.sft_loop import SFTConfig, make_optimizer, train_step

    work, ckpt = a_folder
    model, vocab = from_pretrained(ckpt)
    tok, vq = TextTokenizer.load(ckpt), open_image_tokenizer(ckpt)
    assert vq.grid == (4, 3) and vocab.codebook_size == vq.codebook_size == 8192
    seq = SequenceConfig(text_tokens=8, layout="dimoo", image_grid=vq.grid, prompt_ids=dimoo_prompt_ids(tok))
    rows = _rows()
    data = tokenise_rows(rows, [r["reference_trace"] for r in rows], tok, vq, vocab, seq)
    assert len(data) == 10 and sum(data.dropped.values()) == 0
    # the output part: <answer> <boi> (3 codes + newline) x 4 <eoi> trace <eos>... </answer>
    out = data.output[0]
    assert out[:2] == [ANSWER_START_ID, LUMINA_BOI_ID] and out[-1] == ANSWER_END_ID
    assert [out[2 + 3 + k * 4] for k in range(4)] == [NEWLINE_ID] * 4 and out[2 + 16] == LUMINA_EOI_ID
    assert out[19:22] == tok.encode(rows[0]["reference_trace"]) and out[22:27] == [vocab.eos_id] * 5
    shape = output_shape(seq)
    assert len(out) == shape.length and output_regions(shape).count(IMAGE) == 12
    # the prompt: tags + system ids + user ids, the input image block spliced in before the last id
    p = build_prompt(vocab, seq, data.input_codes[0], data.instruction[0])
    block = p.index(LUMINA_BOI_ID)
    assert p[block + 4] == NEWLINE_ID and p[block + 17] == LUMINA_EOI_ID and len(p) == block + 18 + 1
    no_img = build_prompt(vocab, seq, data.input_codes[0], data.instruction[0], drop_image=True)
    assert LUMINA_BOI_ID not in no_img and no_img == p[:block] + p[-1:]
    uncond = build_prompt(vocab, seq, data.input_codes[0], data.instruction[0], drop_instruction=True)
    assert 126351 in uncond and not set(data.instruction[0]) & set(uncond[:block])  # <uncondition> for the user text
    # a few SFT steps on the A sequences lower the loss on them
    cfg = SFTConfig(lr=3e-3, warmup_steps=0, total_steps=8, batch_size=5, bf16=False, cond_dropout=0.0)
    opt = make_optimizer(model, cfg)
    before = heldout_loss(model, data, vocab, seq)
    batches = list(epoch_batches(data, vocab, seq, 5, 0, 0))
    for step in range(8):
        train_step(model, opt, [batches[step % 2]], cfg, torch.Generator().manual_seed(step), step, vocab.mask_id)
    after = heldout_loss(model, data, vocab, seq)
    assert after["loss_text"] < before["loss_text"] and after["masked_image"] > 0
    # the checkpoint records the layout; RL reads it back and its replay equals the behaviour log-probs
    folder = str(tmp_path / "sft-a")
    save_pretrained(model, vocab, folder, extra={"parapipe_sequence": dataclasses.asdict(seq)})
    for name in ("tokenizer.json",):
        os.link(os.path.join(ckpt, name), os.path.join(folder, name))
    import shutil

    shutil.copytree(os.path.join(ckpt, "vqvae"), os.path.join(folder, "image_tokenizer"))
    seq2, shape2, _ = checkpoint_layout(folder)
    assert seq2 == seq and shape2 == shape
    worker = RolloutWorker(folder, shape2)
    prompts = [build_prompt(vocab, seq, data.input_codes[i], data.instruction[i]) for i in range(2)]
    sampler = dict(steps=4, image_steps=2, text_block_length=8, text_temperature=1.0, image_temperature=1.0)
    got = worker.sample(worker.model.state_dict(), 0, prompts, 2, sampler, [1, 3], seed=0)
    assert got["images"].shape == (4, 2, 64, 48, 3)
    from model.sampling import SamplerConfig

    tokens, step_map = torch.from_numpy(got["tokens"]), torch.from_numpy(got["step_map"])
    regions = torch.tensor(output_regions(shape2))
    assert (step_map[:, regions == 0] == -1).all() and (step_map[:, (regions == IMAGE) | (regions == TEXT)] >= 0).all()
    rows_ = [p for p in prompts for _ in range(2)]
    for s in range(4):
        logp, credited = replay_logprobs(worker.model, rows_, tokens, step_map, torch.full((4,), s), vocab, shape2,
                                         SamplerConfig(**sampler))
        behaviour = torch.from_numpy(got["logp"])[credited]
        assert torch.allclose(logp[credited], behaviour, atol=1e-5)
