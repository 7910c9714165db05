"""The pipeline's one configuration: a frozen pydantic model (Prefect shows it as a typed form and
validates it), checked before any work starts and stored with the run's outputs.

The defaults are the embedded default. Measured on 2 idle CPU cores from a fresh clone, `make run` took 18 min
56 s: ~2.3 min of venv set-up, then aggregate 0.3, reward CLIP 1.0, traces 0.0, SFT 11.1 (the toy recipe's
3000 steps, compiled, explicit CPU attention), ParaRL 3.5 (4 rounds of 16 prompts, 2 passes; now 8 prompts and
1 pass: 1.9), evaluation 0.7. The reward CLIP trains 300 steps instead of 700. With 3400 SFT steps the run took
21.7 min (25.5 before the attention change). The machine's speed varies: the same SFT took 11.1-14.3 min.
"""
import os

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl.learner import RLConfig
from tasks.sft.recipe import PRESETS, Recipe, load_recipe

# 4 rounds of 8 prompts x 8 samples, one pass over each round's rollouts (benchmarks/pararl.py's setting):
# the learner was 2/3 of the stage's 3.6 min at 16 prompts and 2 passes
PIPELINE_RL = dict(rounds=4, prompts_per_round=8, inner_iters=1, eval_every=4, checkpoint_every=4)
MODES = ("parallel", "sequential")


class PipelineConfig(BaseModel):
    """Everything one `pipeline` run needs; bad values fail here, naming the field and the fix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: str = "runs/default"
    """Folder of the run: data/ (the Parquet lake), sft/, rl/, eval/, examples/, reward/, config.json."""
    dataset: str = "toy-tiny"
    """Name of the dataset (the toy world's tasks) inside the lake."""
    seed: int = 0
    """Seeds the toy world, the teacher traces, the reward model, ParaRL and evaluation sampling."""
    recipe: str = "toy-tiny"
    """SFT recipe: a preset (toy-tiny, toy-all, small) or a JSON file of tasks.sft.recipe.Recipe fields."""
    toy_samples: int | None = None
    """Toy tasks to generate; None = the recipe's toy_samples."""
    sft_steps: int | None = None
    """SFT optimiser steps (the cosine ends here); None = the recipe's total_steps (3000 for toy-tiny)."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers for SFT (one CPU each, or one GPU each with gpu)."""
    gpu: bool = False
    """Put SFT workers and ParaRL actors on GPUs."""
    reward_steps: int = Field(300, ge=1)
    """Training steps of the toy reward CLIP (tasks/pararl/fit_reward.py; 700 gives 0.80 top-1 retrieval)."""
    rl: dict = Field(default_factory=lambda: dict(PIPELINE_RL))
    """ParaRL settings: rl.learner.RLConfig fields (reward, sampled_steps, reward_mode, lr, rounds ...)."""
    eval_modes: tuple[str, ...] = MODES
    """Decoding modes every checkpoint is evaluated in (the paper's Table 3 compares them)."""
    eval_limit: int | None = None
    """Score only the first N toy ParaBench items; None = all 300."""
    examples: int = Field(4, ge=0)
    """Held-out edits generated with the final checkpoint into {out}/examples."""

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        try:
            RLConfig(**self.rl)
        except TypeError as e:
            raise ValueError(f"rl={self.rl}: {e}; the fields are those of rl.learner.RLConfig") from None
        bad = [m for m in self.eval_modes if m not in MODES]
        if bad or not self.eval_modes:
            raise ValueError(f"eval_modes={list(self.eval_modes)}: use one or both of {MODES}")
        if self.recipe not in PRESETS and not os.path.isfile(self.recipe):
            raise ValueError(f"recipe={self.recipe!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit={self.eval_limit} must be >= 1 (or None for all items)")
        return self

    def resolved_recipe(self) -> Recipe:
        return load_recipe(self.recipe)
