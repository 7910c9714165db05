"""CLIP text-image alignment scores with open_clip (trace filters now, ParaRL rewards later).

`ClipScorer` holds one open_clip model and scores (image, text) pairs by the cosine similarity of
their embeddings. Real checkpoints come from a local `pretrained` file or tag; with
`pretrained=None` the weights are random (what the offline tests can build). Texts longer than
the model's context are truncated by its tokenizer. open_clip is imported here only.
"""
import json
import os

TINY_CLIP = "ParaPipe-Tiny-ViT"
TINY_CLIP_CONFIG = {"embed_dim": 64,
                    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
                    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def register_tiny_clip(folder: str) -> str:
    """Writes and registers a tiny open_clip config (random weights); returns its model name."""
    import open_clip

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{TINY_CLIP}.json")
    with open(path, "w") as f:
        json.dump(TINY_CLIP_CONFIG, f)
    open_clip.add_model_config(path)
    return TINY_CLIP


class ClipScorer:
    """Cosine similarity between CLIP image and text embeddings, in [-1, 1]."""

    def __init__(self, model_name: str, pretrained: str | None = None, device: str = "cpu"):
        import open_clip
        import torch

        if model_name not in open_clip.list_models():
            raise ValueError(f"open_clip has no model {model_name!r}; use a built-in name "
                             f"(e.g. ViT-B-32) or register a JSON config first (register_tiny_clip)")
        self.torch, self.device = torch, device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                               device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def score(self, images: list, texts: list[str]) -> list[float]:
        """images: PIL images; texts: one per image. Returns one cosine similarity per pair."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts; pass one text per image")
        torch = self.torch
        with torch.no_grad():
            pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, H, W)
            img = self.model.encode_image(pixels)  # (B, D)
            txt = self.model.encode_text(self.tokenizer(texts).to(self.device))  # (B, D)
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            return (img * txt).sum(-1).float().tolist()
