"""The pure math of ParaRL: sparse step choice, reward normalisation, group advantages, the loss.

MMaDA-Parallel (paper §4, "ParaRL") rewards the partial outputs of a denoising trajectory at a
few sampled steps, not only the final one. Per rollout batch K of the S steps are fixed in
advance (`sparse_steps`); a step's CLIP text-image score is normalised with statistics fitted
once on ~1% of the training data (`RewardStats`), standardised over the G samples of a prompt
(`group_advantages`, GRPO: Shao et al. 2024, DeepSeekMath) and credited to the tokens decoded
AT that step through a clipped token-level ratio surrogate minus beta * KL to a reference policy
(`policy_loss`, PPO: Schulman et al. 2017; k3 KL estimator: Schulman 2020 "Approximating KL
divergence"), summed over the sampled steps with the weights of `token_weights`.
Left out: rollouts, log-prob evaluation of the model, reward scoring and the optimiser; this
file only turns tensors into tensors. Shapes: B prompts, G samples per prompt, K sampled steps,
N credited tokens, V vocabulary.
"""
import math
from dataclasses import dataclass

import torch


def sparse_steps(total_steps: int, k: int, generator: torch.Generator, first: int = 0) -> list[int]:
    """Picks the K denoising steps whose partial outputs are rewarded (paper §4, sparse steps).

    The last step `total_steps - 1` is always included. The other k-1 are stratified: the
    n = total_steps-1-first indices [first, total_steps-1) are split into k-1 strata at the
    boundaries first + floor(i*n/(k-1)) (floor of linspace, computed in exact integer
    arithmetic) and one index is drawn uniformly in each. Since k-1 <= n every stratum holds
    at least one index and strata are disjoint, so the k indices are always distinct; with
    k == total_steps - first every stratum is a single index and every step comes back.

    Args:
        total_steps: S, number of denoising steps of a rollout.
        k: number of steps to reward, 1 <= k <= total_steps - first.
        generator: source of randomness (same seed, same steps).
        first: smallest step index that may be picked.

    Returns:
        k distinct step indices in [first, total_steps-1], sorted ascending.
    """
    if first < 0 or first >= total_steps:
        raise ValueError(f"first={first} with total_steps={total_steps}: need 0 <= first < total_steps")
    if not 1 <= k <= total_steps - first:
        raise ValueError(f"k={k} with total_steps={total_steps}, first={first}: need "
                         f"1 <= k <= total_steps - first = {total_steps - first}; lower k or raise total_steps")
    n, strata = total_steps - 1 - first, k - 1
    bounds = [first + (i * n) // strata for i in range(strata + 1)] if strata else []
    picks = [int(torch.randint(lo, hi, (1,), generator=generator)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return picks + [total_steps - 1]


@dataclass(frozen=True)
class RewardStats:
    """Statistics of raw reward scores, fitted once on a random ~1% of the training prompts."""

    mean: float
    """Mean of the raw scores of the estimation sample."""
    std: float
    """Population standard deviation of the raw scores; must be > 0."""
    clip: float = 3.0
    """c: standardised scores are clipped to [-c, c] before scaling to [0, 1]; must be > 0."""

    def __post_init__(self):
        if not math.isfinite(self.mean):
            raise ValueError(f"mean={self.mean}: the reward statistics must be finite; refit on valid scores")
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"std={self.std}: the reward model gives the same score to every pair in the "
                             f"estimation sample (or scores are not finite); use more/varied samples")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip={self.clip}: the clip range [-c, c] needs c > 0; use e.g. clip=3.0")


def fit_reward_stats(scores: torch.Tensor | list[float], clip: float = 3.0) -> RewardStats:
    """Mean and population std (unbiased=False) of raw reward scores, as `RewardStats`."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if s.numel() < 2:
        raise ValueError(f"{s.numel()} scores: fitting reward statistics needs >= 2; score more pairs")
    std = 0.0 if s.max() == s.min() else s.std(correction=0).item()  # exact 0, not a rounding residue
    return RewardStats(mean=s.mean().item(), std=std, clip=clip)


def normalise_rewards(raw: torch.Tensor, stats: RewardStats) -> torch.Tensor:
    """Standardise, clip to [-c, c], scale linearly to [0, 1]. Any shape in, same shape out (float32)."""
    c = stats.clip
    z = ((raw.double() - stats.mean) / stats.std).clamp(-c, c)
    return ((z + c) / (2 * c)).float()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages: each step's reward standardised over the G samples of its prompt.

    Args:
        rewards: (B, G, K) normalised rewards.
        eps: groups whose population std is <= eps carry no signal.

    Returns:
        advantages (B, G, K), exactly 0 in zero-variance groups, and zero_var (B, K) bool.
    """
    if rewards.dim() != 3:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}: need (B, G, K); add missing axes")
    if rewards.shape[1] < 2:
        raise ValueError(f"G={rewards.shape[1]}: a group of 1 sample has no relative advantage; "
                         f"use num_samples >= 2")
    r = rewards.float()
    mean = r.mean(dim=1, keepdim=True)  # (B, 1, K)
    std = r.std(dim=1, correction=0, keepdim=True)  # (B, 1, K)
    zero_var = std <= eps  # (B, 1, K)
    adv = torch.where(zero_var, torch.zeros_like(r), (r - mean) / std.clamp_min(eps))  # (B, G, K)
    return adv, zero_var.squeeze(1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(d) - d - 1 with d = ref_logp - logp (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class PolicyLoss:
    """The ParaRL loss and its detached parts for logging."""

    loss: torch.Tensor
    """Scalar to minimise: -sum(weight * (surrogate - beta * k3)), differentiable in logp."""
    pg_loss: float
    """-sum(weight * surrogate), the policy-gradient part."""
    kl: float
    """Weighted mean of the k3 KL over tokens (0 without a reference)."""
    clip_frac: float
    """Fraction of tokens (unweighted) where the clipped branch of the surrogate is active."""
    ratio_mean: float
    """Unweighted mean of pi/pi_old over tokens."""
    ratio_max: float
    """Largest pi/pi_old over tokens."""


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
                clip_eps: float = 0.2, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
                clip_eps_high: float | None = None) -> PolicyLoss:
    """Diffusion GRPO objective over the tokens decoded at the sampled steps (paper §4, eq. ParaRL).

    Each credited token is one decoded at a sampled step, scored given the full history before
    that step. ratio = exp(logp - old_logp); surrogate = min(ratio*A, clamp(ratio, 1-eps,
    1+eps_high)*A) (PPO; eps_high > eps is DAPO's clip-higher); objective = surrogate - beta*k3.

    Args:
        logp: (N,) log-probs of the decoded tokens under the current policy (with grad).
        old_logp: (N,) log-probs under the rollout policy (no grad).
        adv: (N,) advantage of each token's (rollout, step).
        weight: (N,) normalisation weights from `token_weights`; the loss is a weighted SUM.
        clip_eps: lower (and default upper) clip range.
        beta: KL coefficient; > 0 needs ref_logp.
        ref_logp: (N,) log-probs under the reference policy, or None.
        clip_eps_high: upper clip range, or None for clip_eps.

    Returns:
        `PolicyLoss` with the differentiable scalar loss and detached floats.
    """
    named = {"logp": logp, "old_logp": old_logp, "adv": adv, "weight": weight}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    shapes = {k: tuple(v.shape) for k, v in named.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"shapes {shapes}: all inputs must be 1-D of the same length N (credited tokens)")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference-policy log-probs); pass it or set beta=0")
    if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
        raise ValueError(f"clip_eps={clip_eps}, clip_eps_high={clip_eps_high}: clip ranges must be > 0")
    if logp.numel() == 0:
        return PolicyLoss(loss=logp.sum() * 0, pg_loss=0.0, kl=0.0, clip_frac=0.0, ratio_mean=0.0, ratio_max=0.0)
    lo, hi = 1 - clip_eps, 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    adv, weight = adv.detach().float(), weight.detach().float()
    ratio = torch.exp(logp.float() - old_logp.detach().float())  # (N,)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)  # (N,)
    objective = surrogate
    kl = 0.0
    if ref_logp is not None:
        k3 = k3_kl(logp.float(), ref_logp.detach().float())  # (N,)
        kl = ((weight * k3).sum() / weight.sum().clamp_min(1e-12)).item()
        if beta > 0:
            objective = surrogate - beta * k3
    clipped = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))  # (N,)
    return PolicyLoss(loss=-(weight * objective).sum(), pg_loss=-(weight * surrogate).sum().item(), kl=kl,
                      clip_frac=clipped.float().mean().item(), ratio_mean=ratio.mean().item(),
                      ratio_max=ratio.max().item())


