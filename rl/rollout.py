"""Rollout actors: a policy copy that samples groups of trajectories and decodes their partial outputs.

`RolloutWorker` is a plain class (tests call it directly); rl/loop.py wraps it with `ray.remote`
at the edge. Each `sample` call brings the learner's weights as one object-store reference with
a version number and the round's seed, so a worker that crashed and was restarted by Ray reloads
the current weights and redoes the lost call bit for bit (same seed, same samples): no work is
lost and nothing is produced twice. For every prompt it samples G responses with the parallel
sampler at temperature > 0, recording (model.sampling.generate(trace=True)) the step at which
each slot was decoded and its behaviour log-prob at that step, and decodes the partial
text (masked tokens dropped) and partial image (masked codes grey) after each sampled step for
the reward actors. The sampler dict may switch on the fast sampler's exact paths and its
threshold decoding (`text_threshold`, `image_threshold`: they change which slots commit, never
the logits, so the learner's full-pass replay still gives ratio 1; tests/test_pararl checks
both), but not an approximate KV cache: its stale logits make the recorded log-probs drift from
the replayed ones (benchmarks/sampler_drift.py), so `cache` other than 'none' is refused unless
`cache_refresh` is 1 (every pass a full one).
Shapes: R = B prompts x G samples rows, M output length, K sampled steps.
"""
import os
import time

import numpy as np
import torch

from model.checkpoint import from_pretrained
from model.layout import IMAGE, TEXT, OutputShape, output_regions
from model.sampling import SamplerConfig, generate


def crash_once(marker: str | None) -> None:
    """Fault injection for tests: the first call that finds no marker file creates it and dies."""
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


class RolloutWorker:
    """Holds one policy copy (loaded from a checkpoint folder) plus its tokenizers."""

    def __init__(self, checkpoint: str, shape, threads: int = 1, device: str = "cpu",
                 crash_marker: str | None = None):
        from tasks.common.generate import load_image_tokenizer
        from tasks.common.tokenizer import TextTokenizer

        torch.set_num_threads(threads)
        self.model, self.vocab = from_pretrained(checkpoint, device=device)
        self.model.eval()
        self.tokenizer, self.image_tokenizer = TextTokenizer.load(checkpoint), load_image_tokenizer(checkpoint)
        # shape: model.layout.OutputShape or layout_dimoo.DimooOutputShape (a dict of OutputShape fields also works)
        self.shape = OutputShape(**shape) if isinstance(shape, dict) else shape
        self.version, self.crash_marker = -1, crash_marker
        regions = torch.tensor(output_regions(self.shape))
        self.img_cols, self.txt_cols = regions == IMAGE, regions == TEXT

    def ping(self) -> int:
        return os.getpid()

    def _load(self, weights: dict, version: int) -> None:
        if version != self.version:
            self.model.load_state_dict(weights)
            self.version = version

    @torch.no_grad()
    def sample(self, weights: dict, version: int, prompts: list[list[int]], group_size: int, sampler: dict,
               steps: list[int], seed: int) -> dict:
        """G trajectories per prompt, recorded at `steps`.

        Returns numpy arrays: tokens, step_map (R, M) int, logp (R, M) float32 (each slot's behaviour
        log-prob at the step that decoded it), image_codes (R, K, N) int (-1 masked), text_ids
        (R, K, T), images (R, K, H, W, 3) uint8, texts [R][K] str, and seconds.
        """
        t0 = time.perf_counter()
        self._load(weights, version)
        crash_once(self.crash_marker)
        cfg = SamplerConfig(**sampler)
        if cfg.cache != "none" and cfg.cache_refresh > 1:
            raise ValueError(f"sampler cache={cfg.cache!r} with cache_refresh={cfg.cache_refresh}: rollout log-probs "
                             f"would drift from the learner's replay (benchmarks/sampler_drift.py); use cache='none' "
                             f"(text_threshold and image_threshold are safe for RL)")
        res = generate(self.model, self.vocab, self.shape, prompts, cfg, num_samples=group_size,
                       generator=torch.Generator().manual_seed(seed), record_steps=tuple(steps), trace=True)
        snaps = torch.stack([res.snapshots[s].cpu() for s in steps], dim=1)  # (R, K, M)
        codes = snaps[..., self.img_cols] - self.vocab.image_offset  # (R, K, N)
        codes = torch.where(snaps[..., self.img_cols] == self.vocab.mask_id, -1, codes)
        text_ids = snaps[..., self.txt_cols]  # (R, K, T)
        return {"tokens": res.tokens.cpu().numpy(), "step_map": res.step_map.cpu().numpy(),
                "logp": res.logp.cpu().numpy(), "image_codes": codes.numpy(), "text_ids": text_ids.numpy(),
                "images": self._images(codes), "texts": self._texts(text_ids), "seconds": time.perf_counter() - t0}

    def _texts(self, text_ids: torch.Tensor) -> list[list[str]]:
        from rl.reward import partial_text

        return [[partial_text(k.tolist(), self.vocab.mask_id, self.tokenizer) for k in row] for row in text_ids]

    def _images(self, codes: torch.Tensor) -> np.ndarray:
        """(R, K, N) codes with -1 at masked slots -> (R, K, H, W, 3) uint8 partial images."""
        from rl.reward import partial_image

        if self.image_tokenizer is None:
            raise ValueError("the rollout checkpoint has no image_tokenizer/ folder; CLIP rewards need images: "
                             "copy the image tokenizer the model was trained with into the checkpoint folder")
        R, K, N = codes.shape
        grid = self.image_tokenizer.grid
        images = partial_image(codes.reshape(R * K, *grid), self.image_tokenizer)  # (R*K, H, W, 3)
        return images.reshape(R, K, *images.shape[1:]).numpy()
