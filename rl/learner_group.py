"""A data-parallel ParaRL learner group on Ray: N learner actors, one torch.distributed group.

Every `LearnerWorker` loads the same policy (the start or resumed checkpoint), reference policy and
optimiser state, joins a process group (gloo on CPU, NCCL on GPUs; rank 0's node address and a free
port are the rendezvous) and runs rl/learner.update on its share of each mini-batch: the gradient
all-reduce makes every rank take the identical step, so the group behaves as one learner over the
whole batch (tests/test_pararl checks the weights against the single learner's). The driver puts a
round's rollouts in the object store once; every rank reads that object. After the update rank 0
puts its full weights in the object store and the rollout actors read that object (the driver
passes the reference on); the driver fetches it only to evaluate or checkpoint, and on checkpoint
rounds also the optimiser state.
Plain data parallelism keeps a full replica per rank (gradients all-reduced in one flat buffer);
`fsdp=True` shards the policy with FSDP2 (fully_shard per block, fp32 compute so the replay matches
the rollouts' log-probs; the reduce-scatter's mean times world is the sum; the frozen reference is
sharded too), which an 8B policy with its AdamW state needs. Both are tested on CPU with gloo. A lost
learner actor fails the round (the group cannot re-form mid-collective); re-running the run id
resumes from the last checkpoint.
"""
import os

import torch

from model.checkpoint import from_pretrained
from rl.learner import RLConfig, Rollouts, update


class LearnerWorker:
    """One rank: policy, reference policy and optimiser on `device` (the optimiser is built on joining)."""

    def __init__(self, rank: int, world: int, policy_folder: str, start: str, cfg: dict, optimizer_state: dict | None,
                 shape, sampler, device: str = "cpu", fsdp: bool = False, threads: int = 1):
        torch.set_num_threads(threads)
        self.rank, self.world, self.cfg, self.fsdp = rank, world, RLConfig(**cfg), fsdp
        self.shape, self.sampler, self.optimizer_state_in = shape, sampler, optimizer_state
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")  # Ray sets the visible GPU
        self.policy, self.vocab = from_pretrained(policy_folder, device=self.device)
        # the frozen reference only feeds the KL term: bf16 on GPUs halves its memory
        ref_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.ref = from_pretrained(start, dtype=ref_dtype, device=self.device)[0].eval().requires_grad_(False) \
            if self.cfg.beta > 0 else None
        self.optimizer = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the group's TCP store."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int) -> int:
        """Joins the process group, shards the policy (fsdp), builds the optimiser and loads its state."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world)
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            # fp32 compute: the replay must match the rollout's log-probs; gradients are averaged over ranks
            # (update() scales its loss by world). The frozen reference is sharded the same way: at 8B its bf16
            # copy is 16 GB a rank unsharded, which with the sharded policy, gradients and AdamW state
            # (16 bytes a parameter / world) would not fit an 80 GB GPU at world 2.
            for model in [self.policy] + ([self.ref] if self.ref is not None else []):
                for module in list(model.model.transformer.blocks) + [model]:
                    fully_shard(module, mesh=mesh)
            self.policy.gradient_checkpointing = True  # as SFT's FSDP2 runs: block inputs kept, the rest recomputed
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        if self.optimizer_state_in:
            set_optimizer_state_dict(self.policy, self.optimizer, optim_state_dict=self.optimizer_state_in,
                                     options=StateDictOptions(full_state_dict=True))
            self.optimizer_state_in = None
        return os.getpid()

    def update(self, batch: Rollouts) -> dict:
        batch = _to(batch, self.device)
        return update(self.policy, self.ref, self.optimizer, batch, self.cfg, self.vocab, self.shape, self.sampler,
                      rank=self.rank, world=self.world, sharded=self.fsdp)

    def weights(self) -> dict:
        """Rank 0: the full state dict on the CPU; other ranks {} (they take part in the gather when sharded,
        and send nothing back to the driver)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else {}

    def put_weights(self) -> list:
        """Rank 0: [a reference to its full CPU state dict, put in the object store from here] (the rollout
        actors read it without the driver holding a copy); other ranks [None] after joining the gather."""
        import ray

        sd = self.weights()
        return [ray.put(sd) if self.rank == 0 else None]

    def optimizer_state(self) -> dict:
        """Rank 0: the full optimiser state keyed by parameter name; other ranks {} (as weights)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.policy, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.rank == 0 else {}

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _to(batch: Rollouts, device: torch.device) -> Rollouts:
    return Rollouts(prompts=batch.prompts, tokens=batch.tokens.to(device), step_map=batch.step_map.to(device),
                    logp=batch.logp.to(device), steps=batch.steps, adv=batch.adv.to(device),
                    zero_var=batch.zero_var.to(device))


class LearnerGroup:
    """The driver's handle on N LearnerWorker actors (one GPU each with use_gpu).

    Optimiser states cross the boundary keyed by parameter name (torch.distributed.checkpoint's full
    state dict), so the driver's plain AdamW - the one checkpoints save - converts to and from them.
    """

    def __init__(self, workers: int, policy_folder: str, start: str, cfg: RLConfig, optimizer_state: dict | None,
                 shape, sampler, use_gpu: bool = False, fsdp: bool = False):
        import ray

        # on CPU the learners work between rollouts, never beside them: they reserve no CPU of their own
        cls = ray.remote(num_cpus=1 if use_gpu else 0, num_gpus=1 if use_gpu else 0, max_restarts=0)(LearnerWorker)
        state_ref = ray.put(optimizer_state) if optimizer_state else None
        self.actors = [cls.remote(r, workers, policy_folder, start, cfg.to_dict(), state_ref, shape, sampler,
                                  device="cuda" if use_gpu else "cpu", fsdp=fsdp) for r in range(workers)]
        host, port = ray.get(self.actors[0].rendezvous.remote())
        ray.get([a.join.remote(host, port) for a in self.actors])

    def update(self, batch: Rollouts) -> dict:
        """Every rank's share of the update; the reduced statistics (rank 0's)."""
        import ray

        ref = ray.put(batch)
        return ray.get([a.update.remote(ref) for a in self.actors])[0]

    def weights_ref(self):
        """An object-store reference to rank 0's full weights, put there by rank 0 (one copy, no driver hop)."""
        import ray

        return ray.get([a.put_weights.remote() for a in self.actors])[0][0]

    def optimizer_state(self) -> dict:
        """Rank 0's named optimiser state (every rank is called, as weights)."""
        import ray

        return ray.get([a.optimizer_state.remote() for a in self.actors])[0]

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([a.leave.remote() for a in self.actors], timeout=30)
        except Exception:  # noqa: BLE001 - a dead rank: kill them all below
            pass
        for a in self.actors:
            ray.kill(a)


def by_name(policy, optimizer) -> dict | None:
    """The driver's optimiser state keyed by parameter name (what the learner actors load); None if empty."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not optimizer.state:
        return None
    return get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True))


def load_by_name(policy, optimizer, state: dict) -> None:
    """The learner actors' named optimiser state into the driver's optimiser (then saved by checkpoints)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(policy, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
