"""ParaRL math (rl/grpo.py): expected values are written out by hand, not recomputed by the formula."""
import math

import pytest
import torch

from rl.grpo import (RewardStats, entropy_from_logits, fit_reward_stats, group_advantages, k3_kl,
                     normalise_rewards, policy_loss, sparse_steps, token_weights)

LN2 = math.log(2)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(a: torch.Tensor, expected: list, tol: float = 1e-5) -> bool:
    return torch.allclose(a.float(), torch.tensor(expected, dtype=torch.float32), atol=tol)


# sparse_steps

def test_sparse_steps_are_k_distinct_sorted_in_range_and_end_with_the_last_step():
    for total in (1, 2, 3, 5, 7, 16, 30, 64):
        for first in {0, 1, total // 2, total - 1}:
            if not 0 <= first < total:
                continue
            for k in range(1, total - first + 1):
                steps = sparse_steps(total, k, _gen(total * 100 + k), first=first)
                assert len(steps) == k and len(set(steps)) == k
                assert steps == sorted(steps)
                assert steps[-1] == total - 1
                assert all(first <= s <= total - 1 for s in steps)
                if k == total - first:
                    assert steps == list(range(first, total))


def test_sparse_steps_are_stratified():
    # S=30, k=3: [0, 29) split at floor(linspace(0, 29, 3)) = [0, 14, 29] -> strata [0, 13] and [14, 28].
    lows, highs = set(), set()
    for seed in range(200):
        a, b, last = sparse_steps(30, 3, _gen(seed))
        assert 0 <= a <= 13 and 14 <= b <= 28 and last == 29
        lows.add(a)
        highs.add(b)
    assert lows == set(range(0, 14)) and highs == set(range(14, 29))  # every index of a stratum is reachable
    # first=10, S=20, k=4: [10, 19) split at 10 + floor(i*9/3) = [10, 13, 16, 19].
    for seed in range(50):
        a, b, c, last = sparse_steps(20, 4, _gen(seed), first=10)
        assert 10 <= a <= 12 and 13 <= b <= 15 and 16 <= c <= 18 and last == 19


def test_sparse_steps_determinism_k1_and_errors():
    assert sparse_steps(64, 5, _gen(7)) == sparse_steps(64, 5, _gen(7))
    assert any(sparse_steps(64, 5, _gen(7)) != sparse_steps(64, 5, _gen(s)) for s in range(8, 12))
    assert sparse_steps(30, 1, _gen()) == [29]
    assert sparse_steps(30, 1, _gen(), first=29) == [29]
    with pytest.raises(ValueError, match="k=0"):
        sparse_steps(30, 0, _gen())
    with pytest.raises(ValueError, match="k=31"):
        sparse_steps(30, 31, _gen())
    with pytest.raises(ValueError, match="k=21"):
        sparse_steps(30, 21, _gen(), first=10)


# reward normalisation

def test_normalise_rewards_by_hand():
    # mean 1, std 2, c 2: raw [-5, 1, 3, 9] -> z [-3, 0, 1, 4] -> clamped [-2, 0, 1, 2] -> (z+2)/4.
    out = normalise_rewards(torch.tensor([-5.0, 1.0, 3.0, 9.0]), RewardStats(mean=1.0, std=2.0, clip=2.0))
    assert out.dtype == torch.float32 and _close(out, [0.0, 0.5, 0.75, 1.0])
    grid = normalise_rewards(torch.tensor([[-5.0, 1.0], [3.0, 9.0]], dtype=torch.float64), RewardStats(1.0, 2.0, 2.0))
    assert grid.shape == (2, 2) and grid.dtype == torch.float32 and _close(grid, [[0.0, 0.5], [0.75, 1.0]])


def test_fit_reward_stats_and_errors():
    s = fit_reward_stats([1.0, 2.0, 3.0, 4.0], clip=2.5)
    # mean 2.5; population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25 -> std 1.1180340.
    assert s.mean == pytest.approx(2.5) and s.std == pytest.approx(1.1180340) and s.clip == 2.5
    assert fit_reward_stats(torch.tensor([0.0, 2.0])).std == pytest.approx(1.0)
    with pytest.raises(ValueError, match="std=0"):
        fit_reward_stats([0.3, 0.3, 0.3])
    with pytest.raises(ValueError, match=">= 2"):
        fit_reward_stats([0.3])
    with pytest.raises(ValueError, match="std=0"):
        RewardStats(mean=0.0, std=0.0)
    with pytest.raises(ValueError, match="clip=0"):
        RewardStats(mean=0.0, std=1.0, clip=0.0)


# advantages

def test_group_advantages_by_hand():
    # step 0: [0, .5, 1], mean .5, std sqrt(1/6) -> [-sqrt(1.5), 0, sqrt(1.5)] = [-1.2247449, 0, 1.2247449]
    # step 1: [1, 0, 0], mean 1/3, std sqrt(2/9) -> [sqrt(2), -1/sqrt(2), -1/sqrt(2)]
    rewards = torch.tensor([[[0.0, 1.0], [0.5, 0.0], [1.0, 0.0]]])  # (1, 3, 2)
    adv, zero_var = group_advantages(rewards)
    assert adv.shape == (1, 3, 2) and zero_var.shape == (1, 2)
    assert _close(adv, [[[-1.2247449, 1.4142136], [0.0, -0.7071068], [1.2247449, -0.7071068]]])
    assert not zero_var.any()


def test_group_advantages_zero_variance_and_errors():
    rewards = torch.tensor([[[0.2, 0.0]], [[0.2, 1.0]]]).permute(1, 0, 2)  # (1, 2, 2): step 0 constant
    adv, zero_var = group_advantages(rewards)
    assert zero_var.tolist() == [[True, False]]
    assert torch.equal(adv[:, :, 0], torch.zeros(1, 2)) and _close(adv[:, :, 1], [[-1.0, 1.0]])
    with pytest.raises(ValueError, match="num_samples >= 2"):
        group_advantages(torch.rand(4, 1, 3))
    with pytest.raises(ValueError, match="B, G, K"):
        group_advantages(torch.rand(4, 3))


def test_k3_kl():
    x = torch.tensor([-0.3, -2.0])
    assert torch.equal(k3_kl(x, x), torch.zeros(2))
    assert (k3_kl(x, x.flip(0)) > 0).all()
    # logp = ln .5, ref = ln .25: d = ln .5, exp(d) - d - 1 = .5 + ln 2 - 1 = 0.1931472.
    assert k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])).item() == pytest.approx(0.1931472)


