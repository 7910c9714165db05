"""Supervised fine-tuning, single process: config, lr schedule, one optimiser step, a plain loop.

train_step() is one optimiser step over a list of micro-batches (gradient accumulation): the
forward (masking) process and the re-weighted loss of model/diffusion.py, optional bf16 autocast,
gradient clipping, the lr of lr_at(). It holds no state besides its arguments, so a Ray
TorchTrainer `train_loop_per_worker` can call it on a DDP-wrapped model with its own shard of
batches (tasks/sft/sft_data.batch_stream with rank / world_size). train() is the single-process loop
built from these pieces (tests, benchmarks); resume_state() / training_state() are what a
checkpoint needs (model, optimiser, step, the masking generator's state). TOY_TINY_RECIPE is the
measured recipe for the toy world's tiny preset on a 2-core CPU (model, SFT, data and eval settings).
Leaves out: Ray, DDP, checkpoint files, data loading (tasks/sft/sft_data.py), evaluation (tasks/sft/toy_eval.py).
"""
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from model.diffusion import PAPER, PARALLEL_A, PARALLEL_M, diffusion_loss, forward_process
from model.layout import IMAGE, TEXT, Batch
from tasks.sft.sft_data import SequenceConfig

OBJECTIVES = {"paper": PAPER, "parallel_m": PARALLEL_M, "parallel_a": PARALLEL_A}


@dataclass(frozen=True)
class SFTConfig:
    """Optimisation settings of one SFT run (defaults: the toy tiny recipe of benchmarks/sft_recipe.py, except
    compile, which TOY_TINY_RECIPE turns on, and lr, which it halves: README, seed study)."""

    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at total_steps."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not to norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 50
    """Linear warm-up from lr / warmup_steps to lr over the first warmup_steps optimiser steps."""
    total_steps: int = 3000
    """Optimiser steps of the run; the cosine ends here."""
    batch_size: int = 64
    """Sequences per micro-batch (per worker under data parallelism)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    clip_norm: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    cond_dropout: float = 0.1
    """Probability of dropping the instruction, and independently the input image (CFG training)."""
    objective: str = "paper"
    """Loss / masking objective: a key of OBJECTIVES (paper, parallel_m, parallel_a)."""
    image_coeff: float = 3.0
    """Multiplies the objective's image loss coefficient (the toy target is exact images)."""
    bf16: bool = True
    """Run the forward under torch.autocast(<device>, bfloat16); weights, grads and the loss stay fp32."""
    compile: bool = False
    """torch.compile the training forward and backward (evaluation and checkpoints use the plain module). The
    first step compiles (about half a minute per process on a CPU core); on CPU it needs a C++ compiler, and
    where compiling fails the step runs eagerly with a warning. FSDP2 runs (--fsdp) stay eager."""
    seed: int = 0
    """Seed of the model init, the data order, dropout and the masking generator."""
    eval_interval: int = 400
    """Optimiser steps between evaluations in train() (0 = none)."""
    log_interval: int = 25
    """Optimiser steps between log lines in train() (0 = silent)."""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SFTConfig.objective={self.objective!r}; choose one of {sorted(OBJECTIVES)}")
        for name in ("total_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"SFTConfig.warmup_steps={self.warmup_steps} must lie in "
                             f"[0, total_steps={self.total_steps}]")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"SFTConfig.cond_dropout={self.cond_dropout} must lie in [0, 1)")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"SFTConfig.lr={self.lr} must be > 0 and min_lr_ratio={self.min_lr_ratio} in [0, 1]")


@dataclass(frozen=True)
class ToyRecipe:
    """Everything `make run` needs to train and evaluate the toy world's tiny preset."""

    model: dict
    """ModelConfig fields except vocab_size / embedding_size (those come from the tokenizers)."""
    sft: SFTConfig
    """Optimisation settings."""
    seq: SequenceConfig
    """Layout of the training sequences (and of the prompts at sampling time)."""
    tokenizer_vocab: int
    """vocab_size of build_tiny_tokenizer on the train text."""
    train_samples: int
    """Toy training tasks drawn (before drops)."""
    categories: tuple[str, ...] | None
    """Categories trained on (None = all)."""
    eval_categories: tuple[str, ...] | None
    """Categories evaluated (None = the trained ones)."""
    eval_per_category: int
    """Held-out val tasks per category in each evaluation."""
    sampler_steps: int
    """Parallel sampler steps at evaluation (greedy, one text block)."""
    sampler_image_steps: int
    """Image decoding steps on that timeline."""
    time_budget_s: float
    """Training seconds (evaluation excluded) after which the run stops even before total_steps."""


TOY_TINY_RECIPE = ToyRecipe(
    model=dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden_size=384, rope_theta=10000.0, max_sequence_length=256),
    sft=SFTConfig(lr=1.5e-3, compile=True), seq=SequenceConfig(text_tokens=32, instruction_tokens=16),
    tokenizer_vocab=512, train_samples=20000, categories=("recolour", "remove", "replace"), eval_categories=None,
    eval_per_category=32, sampler_steps=20, sampler_image_steps=10, time_budget_s=900.0)


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: SFTConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings and projections), none on norm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def output_columns(regions: torch.Tensor) -> int:
    """M, the length of the output part: every row ends with it (collate aligns it), and it starts
    one column (<soi>) before the first IMAGE / TEXT slot. regions (B, L) -> int."""
    slots = ((regions == IMAGE) | (regions == TEXT)).any(0)  # (L,)
    return regions.shape[1] - int(slots.nonzero()[0]) + 1


