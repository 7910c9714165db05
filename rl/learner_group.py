"""A data-parallel ParaRL learner group on Ray: N learner actors, one torch.distributed group.

Every `LearnerWorker` loads the same policy (the start or resumed checkpoint), reference policy and
optimiser state, joins a process group (gloo on CPU, NCCL on GPUs; rank 0's node address and a free
port are the rendezvous) and runs rl/learner.update on its share of each mini-batch: the gradient
all-reduce makes every rank take the identical step, so the group behaves as one learner over the
whole batch (tests/test_pararl checks the weights against the single learner's). The driver puts a
round's rollouts in the object store once; every rank reads that object. After the update the
driver reads rank 0's weights (to publish to the rollout actors, evaluate and checkpoint) and, on
checkpoint rounds, its optimiser state.
Each rank holds a full replica (plain data parallelism); an 8B policy needs FSDP2 sharding across
the group instead, which this does not do yet. A lost learner actor fails the round (the group
cannot re-form mid-collective); re-running the run id resumes from the last checkpoint.
"""
import os

import torch

from model.checkpoint import from_pretrained
from rl.learner import RLConfig, Rollouts, update


class LearnerWorker:
    """One rank: policy, reference policy and optimiser on `device`."""

    def __init__(self, rank: int, world: int, policy_folder: str, start: str, cfg: dict, optimizer_state: dict | None,
                 shape, sampler, device: str = "cpu", threads: int = 1):
        torch.set_num_threads(threads)
        self.rank, self.world, self.cfg = rank, world, RLConfig(**cfg)
        self.shape, self.sampler = shape, sampler
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")  # Ray sets the visible GPU
        self.policy, self.vocab = from_pretrained(policy_folder, device=self.device)
        self.ref = from_pretrained(start, device=self.device)[0].eval().requires_grad_(False) \
            if self.cfg.beta > 0 else None
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        if optimizer_state:
            self.optimizer.load_state_dict(optimizer_state)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the group's TCP store."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int) -> int:
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world)
        return os.getpid()

    def update(self, batch: Rollouts) -> dict:
        batch = _to(batch, self.device)
        return update(self.policy, self.ref, self.optimizer, batch, self.cfg, self.vocab, self.shape, self.sampler,
                      rank=self.rank, world=self.world)

    def weights(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def optimizer_state(self) -> dict:
        return _cpu(self.optimizer.state_dict())

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _to(batch: Rollouts, device: torch.device) -> Rollouts:
    return Rollouts(prompts=batch.prompts, tokens=batch.tokens.to(device), step_map=batch.step_map.to(device),
                    logp=batch.logp.to(device), steps=batch.steps, adv=batch.adv.to(device),
                    zero_var=batch.zero_var.to(device))


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


class LearnerGroup:
    """The driver's handle on N LearnerWorker actors (one GPU each with use_gpu)."""

    def __init__(self, workers: int, policy_folder: str, start: str, cfg: RLConfig, optimizer_state: dict | None,
                 shape, sampler, use_gpu: bool = False):
        import ray

        # on CPU the learners work between rollouts, never beside them: they reserve no CPU of their own
        cls = ray.remote(num_cpus=1 if use_gpu else 0, num_gpus=1 if use_gpu else 0, max_restarts=0)(LearnerWorker)
        state_ref = ray.put(_cpu(optimizer_state)) if optimizer_state else None
        self.actors = [cls.remote(r, workers, policy_folder, start, cfg.to_dict(), state_ref, shape, sampler,
                                  device="cuda" if use_gpu else "cpu") for r in range(workers)]
        host, port = ray.get(self.actors[0].rendezvous.remote())
        ray.get([a.join.remote(host, port) for a in self.actors])

    def update(self, batch: Rollouts) -> dict:
        """Every rank's share of the update; the reduced statistics (rank 0's)."""
        import ray

        ref = ray.put(batch)
        return ray.get([a.update.remote(ref) for a in self.actors])[0]

    def weights(self) -> dict:
        import ray

        return ray.get(self.actors[0].weights.remote())

    def optimizer_state(self) -> dict:
        import ray

        return ray.get(self.actors[0].optimizer_state.remote())

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([a.leave.remote() for a in self.actors], timeout=30)
        except Exception:  # noqa: BLE001 - a dead rank: kill them all below
            pass
        for a in self.actors:
            ray.kill(a)
