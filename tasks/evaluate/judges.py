"""The judge interface of the evaluation stage: benchmark items, model outputs, judgments.

A judge scores (item, output) pairs on the six ParaBench metrics, each on the paper's 0-100 scale.
Every item is scored: an output that could not be produced or parsed gets a Judgment with
failed=True and a reason (never a silent skip, never a zero dressed up as a score). Judges are plain
classes with a `name`, a `version` (part of every cache key: a new prompt or rule is a new version)
and `judge(items, outputs) -> list[Judgment]`; no registry, the evaluation flow picks one by name.
"""
from dataclasses import dataclass, field
from typing import Protocol

METRICS = ("text_quality", "text_alignment", "image_consistency", "image_alignment", "image_quality",
           "output_alignment")
"""ParaBench's six metrics, in the paper's Table 2 order; Overall is their mean."""
EDIT_ONLY = ("image_consistency",)
"""Metrics that exist only for editing items (generation has no input image)."""


@dataclass(frozen=True)
class EvalItem:
    """One benchmark item."""

    item_id: str
    kind: str
    """'edit' or 'generate'."""
    category: str
    instruction: str
    input_image: bytes | None = None
    """PNG bytes of the input image (edits)."""
    target_image: bytes | None = None
    """PNG bytes of a reference output image, when the benchmark has one."""
    reference_text: str | None = None
    """A reference reasoning trace, when the benchmark has one."""
    extra: dict = field(default_factory=dict)
    """Benchmark-specific ground truth (toy: {"input_scene", "output_scene", "preset"} as describe() strings)."""


@dataclass(frozen=True)
class EvalOutput:
    """What a model produced for one item."""

    item_id: str
    text: str
    """The reasoning text, decoded."""
    image: bytes | None
    """PNG bytes of the output image; None when sampling or decoding failed."""
    error: str | None = None
    """Why the output could not be produced (then the item is judged failed)."""


@dataclass(frozen=True)
class Judgment:
    """A judge's verdict on one (item, output)."""

    item_id: str
    judge: str
    version: str
    scores: dict
    """metric -> score in [0, 100], or None where the metric does not apply (image_consistency of a generation)."""
    failed: bool = False
    """True when the output could not be judged (unparseable image, malformed judge answers after retries...)."""
    reason: str = ""
    """Why it failed, or the judge's short rationale."""


class Judge(Protocol):
    name: str
    version: str

    def judge(self, items: list[EvalItem], outputs: list[EvalOutput]) -> list[Judgment]:
        """One Judgment per item, in item order (outputs are matched by item_id)."""
        ...


def overall(scores: dict) -> float | None:
    """Mean of the metrics that apply (ParaBench's Overall); None if none does."""
    vals = [scores[m] for m in METRICS if scores.get(m) is not None]
    return sum(vals) / len(vals) if vals else None
