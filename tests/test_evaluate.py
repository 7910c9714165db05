"""The evaluation flow end to end on a tiny checkpoint: the pinned toy ParaBench, parallel and sequential
outputs kept and reused, exact judgments, failures counted (never skipped), aggregates and the Table 2 report."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from storage.parquet import read_table
from tasks.evaluate.evaluate import aggregate
from tasks.evaluate.judges import METRICS, EvalItem, EvalOutput, Judgment


def _tiny_checkpoint(folder: str, items: list) -> str:
    from model.image_tokenizer import PatchVQ
    from tasks.common.generate import make_tiny_checkpoint

    images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for i in items
              for b in (i.input_image, i.target_image) if b]
    vq = PatchVQ.fit(torch.from_numpy(np.stack(images)), patch_size=8, codebook_size=16)
    make_tiny_checkpoint(folder, codebook_size=16, grid=vq.grid, corpus=[i.instruction for i in items],
                         image_tokenizer=vq)
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["parapipe_sequence"] = {"text_tokens": 24, "instruction_tokens": 12}  # long instructions cannot fit
    json.dump(cfg, open(cfg_path, "w"))
    return folder


def test_evaluate_flow_on_toy_parabench(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.evaluate import evaluate
    from tasks.evaluate.parabench import build_toy_parabench

    root = str(tmp_path / "lake")
    ckpt = _tiny_checkpoint(str(tmp_path / "ckpt" / "final"), build_toy_parabench())
    sampler = {"steps": 6, "image_steps": 3, "text_block_length": 24, "text_temperature": 0.0,
               "image_temperature": 0.0, "image_noise": 0.0}
    out = evaluate(checkpoints=[ckpt], root=root, run_id="ev", modes=["parallel", "sequential"], sampler=sampler,
                   limit=40, batch_size=8, report_dir=str(tmp_path / "report"), grid_items=6)
    assert out["items"] == 40
    grid, chart = Image.open(out["reports"][0]), Image.open(out["reports"][-1])
    assert grid.size[1] > 3 * 128 and chart.size[0] > 400  # 3 edits (the limit has no generations) + header
    assert [os.path.basename(p) for p in out["reports"]] == ["samples-ckpt-final-parallel.png",
                                                            "samples-ckpt-final-sequential.png", "metrics.png"]
    outputs = read_table(root, "eval_outputs", run="ev").to_pylist()
    judged = read_table(root, "eval_judgments", run="ev").to_pylist()
    assert len(outputs) == len(judged) == 80 and {o["mode"] for o in outputs} == {"parallel", "sequential"}
    failed = [o for o in outputs if o["error"]]
    assert failed and all("instruction_tokens=12" in o["error"] and o["image"] is None for o in failed)
    assert all(j["failed"] for j in judged if j["item_id"] in {o["item_id"] for o in failed})
    assert list(out["results"]) == ["ckpt/final (parallel)", "ckpt/final (sequential)"]
    for name, res in out["results"].items():  # every item counted; model failures score 0, not skipped
        assert res["counts"]["overall"]["items"] == 40
        assert res["counts"]["overall"]["model_failed"] == len(failed) // 2
        row = res["table"]["overall"]
        assert set(METRICS) <= set(row) and all(0 <= row[m] <= 100 for m in METRICS)
    results = read_table(root, "eval_results", run="ev").to_pylist()
    assert {r["suite"] for r in results} == {"toy-parabench/exact/parallel", "toy-parabench/exact/sequential"}
    assert "GPT-4o (paper, real ParaBench) | 92.5" in out["markdown"]
    with get_client(sync_client=True) as client:  # the UI card embeds the chart and the grids, within budget
        [card] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["eval-ev"])))
    assert card.data.count("](data:image/png;base64,") == 3 and len(card.data) < 300_000
    # a re-run judges again from the stored outputs without sampling anything
    again = evaluate(checkpoints=[ckpt], root=root, run_id="ev", modes=["parallel"], sampler=sampler, limit=40,
                     report_dir=str(tmp_path / "report2"))
    assert len(read_table(root, "eval_outputs", run="ev")) == 80
    key = "ckpt/final (parallel)"
    assert again["results"][key]["table"] == out["results"][key]["table"]
    runs = sorted((r for r in read_table(root, "runs").to_pylist() if r["run_id"] == "ev"), key=lambda r: r["start_time"])
    config = json.loads(runs[0]["config_json"])
    assert len(runs) == 2 and config["modes"] == ["parallel", "sequential"] and config["items"] == 40
    assert (config["device"], config["dtype"]) == (("cuda", "bfloat16") if torch.cuda.is_available() else
                                                   ("cpu", "float32"))
    assert json.loads(runs[0]["timings_json"])["ckpt/final (sequential)_s"] > 0
    with pytest.raises(ValueError, match="dtype='half'"):
        evaluate(checkpoints=[ckpt], root=root, run_id="ev2", dtype="half")
    # other sampling settings under the same run id would reuse outputs sampled otherwise: refused, naming both
    other = "float32" if torch.cuda.is_available() else "bfloat16"
    with pytest.raises(ValueError, match=rf"eval run 'ev' was sampled with .*; these settings are .*'{other}'.* "
                                         r"pass a new run_id"):
        evaluate(checkpoints=[ckpt], root=root, run_id="ev", sampler=sampler, limit=40, dtype=other)
    with pytest.raises(ValueError, match="pass a new run_id"):
        evaluate(checkpoints=[ckpt], root=root, run_id="ev", sampler={**sampler, "steps": 12}, limit=40)
    # another checkpoint under the same run id would be scored with this one's stored outputs: refused
    shutil.copytree(ckpt, tmp_path / "ckpt2" / "final")
    with pytest.raises(ValueError, match=r"eval run 'ev' already holds parallel outputs of checkpoint .*ckpt/final"):
        evaluate(checkpoints=[str(tmp_path / "ckpt2" / "final")], root=root, run_id="ev", sampler=sampler, limit=40)


def test_aggregate_counts_model_failures_as_zero_and_leaves_judge_failures_out():
    items = [EvalItem("a", "edit", "add", "x"), EvalItem("b", "generate", "generate", "y"),
             EvalItem("c", "edit", "add", "z")]
    outputs = [EvalOutput("a", "t", b"png"), EvalOutput("b", "", None, error="too long"), EvalOutput("c", "t", b"png")]
    full = {m: 100.0 for m in METRICS}
    judgments = [Judgment("a", "j", "1", full), Judgment("b", "j", "1", {m: None for m in METRICS}, failed=True),
                 Judgment("c", "j", "1", {m: None for m in METRICS}, failed=True, reason="malformed answer")]
    agg = aggregate(items, outputs, judgments)
    assert agg["counts"]["overall"] == {"items": 3, "model_failed": 1, "judge_failed": 1}
    row = agg["table"]["overall"]
    assert row["text_quality"] == 50.0 and row["image_consistency"] == 100.0  # b has no consistency (generation)
    assert agg["table"]["kind:generate"]["text_quality"] == 0.0 and "kind:edit" in agg["table"]
    assert abs(row["overall"] - sum(row[m] for m in METRICS) / 6) < 1e-9


def test_clip_proxy_judge_scores_three_metrics_and_fails_missing_outputs(tmp_path):
    import open_clip

    from rl.reward import TINY_CLIP_CONFIG, register_tiny_clip, save_clip_folder
    from tasks.evaluate.judge_clip import ClipProxyJudge
    from tasks.evaluate.parabench import build_toy_parabench

    name = register_tiny_clip(str(tmp_path / "clip-config"))
    torch.manual_seed(0)
    folder = save_clip_folder(str(tmp_path / "clip"), open_clip.create_model(name), name, TINY_CLIP_CONFIG)
    bench = build_toy_parabench()
    items = bench[:3] + bench[-2:]  # edits, then generations
    outputs = [EvalOutput(i.item_id, i.reference_text, i.target_image) for i in items[:4]]
    outputs.append(EvalOutput(items[4].item_id, "", None, error="too long"))
    got = ClipProxyJudge(clip_folder=folder).judge(items, outputs)
    assert [j.failed for j in got] == [False] * 4 + [True] and got[4].reason == "too long"
    for i, j in zip(items[:4], got):
        for m in ("text_alignment", "image_alignment", "output_alignment"):
            assert 0 <= j.scores[m] <= 100
        assert j.scores["text_quality"] is None and j.scores["image_quality"] is None
        assert (j.scores["image_consistency"] is None) == (i.kind == "generate")
    # the output image equal to the input scores full consistency
    same = ClipProxyJudge(clip_folder=folder).judge(items[:1], [EvalOutput(items[0].item_id, "x", items[0].input_image)])
    assert abs(same[0].scores["image_consistency"] - 100.0) < 1e-3
