"""The sampler's forward passes: cond + uncond rows, and the approximate KV caches.

StepForward runs the model on prompt + output part for model.sampling.generate. Exact by default:
one full pass per step over every row, cond and uncond rows joined in one batch (upstream runs the
unconditional prompts as separate passes: `batch_cfg=False`), the head only on the output slots the
step reads (`need`: upstream runs it on every position, and at the paper's layout the logits of
known slots, kept as a dense (B, M, V) tensor, cost as much as the model); without a cache, leading
columns that are padding in every row of a pass are left out.
The approximate caches follow Fast-dLLM (arXiv 2505.22618, `generate_with_prefix_cache` /
`generate_with_dual_cache`): a full pass stores every layer's keys and values; until the next
refresh only some columns run through the blocks and attend to the stored k/v of the rest, whose
context has moved on since (hence approximate).
- "prefix": the prompt (instruction + input image) is cached; the whole output part is recomputed.
- "dual": also the output slots that are not needed this step are cached; recomputed are, per
  row, the slots whose logits the step needs in that row (its masked slots of the current text
  block, its masked image slots on image steps) and every slot whose token changed since its k/v
  was written (so a cached entry always belongs to the token now at its position, as in
  dKV-Cache's delayed caching). Rows decode different slots, so each row runs its own columns
  (as many as the busiest row, the others repeating one): a row's result does not depend on the
  batch it is in, and no row pays for the union of everyone's slots.
A refresh (full pass) comes every `refresh` passes of a half (cond or uncond rows) and whenever
the sampler asks (a new text block, as Fast-dLLM refreshes per block); refresh=1 is exact.
ImageLogitCache adds Lumina-DiMOO's ML-Cache on top of "dual": an image step recomputes only the
least sure masked image slots and reuses the last logits of the others.
Rows: the sampler may name the rows that have work this step (`active`); only they run, the others
get zero logits. Exact: a row attends only to itself. In a cache a skipped row's entries stay as they
were, and its tokens have not changed since, so they are no staler than before the skip.
Knows nothing about schedules or tokens; it returns logits. Shapes: B rows, P padded prompt
length, M output length, V vocab, A needed output columns.
"""
import math

import torch

from model.layout import left_pad

CACHE_MODES = ("none", "prefix", "dual")
ML_CACHE_WARMUP = 0.3
"""Share of the image steps that recompute every masked image slot before ImageLogitCache skips any
(Lumina-DiMOO's `warmup_ratio`)."""


class _Half:
    """Cache state of one group of rows (cond or uncond)."""

    def __init__(self, rows: slice):
        self.rows, self.kv, self.age, self.written = rows, None, 0, None