def token_weights(rollout: torch.Tensor, step: torch.Tensor, is_image: torch.Tensor, num_rollouts: int,
                  image_weight: float = 1.0, text_weight: float = 1.0) -> torch.Tensor:
    """Per-token loss weights that balance modalities within a step ("balance" normalisation).

    Within a (rollout, step, modality) cell every token gets modality_weight / count_in_cell, so
    text and image each contribute a per-token mean (1024 image tokens do not drown 256 text
    tokens); a step's term is the sum of its two modality means, the terms are summed over the
    sampled steps (as the paper sums over them) and averaged over rollouts (/ num_rollouts).
    The alternative is a pooled token mean with image log-probs scaled down, as UniGRPO in
    MMaDA (Yang et al. 2025) does with its 0.1x image factor; pass image_weight to approximate it.

    Args:
        rollout: (N,) long, rollout index in [0, num_rollouts).
        step: (N,) long, index of the sampled step slot in [0, K).
        is_image: (N,) bool, True for image tokens.
        num_rollouts: number of rollouts in the batch (B*G), the averaging denominator.
        image_weight: weight of a step's image mean.
        text_weight: weight of a step's text mean.

    Returns:
        (N,) float32 weights.
    """
    if num_rollouts < 1:
        raise ValueError(f"num_rollouts={num_rollouts}: need >= 1 (the number of rollouts, B*G)")
    if not (rollout.dim() == step.dim() == is_image.dim() == 1 and len(rollout) == len(step) == len(is_image)):
        raise ValueError(f"rollout {tuple(rollout.shape)}, step {tuple(step.shape)}, is_image "
                         f"{tuple(is_image.shape)}: all must be 1-D of the same length N")
    if rollout.numel() == 0:
        return torch.zeros(0)
    if rollout.min() < 0 or rollout.max() >= num_rollouts:
        raise ValueError(f"rollout indices span [{rollout.min()}, {rollout.max()}]: need [0, {num_rollouts}); "
                         f"pass the right num_rollouts")
    if step.min() < 0:
        raise ValueError(f"step index {step.min()} < 0: pass the slot k in [0, K), not the denoising step")
    num_steps = int(step.max()) + 1
    cell = (rollout.long() * num_steps + step.long()) * 2 + is_image.long()  # (N,)
    count = torch.bincount(cell, minlength=num_rollouts * num_steps * 2).float()  # (R*K*2,)
    modality = torch.where(is_image, torch.tensor(float(image_weight)), torch.tensor(float(text_weight)))  # (N,)
    return modality / count[cell] / num_rollouts


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits), computed stably in float32. (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    return -(logp.exp() * logp.clamp_min(torch.finfo(torch.float32).min)).sum(dim=-1)
