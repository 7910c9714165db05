"""The ParaRL learner: RLConfig, rewards -> advantages, and one round's policy update.

A round's rollouts arrive as arrays (rl/rollout.py): final tokens, step_map and behaviour
log-probs, plus raw rewards at the K sampled steps. `advantages` normalises them (rl/grpo) and
standardises each step over its group; in "output" mode (the paper's Table 4 ablation) the final
step's advantage is credited to every sampled step instead, so both modes replay the same steps
and differ only in where the reward is taken. `update` runs `inner_iters` optimiser steps over
the same rollouts; each replays the state before every (rollout, step) pair credited by a sampled
step whose group had reward variance (`credit_pairs`, rl/replay.py), scores the tokens decoded
at that step with the sampled step's advantage and minimises the
clipped-ratio surrogate minus beta * KL to the frozen reference policy (rl/grpo.policy_loss).
No Ray, no IO: rl/loop.py feeds it. Shapes: R rollouts (B prompts x G), K sampled steps, M output.
"""
from dataclasses import asdict, dataclass

import torch

from model.layout import OutputShape
from model.sampling import SamplerConfig
from model.tokens import Vocab
from rl.grpo import RewardStats, entropy_from_logits, group_advantages, normalise_rewards, policy_loss, token_weights
from rl.replay import image_slots, replay_logprobs

TOY_REWARDS = ("exact", "graded")
"""Rewards scored from toy-world facts (rl.reward.toy_agreement): toy datasets only."""
REWARDS = ("clip", *TOY_REWARDS)
MODES = ("trajectory", "output")
CREDITS = ("window", "step")


@dataclass(frozen=True)
class RLConfig:
    """ParaRL settings. The paper publishes K = 3 only; every other value is ours (logged per run)."""

    rounds: int = 30
    """Rollout -> reward -> update rounds."""
    prompts_per_round: int = 16
    """B: training prompts drawn per round (seeded by (seed, round))."""
    group_size: int = 8
    """G: samples per prompt; advantages are standardised over them."""
    sampled_steps: int = 3
    """K: denoising steps rewarded per rollout (paper Table 5: 3 is best). The last step is always one."""
    reward_mode: str = "trajectory"
    """trajectory: reward each sampled step's partial output; output: the final output's reward only (Table 4)."""
    credit: str = "window"
    """Tokens a sampled step's advantage applies to. step: only those decoded *at* s_k (the paper's
    Eq. 3 read literally; about K/S of the output gets a gradient). window: every token decoded in
    (s_{k-1}, s_k], each replayed at its own step: the change the step's reward observed. Costs S
    instead of K replayed states per rollout; on the toy world only window learns (benchmarks/pararl.py)."""
    reward: str = "clip"
    """clip: CLIP text-image similarity (open_clip); exact: toy-world agreement of stated and shown facts;
    graded: the same with partial credit for a nearly right object (colour, shape, row / column distance)."""
    reward_clip: float = 3.0
    """c: standardised rewards are clipped to [-c, c] and scaled to [0, 1]."""
    norm_fraction: float = 0.01
    """Share of the training prompts sampled once to fit the reward mean / std (paper: 1%)."""
    norm_min_prompts: int = 64
    """Lower bound on that sample (1% of a small set is too few)."""
    clip_eps: float = 0.2
    """PPO ratio clip (verl / dLLM-RL default)."""
    beta: float = 0.01
    """Weight of the k3 KL to the reference (the starting checkpoint), as dLLM-RL; 0 drops it."""
    lr: float = 1e-4
    """AdamW learning rate (constant). The tiny toy model needs ~1e-4; 8B full fine-tuning ~1e-6."""
    inner_iters: int = 2
    """Passes over the same rollouts per round (mu in GRPO; d1 uses more with LoRA)."""
    minibatches: int = 1
    """Optimiser steps per pass: the credited (rollout, step) pairs are cut into this many contiguous
    mini-batches (verl's ppo_mini_batch_size, TRL's steps_per_generation), each scaled to the full
    batch's gradient size. inner_iters * minibatches updates per round."""
    clip_norm: float = 1.0
    """Max gradient norm."""
    text_weight: float = 1.0
    """Weight of a step's text tokens (their mean) in the per-step objective."""
    image_weight: float = 1.0
    """Weight of a step's image tokens (their mean); UniGRPO scaled image log-probs by 0.1."""
    text_temperature: float = 1.0
    """Rollout text temperature (> 0 so group members differ); also the policy's temperature."""
    image_temperature: float = 1.0
    """Rollout image temperature; also the policy's temperature."""
    first_step_frac: float = 0.25
    """Sampled steps start at floor(S * this): the image starts decoding at S // 4."""
    micro_batch: int = 96
    """(rollout, step) states per learner forward pass."""
    seed: int = 0
    """Seeds prompt choice, sampled steps and rollouts."""
    eval_every: int = 5
    """Rounds between held-out evaluations (and the last round)."""
    checkpoint_every: int = 5
    """Rounds between checkpoints (and the last round)."""

    def __post_init__(self):
        if self.reward not in REWARDS or self.reward_mode not in MODES or self.credit not in CREDITS:
            raise ValueError(f"RLConfig.reward={self.reward!r} / reward_mode={self.reward_mode!r} / "
                             f"credit={self.credit!r}; choose reward from {REWARDS}, reward_mode from {MODES} "
                             f"and credit from {CREDITS}")
        if self.group_size < 2:
            raise ValueError(f"RLConfig.group_size={self.group_size}: GRPO needs >= 2 samples per prompt")
        for name in ("rounds", "prompts_per_round", "sampled_steps", "inner_iters", "minibatches", "micro_batch",
                     "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)} must be >= 1")
        if self.text_temperature <= 0 or self.image_temperature <= 0:
            raise ValueError(f"RLConfig temperatures ({self.text_temperature}, {self.image_temperature}) must be "
                             f"> 0: a greedy sampler gives identical group members and no log-probs")

    def to_dict(self) -> dict:
        return asdict(self)

    def rollout_sampler(self, base: SamplerConfig) -> SamplerConfig:
        """The evaluation sampler with RL temperatures, jitter and no guidance."""
        return SamplerConfig(**{**asdict(base), "text_temperature": self.text_temperature,
                                "image_temperature": self.image_temperature, "text_cfg": 0.0, "image_cfg": 0.0})

    def first_step(self, steps: int) -> int:
        return min(int(steps * self.first_step_frac), steps - self.sampled_steps)