# policy loss

def test_policy_loss_at_ratio_one():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv, weight = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 0.25, 1.0])
    out = policy_loss(logp, logp.detach().clone(), adv, weight)
    # -sum(w * adv) = -(0.5 - 0.5 + 0.5) = -0.5
    assert out.loss.item() == pytest.approx(-0.5) and out.pg_loss == pytest.approx(-0.5)
    assert out.clip_frac == 0.0 and out.kl == 0.0 and out.ratio_mean == pytest.approx(1.0)


def test_policy_loss_clipping_both_signs_and_gradient():
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5])
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    logp = ratio.log().requires_grad_(True)
    out = policy_loss(logp, torch.zeros(4), adv, torch.full((4,), 0.25), clip_eps=0.2)
    # surrogates: min(1.5, 1.2)=1.2 (clipped), min(-.5, -.8)=-.8 (clipped), min(-1.5, -1.2)=-1.5, min(1, 1.6)=1
    # loss = -(1.2 - 0.8 - 1.5 + 1.0) / 4 = 0.025
    assert out.loss.item() == pytest.approx(0.025, abs=1e-6) and out.pg_loss == pytest.approx(0.025, abs=1e-6)
    assert out.clip_frac == 0.5 and out.ratio_mean == pytest.approx(1.0) and out.ratio_max == pytest.approx(1.5)
    out.loss.backward()
    # clipped tokens get no gradient; unclipped: d(-w ratio A)/d logp = -w ratio A = .375 and -.25
    assert _close(logp.grad, [0.0, 0.0, 0.375, -0.25])
    # clip-higher 0.6: token 0 (1.5 < 1.6) is no longer clipped -> -(1.5 - 0.8 - 1.5 + 1.0) / 4 = -0.05
    high = policy_loss(ratio.log(), torch.zeros(4), adv, torch.full((4,), 0.25), clip_eps=0.2, clip_eps_high=0.6)
    assert high.loss.item() == pytest.approx(-0.05, abs=1e-6) and high.clip_frac == 0.25


