"""CLIP-score proxies of three ParaBench metrics, from the same open_clip scorer the ParaRL reward actors use.

text_alignment  = 100 * max(0, cos(CLIP(instruction), CLIP(reasoning text)))
image_alignment = 100 * max(0, cos(CLIP(instruction), CLIP(output image)))
output_alignment = 100 * max(0, cos(CLIP(reasoning text), CLIP(output image)))  (the ParaRL reward itself)
image_consistency (edits) = 100 * max(0, cos(CLIP(input image), CLIP(output image)))
Text and image quality have no CLIP proxy and stay None. These are cheap, judge-free signals on the
CLIP-score scale (100 x cosine), not on the paper's 0-100 rubric: compare them across runs, not with
Table 2. Long texts are split and averaged as in rl/reward.ClipScorer (the split rate is in `reason`).
"""
import io

import numpy as np

from tasks.evaluate.judges import METRICS, EvalItem, EvalOutput, Judgment


def _image(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


class ClipProxyJudge:
    """Judge interface over a ClipScorer (a fitted reward folder, or an open_clip model + local weights)."""

    name = "clip-proxy"
    version = "1"

    def __init__(self, clip_folder: str | None = None, model_name: str | None = None, pretrained: str | None = None):
        from rl.reward import ClipScorer

        if not clip_folder and not model_name:
            raise ValueError("ClipProxyJudge needs clip_folder (parapipe fit-reward) or model_name + pretrained")
        self.scorer = ClipScorer.from_folder(clip_folder) if clip_folder else ClipScorer(model_name, pretrained)

    def judge(self, items: list[EvalItem], outputs: list[EvalOutput]) -> list[Judgment]:
        by_id = {o.item_id: o for o in outputs}
        ok = [(i, by_id[i.item_id]) for i in items
              if i.item_id in by_id and by_id[i.item_id].error is None and by_id[i.item_id].image is not None]
        scores = {}
        if ok:
            texts, stats = self.scorer.embed_texts([i.instruction for i, _ in ok] + [o.text for _, o in ok])
            instr, reason = texts[:len(ok)], texts[len(ok):]  # (N, D) each
            out_img = self.scorer.embed_images([_image(o.image) for _, o in ok])
            edits = [k for k, (i, _) in enumerate(ok) if i.input_image is not None]
            in_img = self.scorer.embed_images([_image(ok[k][0].input_image) for k in edits]) if edits else None
            pct = lambda a, b: [100.0 * max(0.0, float(v)) for v in (a * b).sum(-1)]  # noqa: E731
            cols = {"text_alignment": pct(instr, reason), "image_alignment": pct(instr, out_img),
                    "output_alignment": pct(reason, out_img)}
            consistency = dict(zip(edits, pct(in_img, out_img[edits]))) if edits else {}
            for k, (i, _) in enumerate(ok):
                s = {m: None for m in METRICS}
                s.update({m: v[k] for m, v in cols.items()})
                s["image_consistency"] = consistency.get(k)
                scores[i.item_id] = s
            note = f"text split rate {stats['split_rate']:.2f}"
        result = []
        for i in items:
            if i.item_id in scores:
                result.append(Judgment(i.item_id, self.name, self.version, scores[i.item_id], reason=note))
            else:
                o = by_id.get(i.item_id)
                why = "no output" if o is None else (o.error or "no output image")
                result.append(Judgment(i.item_id, self.name, self.version, {m: None for m in METRICS}, True, why))
        return result
