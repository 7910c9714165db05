"""ParaRL rewards: CLIP scoring of long / empty / partial texts, partial outputs, the exact toy
agreement, the toy CLIP fit (small budget) and RewardWorker without ray."""
import json
import os
import random
import time

import numpy as np
import pytest
import torch

from model.image_tokenizer import PatchVQ
from rl.reward import GREY, ClipScorer, RewardWorker, partial_image, partial_text, register_tiny_clip, toy_agreement
from tasks.toy import PRESETS, render, sample_tasks, text_image_agreement, write_trace
from tasks.toy.scene import ToyObject, make_scene, random_scene

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    torch.manual_seed(0)
    return ClipScorer(register_tiny_clip(str(tmp_path_factory.mktemp("clip"))))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from tasks.pararl.fit_reward import fit_tiny_clip

    out = str(tmp_path_factory.mktemp("toyclip"))
    t0 = time.perf_counter()
    # small budget: ~20 s; fewer partial pairs than the default so 100 steps already learn the full pairs
    metrics = fit_tiny_clip(out, train_pairs=2000, steps=100, batch_size=128, eval_tasks=200, partial_rate=0.25,
                            log_every=0)
    return out, metrics, time.perf_counter() - t0


def _images(n, size=64, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


# --- ClipScorer -----------------------------------------------------------------------------------

def test_long_texts_are_split_into_fitting_chunks_and_counted(scorer):
    long = " ".join(["the red circle at a1 moves to c2, the blue square stays."] * 6)
    short = "result: red circle a1."
    assert scorer.count_tokens(long) > scorer.context_length == 32
    chunks = scorer.chunks(long)
    assert len(chunks) > 1 and all(scorer.count_tokens(c) <= 32 for c in chunks)
    assert " ".join(chunks) == long  # consecutive, on word boundaries, nothing lost
    assert scorer.chunks(short) == [short] and scorer.chunks("") == [""]
    scores, stats = scorer.score_with_stats(_images(4), [long, short, "", "   "])
    assert stats == {"pairs": 4, "split_texts": 1, "split_rate": 0.25, "chunks": len(chunks) + 3}
    assert all(-1.0 <= s <= 1.0 for s in scores)
    empty, _ = scorer.embed_texts(["", "   "])  # empty text: the embedding of the empty string
    assert torch.isfinite(empty).all() and torch.allclose(empty[0], empty[1])
    assert scorer.truncation["split_texts"] >= 1 and 0 < scorer.truncation["split_rate"] <= 1


def test_batched_scores_equal_one_at_a_time_and_pil_equals_arrays(scorer):
    from PIL import Image

    texts = ["result: red circle a1, blue square c2.", "", "note: " + "green triangle b3, " * 12, "empty"]
    images = _images(4, seed=1)
    batched = scorer.score(images, texts)
    single = [scorer.score([im], [t])[0] for im, t in zip(images, texts)]
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(scorer.score([Image.fromarray(im) for im in images], texts), batched, atol=1e-5)
    np.testing.assert_allclose(scorer.score(np.stack(images), texts), batched, atol=1e-6)
    with pytest.raises(ValueError, match="one text per image"):
        scorer.score(images, texts[:2])


def test_long_text_embedding_is_the_renormalised_mean_of_its_chunks(scorer):
    long = " ".join(["blue square c2, red circle a1,"] * 8)
    emb, _ = scorer.embed_texts([long])
    parts, _ = scorer.embed_texts(scorer.chunks(long))
    mean = parts.mean(0)
    torch.testing.assert_close(emb[0], mean / mean.norm(), atol=1e-5, rtol=0)


# --- partial outputs ------------------------------------------------------------------------------

class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_partial_text_drops_mask_ids():
    from tasks.common.tokenizer import build_tiny_tokenizer

    assert partial_text([ord(c) for c in "red#circle"], ord("#"), _CharTokenizer()) == "redcircle"
    tok = build_tiny_tokenizer()
    mask = tok.token_id("<|mdm_mask|>")
    ids = tok.encode("result: red circle a1.")
    assert partial_text(ids, mask, tok) == "result: red circle a1."
    masked = [mask if i % 2 else t for i, t in enumerate(ids)]
    assert partial_text(masked, mask, tok) == tok.decode([t for i, t in enumerate(ids) if not i % 2])
    assert partial_text([mask] * 5, mask, tok) == ""


def test_partial_image_paints_exactly_the_masked_patches_grey():
    rng = random.Random(0)
    images = torch.from_numpy(np.stack([render(random_scene(rng, TINY), TINY) for _ in range(200)]))
    vq = PatchVQ.fit(images, TINY.token_px, 16)
    codes = vq.encode(images[:8])  # (8, 4, 4)
    masked = torch.rand(codes.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    out = partial_image(torch.where(masked, torch.full_like(codes, -1), codes), vq)
    assert out.shape == (8, 32, 32, 3) and out.dtype == torch.uint8
    px = masked.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (8, 32, 32)
    assert (out[px] == torch.tensor(GREY, dtype=torch.uint8)).all()
    assert torch.equal(out[~px], images[:8][~px])
    single = partial_image(torch.full((4, 4), -1), vq, fill=(1, 2, 3))
    assert single.shape == (32, 32, 3) and (single == torch.tensor([1, 2, 3], dtype=torch.uint8)).all()


# --- exact toy agreement --------------------------------------------------------------------------

def _scene(*objects):
    return make_scene(ToyObject(r, c, shape, colour) for r, c, shape, colour in objects)


def test_toy_agreement_matches_text_image_agreement_on_full_renders():
    tasks = sample_tasks(TINY, 50, "test", seed=3)
    agree = disagree = 0
    for i, task in enumerate(tasks):
        image = render(task.output_scene, TINY)
        for error_rate in (0.0, 1.0):
            text = write_trace(task, TINY, seed=i, error_rate=error_rate, compact=i % 2 == 0).text
            score, exact = toy_agreement(text, image, TINY), text_image_agreement(text, image, TINY)
            assert 0.0 <= score <= 1.0
            assert (score == 1.0) == exact, (text, score)
            agree, disagree = agree + exact, disagree + (not exact)
    assert agree == 50 and disagree == 50  # error_rate=1 always states a wrong result


def test_toy_agreement_is_graded_for_partial_images_and_texts():
    scene = _scene((0, 0, "circle", "red"), (1, 2, "square", "blue"))  # red circle a1, blue square c2
    image = render(scene, TINY)
    text = "note: two objects. result: red circle a1, blue square c2."
    assert toy_agreement(text, image, TINY) == 1.0 and toy_agreement(text, image, "tiny") == 1.0
    grey_a1 = image.copy()
    grey_a1[0:8, 0:8] = GREY  # the red circle is not decoded yet
    assert toy_agreement(text, grey_a1, TINY) == pytest.approx(2 * 1 / (2 + 1))  # tp 1, stated 2, shown 1
    grey_empty = image.copy()
    grey_empty[24:32, 24:32] = GREY  # an empty cell: nothing stated is hidden
    assert toy_agreement(text, grey_empty, TINY) == 1.0
    assert toy_agreement("result: red circle a1, blue c2.", image, TINY) == pytest.approx(2 / 4)  # 1 item broken
    assert toy_agreement("result: red circle a1", image, TINY) == pytest.approx(2 / 3)
    assert toy_agreement("result: red circle a1, green square c2", image, TINY) == pytest.approx(2 / 4)
    assert toy_agreement("result: red circle a1, red circle a1", image, TINY) == pytest.approx(2 / 4)
    assert toy_agreement("note: two objects.", image, TINY) == 0.0  # no result phrase yet
    assert toy_agreement("note: result:", image, TINY) == 0.0  # nothing stated after it
    assert toy_agreement(text, np.full_like(image, 128), TINY) == 0.0
    empty = render((), TINY)
    assert toy_agreement("result: empty.", empty, TINY) == 1.0
    half = empty.copy()
    half[:16] = GREY
    assert toy_agreement("result: empty.", half, TINY) == 0.5  # half the cells are still unknown
    assert toy_agreement("result: empty.", image, TINY) == 0.0
    with pytest.raises(ValueError, match="uint8"):
        toy_agreement(text, image.astype(np.float32), TINY)


def test_graded_toy_agreement_gives_partial_credit_by_attribute_and_distance():
    image = render(_scene((2, 3, "square", "green")), TINY)  # green square d3 on a 4 x 4 grid
    graded = lambda t: toy_agreement(t, image, TINY, graded=True)  # noqa: E731
    assert graded("result: green square d3.") == toy_agreement("result: green square d3.", image, TINY) == 1.0
    # colour + shape + row match, column 1 of 3 away: 0.25 * (1 + 1 + 1 + 2 / 3)
    assert graded("result: green square c3.") == pytest.approx(11 / 12)
    assert graded("result: green square a3.") == pytest.approx(0.75)  # column at the far edge
    assert graded("result: red circle a1.") == pytest.approx(0.25 * (1 / 3 + 0))  # only the row, 2 of 3 away
    # an extra wrong item lowers precision: tp 11/12 over stated 2 + shown 1
    assert graded("result: green square c3, red circle a1.") == pytest.approx(2 * (11 / 12) / 3)
    assert graded("note: no result yet.") == 0.0 and graded("result: empty.") == 0.0
    # one to one, best pairs first: the exact pair keeps its full credit
    two = render(_scene((0, 0, "circle", "red"), (0, 1, "circle", "red")), TINY)  # red circles a1, b1
    assert toy_agreement("result: red circle a1, red circle c1.", two, TINY, graded=True) == pytest.approx(
        2 * (1 + 11 / 12) / 4)
    for i, task in enumerate(sample_tasks(TINY, 30, "test", seed=5)):  # never below the exact score
        image = render(task.output_scene, TINY)
        text = write_trace(task, TINY, seed=i, error_rate=0.5).text
        assert toy_agreement(text, image, TINY, graded=True) >= toy_agreement(text, image, TINY)


# --- toy CLIP -------------------------------------------------------------------------------------

def test_fit_tiny_clip_small_budget_learns_the_toy_world(fitted):
    out, metrics, seconds = fitted
    assert seconds < 60, f"small fit took {seconds:.0f}s"
    info = json.load(open(os.path.join(out, "reward.json")))
    assert info["model_name"] == "ParaPipe-Toy-CLIP" and info["context_length"] == 48
    assert info["preprocess"]["image_size"] == 32 and info["metrics"]["retrieval"] == metrics["retrieval"]
    r, a = metrics["retrieval"], metrics["agreement"]
    # measured (seeds 0 / 1 / 2): top-1 0.48 / 0.38 / 0.21, pearson 0.47 / 0.43 / 0.30
    assert r["chance"] == 0.01 and r["i2t_top1"] > 0.05 and r["t2i_top1"] > 0.05  # > 5x chance
    assert a["pearson"] > 0.15 and a["spearman"] > 0.15
    assert a["matched_mean"] > a["by_kind"]["other"]["clip_mean"]


def test_folder_round_trips_and_reward_workers_score_without_ray(fitted):
    out, _, _ = fitted
    scorer = ClipScorer.from_folder(out)
    assert scorer.context_length == 48 and scorer.image_size == (32, 32)
    tasks = sample_tasks(TINY, 6, "val", seed=0)
    images = [render(t.output_scene, TINY) for t in tasks]
    texts = [write_trace(t, TINY, compact=True).text for t in tasks]
    clip = RewardWorker("clip", clip_folder=out)
    got = clip.score(images, texts)
    np.testing.assert_allclose(got["scores"], scorer.score(images, texts), atol=1e-6)
    assert got["stats"]["pairs"] == 6 and got["stats"]["split_rate"] == 0.0 and got["stats"]["seconds"] >= 0
    exact = RewardWorker("exact")
    got = exact.score(images, texts[1:] + texts[:1])
    assert got["scores"] == [toy_agreement(t, im, TINY) for im, t in zip(images, texts[1:] + texts[:1])]
    assert exact.score(images, texts)["scores"] == [1.0] * 6
    graded = RewardWorker("graded").score(images, texts[1:] + texts[:1])["scores"]
    assert graded == [toy_agreement(t, im, TINY, graded=True) for im, t in zip(images, texts[1:] + texts[:1])]
    assert all(g >= e for g, e in zip(graded, got["scores"])) and graded != got["scores"]
    assert exact.ping() == os.getpid() == clip.ping()
    with pytest.raises(ValueError, match="kind="):
        RewardWorker("bleu")
    with pytest.raises(ValueError, match="clip_folder"):
        RewardWorker("clip")
