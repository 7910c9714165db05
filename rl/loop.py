"""Ray at the edge of ParaRL: actor pools, one round's rollouts and rewards, weight hand-off.

`Roles` starts the rollout actors (rl/rollout.RolloutWorker) and reward actors
(rl/reward.RewardWorker) with restarts and method retries: a killed actor is restarted by Ray and
its lost call is re-run; every call carries the weights reference, version and seed it needs, so
the redone work is identical and nothing is lost or duplicated. `collect` fans a round's prompts
out to the rollout actors and, as each rollout chunk finishes (`ray.wait`), sends its partial
(image, text) pairs to the reward actors, so scoring overlaps the remaining sampling.
Weights go out once per update: `ray.put(state_dict)` puts one copy in the object store and
every actor reads that same object (no per-actor copies); a learner group's rank 0 puts its
weights there itself (`use`), so they do not pass through the driver. On a multi-node GPU cluster
this put would become a broadcast over a NCCL group from learner rank 0 to the rollout actors
(ray.util.collective or torch.distributed, as verl's checkpoint engine and OpenRLHF do), with
the version number kept as the staleness check.
"""
import time

import numpy as np


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2 ** 62)
    return h


class Roles:
    """The rollout and reward actor pools of one RL run."""

    def __init__(self, checkpoint: str, shape, reward_kwargs: dict, rollout_workers: int = 1,
                 reward_workers: int = 1, use_gpu: bool = False, reward_gpu_fraction: float = 0.25,
                 crash_markers: dict | None = None, max_restarts: int = 3):
        import ray

        from rl.reward import RewardWorker
        from rl.rollout import RolloutWorker

        crash = crash_markers or {}
        # a call lost with its actor is retried while the actor can come back (-1): after a node dies Ray takes a
        # while to notice, and a few quick retries ran out first; once max_restarts is spent it still fails
        opts = dict(max_restarts=max_restarts, max_task_retries=-1)
        rollout_cls = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, **opts)(RolloutWorker)
        reward_cls = ray.remote(num_cpus=0 if use_gpu else 1, num_gpus=reward_gpu_fraction if use_gpu else 0,
                                **opts)(RewardWorker)
        device = "cuda" if use_gpu else "cpu"
        self.rollout = [rollout_cls.remote(checkpoint, shape, device=device, crash_marker=crash.get("rollout"))
                        for _ in range(rollout_workers)]
        self.reward = [reward_cls.remote(**reward_kwargs, device=device, crash_marker=crash.get("reward"))
                       for _ in range(reward_workers)]
        self.weights_ref, self.version = None, -1

    def publish(self, state_dict: dict, version: int) -> None:
        """One object-store copy of the learner's weights for every rollout actor."""
        import ray

        self.weights_ref = ray.put({k: v.detach().cpu() for k, v in state_dict.items()})
        self.version = version

    def use(self, weights_ref, version: int) -> None:
        """Weights already in the object store (a learner group's rank 0 put them there) for every rollout actor."""
        self.weights_ref, self.version = weights_ref, version

    def shutdown(self) -> None:
        import ray

        for a in self.rollout + self.reward:
            ray.kill(a)

    def collect(self, prompts: list[list[int]], group_size: int, sampler: dict, steps: list[int], seed: int,
                round_: int, reward_batch: int = 256) -> dict:
        """Samples G trajectories for every prompt and scores each sampled step's partial pair.

        Prompts are split into one contiguous chunk per rollout actor (chunk seeds depend only
        on (seed, round, chunk)). Returns the rollout arrays concatenated in prompt order plus
        raw rewards (R, K) and timings: rollout_s (wall time until the last rollout), reward_s
        (busy time of reward calls), wall_s.
        """
        import ray

        t0 = time.perf_counter()
        n = len(self.rollout)
        bounds = np.linspace(0, len(prompts), n + 1).round().astype(int)
        chunks = [(i, prompts[a:b]) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
        pending = {self.rollout[i % n].sample.remote(self.weights_ref, self.version, chunk, group_size, sampler,
                                                     steps, _seed(seed, round_, i)): i for i, chunk in chunks}
        results, scores, stats, rollout_s, busy = {}, {}, [], 0.0, 0.0
        score_refs, turn = {}, 0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            rollout_s = time.perf_counter() - t0
            images = results[i]["images"].reshape(-1, *results[i]["images"].shape[2:])
            texts = [t for row in results[i]["texts"] for t in row]
            for s in range(0, len(texts), reward_batch):
                ref = self.reward[turn % len(self.reward)].score.remote(list(images[s:s + reward_batch]),
                                                                        texts[s:s + reward_batch])
                score_refs[ref] = (i, s)
                turn += 1
        for ref, (i, s) in score_refs.items():
            out = ray.get(ref)
            scores[(i, s)] = out["scores"]
            stats.append(out["stats"])
            busy += out["stats"].get("seconds", 0.0)
        order = sorted(results)
        merged = {k: np.concatenate([results[i][k] for i in order]) for k in
                  ("tokens", "step_map", "logp", "image_codes", "text_ids")}
        merged["texts"] = [row for i in order for row in results[i]["texts"]]
        raw = [x for i in order for key in sorted(scores) if key[0] == i for x in scores[key]]
        merged["raw"] = np.asarray(raw, dtype=np.float64).reshape(len(merged["tokens"]), len(steps))
        pairs = sum(s.get("pairs", 0) for s in stats)
        merged["timing"] = {"rollout_s": rollout_s, "reward_s": busy, "wall_s": time.perf_counter() - t0,
                            "rollout_busy_s": sum(r["seconds"] for r in results.values()), "reward_pairs": pairs,
                            "text_split_rate": sum(s.get("split_texts", 0) for s in stats) / max(pairs, 1)}
        return merged