class StepForward:
    """Logits of the output slots a step reads, for the cond rows (and the uncond rows when asked)."""

    def __init__(self, model, prompts: list[list[int]], uncond_prompts: list[list[int]] | None, pad_id: int,
                 M: int, cache: str = "none", refresh: int = 1, batch_cfg: bool = True):
        if cache not in CACHE_MODES:
            raise ValueError(f"cache={cache!r}; use one of {CACHE_MODES}")
        if cache != "none" and not hasattr(model, "forward_cols"):
            raise ValueError(f"cache={cache!r} needs a model with forward_cols (model.transformer.DiffusionLM); "
                             f"got {type(model).__name__}: use cache='none'")
        self.model, self.M, self.cache, self.refresh, self.batch_cfg = model, M, cache, max(1, refresh), batch_cfg
        self.head_cols = hasattr(model, "forward_cols")  # DiffusionLM runs its head on the needed slots only
        dev = next(model.parameters()).device
        rows = prompts + (uncond_prompts or [])
        ids, mask = left_pad(rows, pad_id)
        self.ids, self.mask, self.B, self.P = ids.to(dev), mask.to(dev), len(prompts), ids.shape[1]
        self.halves = [_Half(slice(0, self.B)), _Half(slice(self.B, 2 * self.B))]
        self.full_passes = self.partial_passes = 0
        self.columns = 0
        """Sequence columns run through the blocks, summed over passes (cost accounting)."""

    def full_next(self, with_uncond: bool, force_refresh: bool = False) -> bool:
        """Whether the next call with these arguments runs every column (no cache, or a refresh)."""
        return self._stale(self.halves[:2 if with_uncond else 1], force_refresh)

    def _stale(self, halves: list[_Half], force_refresh: bool) -> bool:
        return self.cache == "none" or force_refresh or any(h.kv is None or h.age >= self.refresh for h in halves)

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, with_uncond: bool, need: torch.Tensor | None = None,
                 force_refresh: bool = False, active: torch.Tensor | None = None):
        """Logits (B, A, V) of the output columns some row needs, for the cond rows, and the same or None
        for the uncond rows.

        y (B, M) current output parts; need (M,) or per row (B, M) bool: the output slots whose logits
        the caller reads (A = columns needed by any row; None: all M). Only the (row, slot) pairs in
        `need` are guaranteed: a dual-cache pass leaves the others at zero. active (B,) bool: rows that
        have work (None: all); the others are not run and get zero logits.
        """
        if need is None:  # every output slot, from a full pass
            need, force_refresh = torch.ones(self.M, dtype=torch.bool, device=y.device), True
        need = need.expand(self.B, self.M)  # (B, M)
        halves = self.halves[:2 if with_uncond else 1]
        idx = None if active is None or bool(active.all()) else active.nonzero().squeeze(1)  # (b,) rows run
        if idx is not None and any(h.kv is None for h in halves) and self.cache != "none":
            idx = None  # a cache's first pass fills every row
        if self.batch_cfg or len(halves) == 1:
            out = self._run(halves, y, need, force_refresh, idx)
        else:  # upstream: one pass for the cond rows, another for the uncond rows
            out = torch.cat([self._run([h], y, need, force_refresh, idx) for h in halves])
        if idx is not None:  # (len(halves) * b, A, V) -> (len(halves) * B, A, V), zeros for the idle rows
            full = out.new_zeros(len(halves), self.B, *out.shape[1:])
            full[:, idx] = out.view(len(halves), len(idx), *out.shape[1:])
            out = full.flatten(0, 1)
        return (out[:self.B], out[self.B:]) if with_uncond else (out, None)

    def _run(self, halves: list[_Half], y: torch.Tensor, need, force_refresh: bool, idx) -> torch.Tensor:
        rows = slice(halves[0].rows.start, halves[-1].rows.stop) if idx is None else \
            torch.cat([idx + h.rows.start for h in halves])  # (r,)
        ids = torch.cat([self.ids[rows], (y if idx is None else y[idx]).repeat(len(halves), 1)], dim=1)  # (r, P + M)
        mask = torch.cat([self.mask[rows], torch.ones(ids.shape[0], self.M, dtype=torch.bool, device=ids.device)],
                         dim=1)
        head = need.any(0).nonzero().squeeze(1)  # (A,)
        if self.cache == "none":  # exact: leading columns that are padding in every row run are left out
            lead = int(mask.any(0).long().argmax())  # (unconditional prompts are short: upstream runs them unpadded)
            return self._full(halves, ids[:, lead:], mask[:, lead:], idx, head)
        if self._stale(halves, force_refresh):
            return self._full(halves, ids, mask, idx, head)
        return self._partial(halves, ids, mask, (need if idx is None else need[idx]).repeat(len(halves), 1), idx)

    def _full(self, halves, ids, mask, idx, head) -> torch.Tensor:
        kv = [] if self.cache != "none" else None
        if self.head_cols:
            logits = self.model(ids, mask, last_n=self.M, kv=kv, head_cols=head)
        else:  # any model(ids, mask, last_n): every output slot's logits, the needed ones kept
            logits = self.model(ids, mask, last_n=self.M)[:, head]
        self.full_passes += 1
        self.columns += ids.shape[1]
        if kv is not None:
            r = ids.shape[0] // len(halves)
            for i, h in enumerate(halves):
                part = slice(i * r, (i + 1) * r)
                if idx is None:
                    h.kv, h.written = [(k[part], v[part]) for k, v in kv], ids[part].clone()
                else:  # only the rows run are refreshed
                    for (hk, hv), (k, v) in zip(h.kv, kv):
                        hk[idx], hv[idx] = k[part], v[part]
                    h.written[idx] = ids[part]
                h.age = 1
        return logits.float()  # (r, A, V)

    def _partial(self, halves, ids, mask, need, idx) -> torch.Tensor:
        """need (r, M): per row run. Each row runs its needed and changed output columns (dual) or all of
        them (prefix); returns (r, A, V) at the columns some row needs, zero where that row did not."""
        written = torch.cat([h.written if idx is None else h.written[idx] for h in halves])  # (r, P + M)
        union = need.any(0)  # (M,)
        out = torch.zeros(ids.shape[0], int(union.sum()), self.model.config.rows, device=ids.device)  # (r, A, V)
        run = need | (ids != written)[:, self.P:] if self.cache == "dual" else torch.ones_like(need)  # (r, M)
        n = run.sum(1)  # (r,)
        width = int(n.max())
        if width == 0:  # nothing needed and nothing changed
            return out
        ar = torch.arange(self.M, device=ids.device)
        first = torch.where(run, ar, self.M).sort(1).values[:, :width]  # (r, width) each row's columns, then M
        last = first.gather(1, (n - 1).clamp(min=0)[:, None])  # a busy row's last column; 0 for an idle one
        slot = torch.where(first < self.M, first, torch.where(n[:, None] > 0, last, 0))  # (r, width) output slots
        head = need.gather(1, slot) & (ar[:width][None] < n[:, None])  # (r, width): logits read, no repeats
        if len(halves) == 1 and idx is None:
            kv = halves[0].kv
        else:  # join the halves' caches (a copy), then write the fresh columns back to each
            pick = (lambda t: t) if idx is None else (lambda t: t[idx])  # noqa: E731
            kv = [tuple(torch.cat([pick(h.kv[layer][j]) for h in halves]) for j in (0, 1))
                  for layer in range(len(halves[0].kv))]
        cols = slot + self.P  # (r, width) sequence columns
        logits = self.model.forward_cols(ids, cols, mask, kv, head_mask=head).float()  # (N, V)
        at = union.long().cumsum(0) - 1  # (M,) output slot -> its place among the columns returned
        rr, aa = head.nonzero(as_tuple=True)
        out[rr, at[slot[rr, aa]]] = logits
        r = ids.shape[0] // len(halves)
        for i, h in enumerate(halves):
            part = slice(i * r, (i + 1) * r)
            c = cols[part]  # (r, width)
            if len(halves) > 1 or idx is not None:
                for layer, fresh in enumerate(kv):
                    for j in (0, 1):
                        dst = h.kv[layer][j]  # (B, Hkv, L, hd)
                        at_kv = c[:, None, :, None].expand(-1, dst.shape[1], -1, dst.shape[3])
                        vals = fresh[j][part].gather(2, at_kv)  # (r, Hkv, width, hd)
                        if idx is None:
                            dst.scatter_(2, at_kv, vals)
                        else:  # in place at (row, head, column, dim): no copy of the rows' whole cache
                            heads = torch.arange(dst.shape[1], device=dst.device)[None, :, None, None]
                            dims = torch.arange(dst.shape[3], device=dst.device)[None, None, None, :]
                            dst.index_put_((idx[:, None, None, None], heads, c[:, None, :, None], dims), vals)
            if idx is None:
                h.written.scatter_(1, c, ids[part].gather(1, c))
            else:
                h.written[idx] = h.written[idx].scatter(1, c, ids[part].gather(1, c))
            h.age += 1
        self.partial_passes += 1
        self.columns += width
        return out