def advantages(raw: torch.Tensor, stats: RewardStats, group_size: int, mode: str):
    """Raw rewards (R, K) -> normalised rewards (R, K), advantages (R, K), zero_var (R, K) bool.

    Rows are prompt-major (row = b * G + g). In output mode every step gets the final step's
    advantage (and zero-variance flag).
    """
    R, K = raw.shape
    reward = normalise_rewards(raw, stats)  # (R, K)
    adv, zero = group_advantages(reward.view(R // group_size, group_size, K))  # (B, G, K), (B, K)
    zero = zero[:, None, :].expand(-1, group_size, -1)
    adv, zero = adv.reshape(R, K), zero.reshape(R, K)
    if mode == "output":
        adv, zero = adv[:, -1:].expand(R, K).clone(), zero[:, -1:].expand(R, K).clone()
    return reward, adv, zero


@dataclass
class Rollouts:
    """One round's rollouts as the learner needs them (tensors on the learner's device)."""

    prompts: list[list[int]]
    """R prompt id lists (each prompt repeated G times)."""
    tokens: torch.Tensor
    """(R, M) final output parts."""
    step_map: torch.Tensor
    """(R, M) step at which each slot was decoded."""
    logp: torch.Tensor
    """(R, M) behaviour log-probs at the sampled steps."""
    steps: list[int]
    """The K sampled steps."""
    adv: torch.Tensor
    """(R, K) advantages."""
    zero_var: torch.Tensor
    """(R, K) bool: dropped pairs."""


def update(policy, ref, optimizer, batch: Rollouts, cfg: RLConfig, vocab: Vocab, shape: OutputShape,
           sampler: SamplerConfig, rank: int = 0, world: int = 1, sharded: bool = False) -> dict:
    """cfg.inner_iters passes of cfg.minibatches optimiser steps each on one round's rollouts.
    Returns loss statistics averaged over passes (grad norm and entropy: over optimiser steps).

    Data parallel (world > 1, a torch.distributed group is up; rl/learner_group.py): every rank
    holds the same weights and replays every world-th pair of each mini-batch; the token weights are
    global, so the summed gradients (one all-reduce per optimiser step) are the full mini-batch's
    and every rank takes the same step. Statistics are reduced the same way. sharded: the policy is
    FSDP2-sharded, whose backward averages the gradients over ranks (so the loss is scaled by world
    to make that the sum; gloo has no pre-multiplied reduce-scatter to set a divide factor); every
    rank then runs the same number of micro-batches (a rank short of pairs replays one at weight 0),
    since each forward and backward is a collective.
    """
    R, K = batch.adv.shape
    pairs = credit_pairs(batch.steps, batch.zero_var, cfg.credit)
    is_img = image_slots(shape, batch.tokens.device)
    stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_max": 0.0, "entropy": 0.0,
             "grad_norm": 0.0, "learner_tokens": 0, "pairs": len(pairs)}
    if not pairs:
        return stats
    stats["kl_weight"] = 0.0
    weights, offsets = _weights(batch, pairs, is_img, cfg)  # per credited token, in pair order; (P + 1,)
    shares = [sorted(i for mini in _split(len(pairs), cfg.minibatches) for i in list(mini)[r::world])
              for r in range(world)]  # every rank's pairs: a sharded reference runs the longest share's passes
    chunks = max(-(-len(s) // cfg.micro_batch) for s in shares) if sharded else None
    ref_logp = _reference_logprobs(ref, batch, pairs, shares[rank], cfg, vocab, shape, sampler, chunks) \
        if cfg.beta > 0 else None
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    n_updates = cfg.inner_iters * min(cfg.minibatches, len(pairs))
    for _ in range(cfg.inner_iters):
        for mini in _split(len(pairs), cfg.minibatches):
            optimizer.zero_grad(set_to_none=True)
            ent_mini = torch.zeros(2, dtype=torch.float64)  # entropy sum, credited tokens
            own = list(mini)[rank::world]
            for start in range(0, -(-len(mini) // world), cfg.micro_batch):  # rank 0's count on every rank
                idx = own[start:start + cfg.micro_batch]
                if not idx:  # nothing left here: keep step with the other ranks' collectives, add nothing
                    _idle_pass(policy, batch, pairs[mini.start], vocab, shape, sampler)
                    continue
                rows, steps, slots = (torch.tensor(c) for c in zip(*[pairs[i] for i in idx]))
                logp, credited, logits = replay_logprobs(policy, [batch.prompts[r] for r in rows.tolist()],
                                                         batch.tokens[rows], batch.step_map[rows], steps, vocab,
                                                         shape, sampler, return_logits=True)
                p_idx, m_idx = credited.nonzero(as_tuple=True)  # (N,), (N,)
                weight = torch.cat([weights[offsets[i]:offsets[i + 1]] for i in idx]).to(logp.device)
                weight = weight * (len(pairs) / len(mini))
                ref_tok = None if ref_logp is None else torch.stack([ref_logp[i] for i in idx])[p_idx, m_idx]
                out = policy_loss(logp[p_idx, m_idx], batch.logp[rows][p_idx, m_idx], batch.adv[rows, slots][p_idx],
                                  weight, cfg.clip_eps, cfg.beta, ref_tok)
                (out.loss * world if sharded else out.loss).backward()
                with torch.no_grad():
                    ent_mini[0] += float(_entropy(logits, is_img[m_idx], vocab, sampler).sum())  # (N, V) credited
                ent_mini[1] += len(p_idx)
                stats["learner_tokens"] += len(p_idx)
                stats["clip_frac"] += out.clip_frac * len(p_idx) / cfg.inner_iters
                stats["kl"] += out.kl * float(weight.sum()) / cfg.inner_iters  # kl: a weighted mean within the chunk
                stats["kl_weight"] += float(weight.sum()) / cfg.inner_iters
                # the mini-batch's share of the full-batch loss, averaged over passes
                stats["pg_loss"] += out.pg_loss * len(mini) / len(pairs) / cfg.inner_iters
                stats["loss"] += float(out.loss.detach()) * len(mini) / len(pairs) / cfg.inner_iters
                stats["ratio_max"] = max(stats["ratio_max"], out.ratio_max)
            if world > 1:
                if not sharded:
                    _all_reduce_grads(params)
                ent_mini = _all_reduce(ent_mini)
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.clip_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor when sharded
            optimizer.step()
            stats["grad_norm"] += float(norm) / n_updates
            stats["entropy"] += float(ent_mini[0] / max(ent_mini[1], 1)) / n_updates
    if world > 1:
        summed = _all_reduce(torch.tensor([stats[k] for k in SUMMED], dtype=torch.float64))
        stats.update({k: float(v) for k, v in zip(SUMMED, summed.tolist())})
        stats["ratio_max"] = float(_all_reduce(torch.tensor([stats["ratio_max"]], dtype=torch.float64), "max"))
    stats["learner_tokens"] = int(stats["learner_tokens"])
    # means over every credited token of a pass, whatever the micro-batches: KL weighted as the loss weighs
    # tokens, the clipped share per token
    stats["kl"] /= max(stats.pop("kl_weight"), 1e-12)
    stats["clip_frac"] /= max(stats["learner_tokens"] / cfg.inner_iters, 1)
    return stats


SUMMED = ("loss", "pg_loss", "kl", "kl_weight", "clip_frac", "learner_tokens")  # reduced over ranks by summing


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """x summed (or maxed) over the process group, on the group's device; returned on the CPU."""
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    y = x.to(dev)
    dist.all_reduce(y, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return y.cpu()


def _idle_pass(policy, batch: Rollouts, pair: tuple, vocab, shape, sampler) -> None:
    """One replay forward and a zero backward: the collectives of a sharded policy, no gradient."""
    r, step, _ = pair
    _, _, logits = replay_logprobs(policy, [batch.prompts[r]], batch.tokens[[r]], batch.step_map[[r]],
                                   torch.tensor([step]), vocab, shape, sampler, return_logits=True)
    (logits.float().sum() * 0.0).backward()  # raw logits are finite (masked log-probs may be -inf)


def _all_reduce_grads(params: list) -> None:
    """Sums every gradient over the group in one flat buffer (a rank without pairs in a mini-batch adds zeros)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def _split(n: int, parts: int) -> list[range]:
    """n items cut into min(parts, n) contiguous ranges of near-equal size."""
    bounds = torch.linspace(0, n, min(parts, n) + 1).round().long().tolist()
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _weights(batch: Rollouts, pairs, is_img: torch.Tensor, cfg: RLConfig) -> tuple[torch.Tensor, list[int]]:
    """token_weights over every credited token of every pair (a window spans micro-batches), and the
    offsets of each pair's tokens in it (pair i: weights[offsets[i]:offsets[i + 1]])."""
    P = torch.tensor(pairs)  # (P, 3): rollout, step, k
    credited = batch.step_map[P[:, 0]].cpu() == P[:, 1, None]  # (P, M)
    p_idx, m_idx = credited.nonzero(as_tuple=True)
    offsets = [0] + credited.sum(1).cumsum(0).tolist()
    return token_weights(P[p_idx, 0], P[p_idx, 2], is_img.cpu()[m_idx], len(batch.prompts),
                         cfg.image_weight, cfg.text_weight), offsets


def credit_pairs(steps: list[int], zero_var: torch.Tensor, credit: str) -> list[tuple[int, int, int]]:
    """(rollout, replayed step, sampled-step index k) triples the update replays.

    step: the K sampled steps. window: every step in (s_{k-1}, s_k] (s_{-1} = -1), each carrying
    sampled step k's advantage. Pairs of zero-variance (rollout, k) groups are dropped.
    """
    R, K = zero_var.shape
    windows = [[s] for s in steps] if credit == "step" else \
        [list(range(prev + 1, s + 1)) for prev, s in zip([-1] + list(steps[:-1]), steps)]
    return [(r, s, k) for r in range(R) for k in range(K) if not zero_var[r, k] for s in windows[k]]


@torch.no_grad()
def _reference_logprobs(ref, batch: Rollouts, pairs, mine: list[int], cfg: RLConfig, vocab, shape,
                        sampler, chunks: int | None = None) -> dict[int, torch.Tensor]:
    """Reference-policy log-probs (M,) of the pairs this rank replays, by pair index.
    chunks: forward passes to run (FSDP2-sharded reference: each is a collective, so every rank runs
    as many; a rank out of pairs replays pair 0 and drops it); None = as many as `mine` needs."""
    out = {}
    for c in range(-(-len(mine) // cfg.micro_batch) if chunks is None else chunks):
        idx = mine[c * cfg.micro_batch:(c + 1) * cfg.micro_batch]
        rows, steps, _ = (torch.tensor(col) for col in zip(*[pairs[i] for i in (idx or [0])]))
        logp, _ = replay_logprobs(ref, [batch.prompts[r] for r in rows.tolist()], batch.tokens[rows],
                                  batch.step_map[rows], steps, vocab, shape, sampler)
        out.update(zip(idx, logp))
    return out


def _entropy(logits: torch.Tensor, is_img: torch.Tensor, vocab: Vocab, sampler: SamplerConfig) -> torch.Tensor:
    """Entropy of the sampler's distribution at credited tokens. logits (N, V), is_img (N,) -> (N,)."""
    from model.sampling import text_logits

    out = torch.zeros(len(logits))
    sl = slice(vocab.image_offset, vocab.image_offset + vocab.codebook_size)
    if (~is_img).any():
        out[~is_img.cpu()] = entropy_from_logits(text_logits(logits[~is_img], vocab) / sampler.text_temperature).cpu()
    if is_img.any():
        out[is_img.cpu()] = entropy_from_logits(logits[is_img][:, sl] / sampler.image_temperature).cpu()
    return out