def training_module(model: torch.nn.Module, cfg: SFTConfig) -> torch.nn.Module:
    """What train_step runs: `model` itself, or with cfg.compile a torch.compile wrapper around it that shares
    its parameters (so the optimiser, state_dict and evaluation keep using `model`)."""
    if not cfg.compile:
        return model
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # no compiler on this machine: eager, with dynamo's warning
    return torch.compile(model)


def micro_batch_loss(model: torch.nn.Module, batch: Batch, cfg: SFTConfig, mask_id: int,
                     generator: torch.Generator | None):
    """Masks the output part, runs the model on it and returns model.diffusion.LossParts.

    Logits are computed for the output part only (last M columns): the loss never looks at the prompt.
    """
    objective = OBJECTIVES[cfg.objective]
    if cfg.image_coeff != 1.0:
        objective = dataclasses.replace(objective, image_coeff=objective.image_coeff * cfg.image_coeff)
    dev = next(model.parameters()).device
    ids, mask, regions = batch.input_ids.to(dev), batch.attention_mask.to(dev), batch.regions.to(dev)
    noisy, masked, t_text, t_image = forward_process(ids, regions, objective, mask_id, generator)
    M = output_columns(regions)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = model(noisy, mask, last_n=M)  # (B, M, V)
    return diffusion_loss(logits, ids[:, -M:], masked[:, -M:], regions[:, -M:], t_text, t_image, objective)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], cfg: SFTConfig,
               generator: torch.Generator | None, step: int, mask_id: int) -> dict[str, float]:
    """One optimiser step: accumulate grads over `batches`, clip, set lr_at(step), update.

    Args:
        batches: grad_accum micro-batches (model.layout.Batch), each on any device.
        generator: drives the masking; save its get_state() with the checkpoint to resume exactly.
        step: 0-based optimiser step (sets the learning rate).
        mask_id: the vocabulary's [MASK] id.
    Returns:
        loss, loss_text, loss_image (means over micro-batches), grad_norm (before clipping), lr,
        tokens (non-pad tokens processed).
    """
    model.train()
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals = None  # (3,) float64 on the device: loss, loss_text, loss_image; read back once per step
    tokens = 0
    for i, batch in enumerate(batches):
        # under DDP, all-reduce the gradients only once, on the last micro-batch
        sync = i == len(batches) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            parts = micro_batch_loss(model, batch, cfg, mask_id, generator)
            (parts.total / len(batches)).backward()
        part = torch.stack([v.detach().double() for v in (parts.total, parts.text, parts.image)]) / len(batches)
        totals = part if totals is None else totals + part
        tokens += int(batch.attention_mask.sum())
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    loss, loss_text, loss_image, grad_norm = torch.cat([totals, grad_norm.detach().double().view(1)]).tolist()
    return {"loss": loss, "loss_text": loss_text, "loss_image": loss_image, "grad_norm": grad_norm, "lr": lr,
            "tokens": float(tokens)}


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                   generator: torch.Generator) -> dict:
    """Everything a resumed run needs (the data stream is a pure function of seed and step)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "generator": generator.get_state()}


def resume_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator) -> int:
    """Loads training_state() output in place; returns the next optimiser step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return int(state["step"])


def train(model: torch.nn.Module, batches: Iterator[Batch], cfg: SFTConfig, mask_id: int,
          time_budget_s: float | None = None, eval_fn: Callable[[int, torch.nn.Module], dict] | None = None,
          log_fn: Callable[[dict], None] | None = None, generator: torch.Generator | None = None,
          optimizer: torch.optim.Optimizer | None = None, start_step: int = 0) -> list[dict]:
    """Single-process SFT: cfg.total_steps optimiser steps (or until time_budget_s of training time).

    Args:
        batches: endless micro-batch stream (tasks/sft/sft_data.batch_stream).
        eval_fn: called as eval_fn(step, model) every cfg.eval_interval steps and at the end; its
            dict is merged into that step's history row (its time is not counted as training time).
        log_fn: receives each history row at cfg.log_interval (and evaluated) steps.
    Returns:
        One row per optimiser step: train_step metrics + step, train_s (cumulative training
        seconds), tokens_per_s, plus eval_fn's keys on evaluated steps.
    """
    generator = generator or torch.Generator().manual_seed(cfg.seed)
    optimizer = optimizer or make_optimizer(model, cfg)
    forward = training_module(model, cfg)
    history, train_s = [], 0.0
    for step in range(start_step, cfg.total_steps):
        t0 = time.perf_counter()
        row = train_step(forward, optimizer, [next(batches) for _ in range(cfg.grad_accum)], cfg, generator,
                         step, mask_id)
        dt = time.perf_counter() - t0
        train_s += dt
        row.update(step=step + 1, train_s=train_s, tokens_per_s=row["tokens"] / dt)
        last = step + 1 == cfg.total_steps or (time_budget_s is not None and train_s >= time_budget_s)
        evaluate = eval_fn is not None and (last or bool(cfg.eval_interval) and (step + 1) % cfg.eval_interval == 0)
        if evaluate:
            row.update(eval_fn(step + 1, model))
            model.train()
        history.append(row)
        if log_fn is not None and (last or evaluate or (cfg.log_interval and (step + 1) % cfg.log_interval == 0)):
            log_fn(row)
        if last:
            break
    return history