def image_slots_to_recompute(logits: torch.Tensor, masked: torch.Tensor, ratio: float) -> torch.Tensor:
    """ML-Cache (Lumina-DiMOO `generate_image`): the masked slots whose last prediction is least sure.

    logits (B, N, K) each image slot's last computed codebook logits; masked (B, N) bool. Per row the
    ceil((1 - ratio) * masked) masked slots with the lowest top probability. Returns (B, N) bool.
    """
    conf = torch.full(masked.shape, math.inf, device=logits.device)  # (B, N); only masked slots are ranked
    conf[masked] = torch.softmax(logits[masked].float(), dim=-1).amax(-1)
    n = torch.ceil((1 - ratio) * masked.sum(-1)).long()  # (B,)
    rank = conf.argsort(dim=-1, stable=True).argsort(dim=-1)  # (B, N) 0 = least sure
    return masked & (rank < n[:, None])


class ImageLogitCache:
    """Lumina-DiMOO's ML-Cache for the image slots of a dual-cache sampler (its README, "ML-Cache").

    Keeps each image slot's last codebook logits (cond and uncond rows). After the warm-up image
    steps, to_recompute names only the (1 - ratio) least sure masked slots of each row; the pass
    computes those (each row its own: with a dual cache a row runs only its own columns), and
    image_logits() gives every other slot its cached logits. ratio 0 is off: every masked slot is
    recomputed, nothing is reused.
    """

    def __init__(self, ratio: float, image_steps: int, n_slots: int):
        self.ratio, self.n = ratio, n_slots
        self.warm = math.ceil(ML_CACHE_WARMUP * image_steps)
        self.done, self.logits = 0, {}  # "c" / "u" -> (B, N, K)

    def to_recompute(self, masked: torch.Tensor, full: bool = False) -> torch.Tensor:
        """masked (B, N) -> (B, N) bool: the image slots whose logits this step needs computed; every
        masked one during the warm-up, off, or when the pass is a full one anyway (`full`)."""
        if self.ratio == 0 or full or self.done < self.warm or "c" not in self.logits:
            return masked
        return image_slots_to_recompute(self.logits["c"], masked, self.ratio)

    def image_logits(self, c: torch.Tensor, u: torch.Tensor | None, slots: torch.Tensor,
                     want: torch.Tensor, computed: torch.Tensor | None = None) -> tuple:
        """Codebook logits (B, W, K) of the image slots `want` (W,) for c and u: those this pass computed
        (c, u (B, A, K) at image slots `slots` (A,); per row only where `computed` (B, A) is True, None:
        everywhere) as computed, the others as last computed."""
        if self.ratio == 0:  # nothing kept: the pass computed every slot wanted
            return c, u
        out = []
        for key, logits in (("c", c), ("u", u)):
            if logits is None:
                out.append(None)
                continue
            if key not in self.logits:
                self.logits[key] = logits.new_zeros(logits.shape[0], self.n, logits.shape[-1])
            if computed is None:
                self.logits[key][:, slots] = logits
            else:
                self.logits[key][:, slots] = torch.where(computed[..., None], logits, self.logits[key][:, slots])
            out.append(self.logits[key][:, want])
        self.done += 1
        return tuple(out)
