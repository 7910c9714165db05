"""ParaRL rewards: CLIP text-image alignment of (partial) outputs, and the exact toy-world agreement.

Holds:
  ClipScorer          one open_clip model; cosine similarity of (image, text) pairs, with texts longer
                      than the text tower's context split into word-boundary chunks (not truncated)
  save_clip_folder    writes a trained CLIP (config JSON + safetensors + reward.json) that
                      ClipScorer.from_folder reads back (tasks/pararl/fit_reward.py trains the toy one)
  partial_text/_image what a half-denoised sample looks like: masked text ids dropped, masked image
                      patches painted flat grey
  toy_agreement       exact graded agreement (F1) between a trace's stated result and an image
  RewardWorker        a plain class the caller wraps with ray.remote(RewardWorker)
Leaves out the RL loop (rl/grpo.py, rl/learner.py) and CLIP training (tasks/pararl/fit_reward.py).
open_clip is imported inside functions only; ray never.

Shapes: images are uint8 (H, W, 3) (or PIL images); image codes are long (N, h, w), -1 = masked.
"""
import json
import os
import time

import numpy as np
import torch

TINY_CLIP = "ParaPipe-Tiny-ViT"
TINY_CLIP_CONFIG = {"embed_dim": 64,
                    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
                    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
REWARD_FILE = "reward.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
FOLDER_FORMAT = 1
GREY = (128, 128, 128)  # flat fill of still-masked image patches
MAX_BATCH = 512  # images or text chunks per encoder call
SCHEMAS = ("hf-hub:", "local-dir:")


def register_tiny_clip(folder: str) -> str:
    """Writes and registers a tiny open_clip config (random weights); returns its model name."""
    import open_clip

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{TINY_CLIP}.json")
    with open(path, "w") as f:
        json.dump(TINY_CLIP_CONFIG, f)
    open_clip.add_model_config(path)
    return TINY_CLIP


def save_clip_folder(folder: str, model, model_name: str, config: dict, extra: dict | None = None) -> str:
    """Writes <model_name>.json (open_clip config), open_clip_model.safetensors and reward.json.

    reward.json holds model_name, file names, context_length, the image preprocessing facts (size,
    mean, std: uint8 / 255, then (x - mean) / std, no resize at the model's own size) and `extra`
    (e.g. training metrics). Returns the folder.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config_file = f"{model_name}.json"
    with open(os.path.join(folder, config_file), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_FILE))
    pp = model.visual.preprocess_cfg
    info = {"format_version": FOLDER_FORMAT, "model_name": model_name, "config_file": config_file,
            "weights_file": WEIGHTS_FILE, "context_length": int(config["text_cfg"]["context_length"]),
            "preprocess": {"image_size": int(config["vision_cfg"]["image_size"]), "mean": list(pp["mean"]),
                           "std": list(pp["std"]), "scale": "uint8 / 255", "resize": "none at image_size"},
            **(extra or {})}
    with open(os.path.join(folder, REWARD_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return folder


def _split_words(text: str, count, context: int) -> list[str]:
    """Consecutive word-boundary chunks of text that each fit `context` tokens (count: str -> tokens).

    A text that fits is returned whole; a single word longer than the context stays one chunk (the
    tokenizer truncates it). Whitespace-only text gives [""].
    """
    if count(text) <= context:
        return [text]
    overhead = count("")  # start/end tokens every chunk carries
    chunks, current, used = [], [], 0
    for word in text.split():
        n = count(word) - overhead
        if current and used + n > context - overhead:
            chunks.append(" ".join(current))
            current, used = [], 0
        current.append(word)
        used += n
    return chunks + [" ".join(current)] if current else chunks or [""]


class ClipScorer:
    """Cosine similarity between CLIP image and text embeddings, in [-1, 1].

    Long texts: a text with more tokens than the text context is split into consecutive
    word-boundary chunks that each fit; its embedding is the mean of the unit chunk embeddings,
    renormalised to unit length (every part of the trace counts equally, nothing is cut off; a
    text that fits is embedded exactly as open_clip would). Empty text (every token still masked)
    is embedded as the empty string, i.e. just the start and end tokens, so it has a defined,
    model-dependent score. `truncation` accumulates pairs / split_texts / chunks over all calls.
    """

    def __init__(self, model_name: str, pretrained: str | None = None, device: str = "cpu",
                 config_path: str | None = None):
        """
        Args:
            model_name: any open_clip architecture (built-in, registered, or hf-hub:/local-dir: names).
            pretrained: None (random weights), an open_clip tag, or a local weights file (state dict).
            device: torch device of the model.
            config_path: a JSON config (or folder of them) to register with open_clip first.
        """
        import open_clip

        if config_path is not None:
            if not os.path.exists(config_path):
                raise ValueError(f"config_path={config_path!r} does not exist; pass the open_clip JSON config file")
            open_clip.add_model_config(config_path)
        if not model_name.startswith(SCHEMAS) and model_name not in open_clip.list_models():
            raise ValueError(f"open_clip has no model {model_name!r}; use a built-in name (e.g. ViT-B-32) or "
                             f"register a JSON config first (config_path=..., register_tiny_clip)")
        if pretrained and os.sep in pretrained and not os.path.isfile(pretrained):
            raise ValueError(f"pretrained={pretrained!r} is not a file; pass a local state-dict file or a tag")
        self.model_name, self.device = model_name, device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                               device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.context_length = int(getattr(self.tokenizer, "context_length", None) or self.model.context_length)
        pp = self.model.visual.preprocess_cfg
        size = pp["size"]
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.mean = torch.tensor(pp["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.truncation = {"pairs": 0, "split_texts": 0, "chunks": 0}
        self.info: dict = {}

    @classmethod
    def from_folder(cls, folder: str, device: str = "cpu") -> "ClipScorer":
        """Loads what save_clip_folder wrote (config, weights, reward.json with the preprocessing facts)."""
        path = os.path.join(folder, REWARD_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; write the folder with save_clip_folder or "
                                    f"python -m tasks.pararl.fit_reward --out {folder}")
        with open(path) as f:
            info = json.load(f)
        scorer = cls(info["model_name"], pretrained=os.path.join(folder, info["weights_file"]), device=device,
                     config_path=os.path.join(folder, info["config_file"]))
        pp = info["preprocess"]
        if scorer.context_length != info["context_length"] or scorer.image_size != (pp["image_size"],) * 2:
            raise ValueError(f"{folder}: model {info['model_name']!r} has context {scorer.context_length} and "
                             f"image size {scorer.image_size}, but reward.json says {info['context_length']} and "
                             f"{pp['image_size']}; another config with that name was registered, rename one")
        scorer.mean = torch.tensor(pp["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        scorer.std = torch.tensor(pp["std"], dtype=torch.float32).view(1, 3, 1, 1)
        scorer.info = info
        return scorer

    # --- text -------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of text including the start / end tokens the text tower adds."""
        tok = self.tokenizer
        if hasattr(tok, "sot_token_id") and hasattr(tok, "encode"):  # open_clip SimpleTokenizer
            return len(tok.encode(text)) + 2
        if hasattr(tok, "tokenizer"):  # HFTokenizer and friends
            return len(tok.tokenizer(text)["input_ids"])
        return int((tok([text], context_length=4096) != 0).sum())

    def chunks(self, text: str) -> list[str]:
        """Word-boundary chunks of text that each fit the context (one chunk if it fits)."""
        return _split_words(text, self.count_tokens, self.context_length)

    def embed_texts(self, texts: list[str]) -> tuple[torch.Tensor, dict]:
        """Unit text embeddings (N, D) (chunks averaged, then renormalised) and split stats."""
        pieces = [self.chunks(t) for t in texts]
        flat = [c for p in pieces for c in p]
        with torch.inference_mode():
            ids = self.tokenizer(flat).to(self.device)  # (C, context)
            emb = torch.cat([self.model.encode_text(b, normalize=True).float() for b in ids.split(MAX_BATCH)])
        owner = torch.tensor([i for i, p in enumerate(pieces) for _ in p], device=emb.device)
        out = torch.zeros(len(texts), emb.shape[1], device=emb.device).index_add_(0, owner, emb)
        out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        split = sum(len(p) > 1 for p in pieces)
        stats = {"pairs": len(texts), "split_texts": split, "split_rate": split / max(1, len(texts)),
                 "chunks": len(flat)}
        return out.cpu(), stats

    # --- images -----------------------------------------------------------------------------------
    def pixels(self, images) -> torch.Tensor:
        """Model input (N, 3, S, S) float from PIL images, uint8 (H, W, 3) arrays / tensors or a stack.

        Arrays already at the model's image size are scaled to [0, 1] and normalised with its
        mean / std (what open_clip's transform does to such an image, without PIL); anything else
        goes through open_clip's own preprocess transform.
        """
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)
        out = []
        for im in images:
            if isinstance(im, (np.ndarray, torch.Tensor)):
                arr = torch.as_tensor(np.asarray(im))
                if arr.dtype != torch.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
                    raise ValueError(f"image arrays must be uint8 (H, W, 3), got {arr.dtype} {tuple(arr.shape)}; "
                                     f"convert with np.asarray(x, dtype=np.uint8)")
                if tuple(arr.shape[:2]) == self.image_size:
                    out.append(((arr.permute(2, 0, 1).float()[None] / 255.0 - self.mean) / self.std)[0])
                    continue
                from PIL import Image

                im = Image.fromarray(arr.numpy())
            out.append(self.preprocess(im))
        return torch.stack(out).to(self.device)

    def embed_images(self, images) -> torch.Tensor:
        """Unit image embeddings (N, D); one encoder call per MAX_BATCH images."""
        x = self.pixels(images)
        with torch.inference_mode():
            return torch.cat([self.model.encode_image(b, normalize=True).float() for b in x.split(MAX_BATCH)]).cpu()

    # --- pairs ------------------------------------------------------------------------------------
    def score_with_stats(self, images, texts: list[str]) -> tuple[list[float], dict]:
        """One cosine similarity per (image, text) pair, and this call's split stats
        {pairs, split_texts, split_rate, chunks}."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts; pass one text per image")
        if not len(texts):
            return [], {"pairs": 0, "split_texts": 0, "split_rate": 0.0, "chunks": 0}
        txt, stats = self.embed_texts(list(texts))
        img = self.embed_images(images)
        for k in ("pairs", "split_texts", "chunks"):
            self.truncation[k] += stats[k]
        self.truncation["split_rate"] = self.truncation["split_texts"] / max(1, self.truncation["pairs"])
        return (img * txt).sum(-1).clamp(-1.0, 1.0).tolist(), stats

    def score(self, images, texts: list[str]) -> list[float]:
        """images: PIL images or uint8 (H, W, 3) arrays; texts: one per image. One cosine per pair."""
        return self.score_with_stats(images, texts)[0]


# --- partial outputs ------------------------------------------------------------------------------

def partial_text(ids: list[int], mask_id: int, tokenizer) -> str:
    """Decodes text ids with every still-masked id dropped (tokenizer.decode(list[int]) -> str)."""
    return tokenizer.decode([int(i) for i in ids if int(i) != mask_id])


def partial_image(codes: torch.Tensor, image_tokenizer, fill: tuple[int, int, int] = GREY) -> torch.Tensor:
    """Image of a partially denoised code grid: masked patches painted a flat `fill` colour.

    Args:
        codes: long (N, h, w) or (h, w); negative (-1) = still masked.
        image_tokenizer: has decode(long (N, h, w)) -> uint8 (N, H, W, 3) (e.g. PatchVQ).
        fill: RGB of masked patches (mid-grey: recognisably "not decoded yet").
    Returns:
        uint8 (N, H, W, 3), or (H, W, 3) for a single grid; patch side = H // h.
    """
    single = codes.dim() == 2
    codes = codes[None] if single else codes
    masked = codes < 0  # (N, h, w)
    images = image_tokenizer.decode(codes.clamp(min=0)).clone()  # (N, H, W, 3)
    p = images.shape[1] // codes.shape[1]
    px = masked.repeat_interleave(p, 1).repeat_interleave(p, 2).to(images.device)  # (N, H, W)
    images[px] = torch.tensor(fill, dtype=torch.uint8, device=images.device)
    return images[0] if single else images


# --- exact toy reward -----------------------------------------------------------------------------

def _stated_objects(text: str, preset) -> tuple[list, int] | None:
    """Objects stated after the last 'result:' and the number of unparseable items; None if nothing
    is stated yet (no marker, or nothing after it). 'empty' alone states no objects."""
    from tasks.toy.scene import EMPTY_SCENE_TEXT, parse_description
    from tasks.toy.teacher import RESULT_MARKER

    i = text.lower().rfind(RESULT_MARKER)
    rest = "" if i < 0 else text[i + len(RESULT_MARKER):].strip().lower().rstrip(".").strip()
    if not rest:
        return None
    if rest == EMPTY_SCENE_TEXT:
        return [], 0
    objects, wrong = [], 0
    for item in rest.split(","):
        scene = None if "." in item else parse_description(item, preset)
        if scene is None or len(scene) != 1:
            wrong += 1
        else:
            objects.append(scene[0])
    return objects, wrong


def _shown_objects(image: np.ndarray, preset, tolerance: float, fill) -> tuple[set, int]:
    """Objects the image shows for sure, and how many cells are unknown (grey fill or no tile match)."""
    from tasks.toy.render import _cells, glyph_tiles
    from tasks.toy.scene import ToyObject

    labels, tiles = glyph_tiles(preset)
    cells = _cells(image, preset)  # (cells, c*c*3) int16
    err = np.abs(cells[:, None, :] - tiles.reshape(len(tiles), -1).astype(np.int16)[None]).mean(-1)  # (cells, T)
    best = err.argmin(1)
    grey = (cells.reshape(len(cells), -1, 3) == np.asarray(fill, dtype=np.int16)).all(axis=(1, 2))
    known = (err[np.arange(len(best)), best] <= tolerance) & ~grey
    shown = {ToyObject(i // preset.grid, i % preset.grid, *labels[t])
             for i, t in enumerate(best) if known[i] and labels[t] is not None}
    return shown, int((~known).sum())


def _graded_tp(stated: set, shown: set, grid: int) -> float:
    """Soft true positives: stated and shown objects paired one to one, most alike first; a pair scores
    a quarter each for the same colour, the same shape (and size), and the row / column distance (1 at
    the same row or column, 0 at the far edge). An exact pair scores 1."""
    far = max(1, grid - 1)
    pairs = sorted(((0.25 * (s.colour == o.colour) + 0.25 * ((s.shape, s.size) == (o.shape, o.size))
                     + 0.25 * (1 - abs(s.row - o.row) / far) + 0.25 * (1 - abs(s.col - o.col) / far), i, j)
                    for i, s in enumerate(sorted(stated)) for j, o in enumerate(sorted(shown))), reverse=True)
    used_s, used_o, tp = set(), set(), 0.0
    for sim, i, j in pairs:
        if i not in used_s and j not in used_o:
            used_s.add(i)
            used_o.add(j)
            tp += sim
    return tp


def toy_agreement(text: str, image, preset, tolerance: float = 0.0, fill: tuple[int, int, int] = GREY,
                  graded: bool = False) -> float:
    """Graded exact agreement in [0, 1] between what a (partial) trace states and a (partial) image shows.

    Stated: each comma-separated item after the last "result:" that parses as "colour shape cell"
    (preset vocabulary and grid) is a stated object; every other item (half-decoded, unknown words,
    a stray '.') is a wrong statement; "empty" alone states no objects. Shown: each cell is the
    nearest glyph tile if within `tolerance` (mean abs error) and not flat `fill` grey, else
    unknown; background cells show no object. With tp = distinct stated objects the image shows:
        precision = tp / (stated objects + wrong statements), recall = tp / shown objects,
        score = F1 = 2 tp / (stated + wrong + shown).
    Special cases: 0 when nothing is stated yet (no "result:" or nothing after it); when neither
    side names an object, the fraction of cells that are known (1.0 for a full render). A stated
    object in an unknown cell is not shown, so partial images score below 1. On a full render the
    score is 1.0 exactly when tasks.toy.text_image_agreement(text, image, preset, tolerance) holds.
    graded: tp counts partial matches too (_graded_tp: colour, shape, row and column distance), so
    two wrong statements are told apart by how near they are ("c3" for "d3" beats "a3"); a richer
    RL signal when most samples of a group name a wrong cell. Never below the exact score.

    Args:
        text: a trace (possibly partial, e.g. from partial_text).
        image: uint8 (H, W, 3) array-like at the preset's image size (e.g. from partial_image).
        preset: a ToyPreset or its name in PRESETS.
    """
    from tasks.toy.scene import PRESETS

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    image = np.asarray(image)
    if image.shape != (preset.image_size, preset.image_size, 3) or image.dtype != np.uint8:
        raise ValueError(f"toy_agreement expects uint8 ({preset.image_size}, {preset.image_size}, 3) images for "
                         f"preset {preset.name!r}, got {image.dtype} {image.shape}; decode with the same preset")
    stated = _stated_objects(text, preset)
    if stated is None:
        return 0.0
    objects, wrong = stated
    shown, unknown = _shown_objects(image, preset, tolerance, fill)
    if not objects and not wrong and not shown:
        return 1.0 - unknown / preset.grid ** 2
    tp = _graded_tp(set(objects), shown, preset.grid) if graded else len(set(objects) & shown)
    return 2.0 * tp / (len(objects) + wrong + len(shown))


# --- ray actor body -------------------------------------------------------------------------------

class RewardWorker:
    """Scores (image, text) batches with a CLIP model ("clip") or toy_agreement ("exact", or "graded" for its
    partial-credit form).

    A plain class: wrap it with ray.remote(RewardWorker) to run it as an actor.
    """

    def __init__(self, kind: str, clip_folder: str | None = None, model_name: str | None = None,
                 pretrained: str | None = None, preset: str = "tiny", device: str = "cpu",
                 crash_marker: str | None = None):
        from tasks.toy.scene import PRESETS

        if kind not in ("clip", "exact", "graded"):
            raise ValueError(f"kind={kind!r}; use 'clip' (CLIP similarity), 'exact' (toy_agreement) or 'graded' "
                             f"(toy_agreement with partial credit)")
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}; use one of {sorted(PRESETS)}")
        self.kind, self.preset, self.scorer, self.crash_marker = kind, PRESETS[preset], None, crash_marker
        if kind == "clip":
            if clip_folder is None and model_name is None:
                raise ValueError("kind='clip' needs clip_folder (from tasks.pararl.fit_reward) or model_name")
            self.scorer = (ClipScorer.from_folder(clip_folder, device) if clip_folder is not None
                           else ClipScorer(model_name, pretrained, device))

    def score(self, images: list, texts: list[str]) -> dict:
        """images: uint8 (H, W, 3) arrays; texts: one per image. Returns {"scores", "stats"}."""
        from rl.rollout import crash_once

        t0 = time.perf_counter()
        crash_once(self.crash_marker)  # fault injection (tests)
        if self.scorer is not None:
            scores, stats = self.scorer.score_with_stats(images, texts)
        else:
            if len(images) != len(texts):
                raise ValueError(f"{len(images)} images but {len(texts)} texts; pass one text per image")
            scores = [toy_agreement(t, im, self.preset, graded=self.kind == "graded") for im, t in zip(images, texts)]
            stats = {"pairs": len(texts), "split_texts": 0, "split_rate": 0.0, "chunks": 0}
        return {"scores": scores, "stats": {**stats, "seconds": time.perf_counter() - t0}}

    def ping(self) -> int:
        """The worker's process id."""
        return os.getpid()