def test_policy_loss_kl_term():
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.25)])
    adv, weight = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0])
    out = policy_loss(logp, logp, adv, weight, beta=0.1, ref_logp=ref)
    # token 0: 1 - 0.1 * 0.1931472 = 0.9806853; token 1: k3 = 0, adv 0 -> loss = -0.9806853
    assert out.loss.item() == pytest.approx(-0.9806853) and out.pg_loss == pytest.approx(-1.0)
    assert out.kl == pytest.approx(0.1931472 / 4)  # (1 * 0.1931472 + 3 * 0) / (1 + 3)
    logged = policy_loss(logp, logp, adv, weight, beta=0.0, ref_logp=ref)  # KL logged, not optimised
    assert logged.loss.item() == pytest.approx(-1.0) and logged.kl == pytest.approx(0.1931472 / 4)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, adv, weight, beta=0.1)


def test_policy_loss_shapes_and_empty():
    with pytest.raises(ValueError, match="same length"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="same length"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.1, ref_logp=torch.zeros(4))
    logp = torch.zeros(0, requires_grad=True)
    out = policy_loss(logp, torch.zeros(0), torch.zeros(0), torch.zeros(0))
    assert out.loss.item() == 0.0 and out.loss.requires_grad and out.clip_frac == 0.0
    out.loss.backward()


# token weights

def test_token_weights_by_hand():
    # 2 rollouts, K=2, text_weight 1, image_weight 0.5; each weight = modality_weight / cell_count / 2.
    #   r0 s0: 2 text -> 1/2/2 = .25 each; 1 image -> .5/1/2 = .25
    #   r0 s1: 1 text -> 1/1/2 = .5;       no image
    #   r1 s0: no text;                    4 image -> .5/4/2 = .0625 each
    #   r1 s1: 2 text -> .25 each;         1 image -> .25
    rollout = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0, 1, 1, 1])
    step = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1])
    image = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    w = token_weights(rollout, step, image, num_rollouts=2, image_weight=0.5, text_weight=1.0)
    assert w.dtype == torch.float32
    assert _close(w, [0.25, 0.0625, 0.25, 0.0625, 0.5, 0.25, 0.0625, 0.25, 0.0625, 0.25, 0.25])
    assert w.sum().item() == pytest.approx(2.25)  # cells present: r0 (1 + .5 + 1) + r1 (.5 + 1 + .5), / 2


def test_token_weights_sum_per_rollout_and_errors():
    g = _gen(3)
    n, rollouts, k = 400, 3, 4
    rollout, step = torch.randint(0, rollouts, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    image = torch.rand(n, generator=g) < 0.7
    w = token_weights(rollout, step, image, num_rollouts=rollouts, image_weight=0.1, text_weight=1.0)
    cells = torch.stack([rollout, step, image.long()], 1).unique(dim=0)
    assert len(cells) == rollouts * k * 2  # every cell non-empty
    for r in range(rollouts):  # K * (text_weight + image_weight) / num_rollouts = 4 * 1.1 / 3
        assert w[rollout == r].sum().item() == pytest.approx(4 * 1.1 / 3, rel=1e-5)
    with pytest.raises(ValueError, match="num_rollouts"):
        token_weights(rollout, step, image, num_rollouts=2)
    with pytest.raises(ValueError, match="same length"):
        token_weights(rollout, step[:-1], image, num_rollouts=rollouts)


def test_entropy_from_logits():
    assert entropy_from_logits(torch.zeros(2, 7)).tolist() == pytest.approx([math.log(7)] * 2)
    assert entropy_from_logits(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    half = entropy_from_logits(torch.tensor([0.0, 0.0, -math.inf], dtype=torch.bfloat16))
    assert half.dtype == torch.float32 and half.item() == pytest.approx(LN2)


# credit_pairs (rl/learner.py): which replayed steps carry which sampled step's advantage

def test_credit_pairs_step_and_window_by_hand():
    from rl.learner import credit_pairs

    zero = torch.tensor([[False, False, False], [False, True, False]])  # (R=2, K=3)
    assert credit_pairs([2, 5, 7], zero, "step") == [(0, 2, 0), (0, 5, 1), (0, 7, 2), (1, 2, 0), (1, 7, 2)]
    got = credit_pairs([2, 5, 7], zero, "window")
    # windows (-1, 2], (2, 5], (5, 7]: every step of the timeline once; row 1 loses window 1 only
    assert got[:8] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 1), (0, 4, 1), (0, 5, 1), (0, 6, 2), (0, 7, 2)]
    assert got[8:] == [(1, 0, 0), (1, 1, 0), (1, 2, 0), (1, 6, 2), (1, 7, 2)]
    assert credit_pairs([2, 5, 7], torch.ones(2, 3, dtype=torch.bool), "window") == []
