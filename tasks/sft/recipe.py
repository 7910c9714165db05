"""SFT recipes: one frozen config naming the model, image tokenizer, sequence lengths, optimiser,
schedule, data selection and evaluation of a run, on any aggregated dataset.

A recipe comes from a preset (`PRESETS`: `toy-tiny` is the measured recipe of the embedded default,
`small` the same tiny model on any data), a JSON file, or flags: `recipe_flags` adds one
`--section.field` option per field (help text = the field's docstring, default shown), and
`recipe_from_args` folds the given ones over the base. `default_preset` picks `toy-tiny` for toy
datasets and `small` otherwise, so an unknown dataset is never filtered down to toy categories.
"""
import ast
import dataclasses
import inspect
import json
import os
import textwrap

from pydantic import BaseModel, ConfigDict, Field

from model.sampling import SamplerConfig
from tasks.sft.sft_data import SequenceConfig
from tasks.sft.sft_loop import TOY_TINY_RECIPE, SFTConfig

KINDS = ("edit", "generate")
RESOLVED_SEQ_FIELDS = ("layout", "image_grid", "prompt_ids")  # set by prepare_sft from the checkpoint, not chosen


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal right under a field) of a dataclass or pydantic model."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(str(node.value.value).split())
    return docs


class Recipe(BaseModel):
    """Everything an SFT run needs besides the data location. Nested sections are plain dicts of the
    dataclass they configure (validated on construction)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str = "custom"
    """Label recorded with the run."""
    model: dict = Field(default_factory=lambda: dict(TOY_TINY_RECIPE.model))
    """Fresh model: model.transformer.ModelConfig fields except vocab_size / embedding_size (set from the
    tokenizers). Ignored with init_from."""
    image_positions: bool = False
    """Fresh model only: learned row/column embeddings on image blocks (ModelConfig.image_pos_grid, sized
    from the image tokenizer). Tried against the toy model's column-letter errors; no clear gain (README)."""
    init_from: str | None = None
    """Checkpoint folder to fine-tune (ours or a released MMaDA-Parallel / MMaDA / LLaDA folder); None trains
    a fresh model of `model` with a tiny text tokenizer fitted on the dataset."""
    image_tokenizer: str = "fit"
    """'fit': fit a pixel-patch VQ on the dataset (toy-sized images); or a folder (PatchVQ, MAGVIT-v2, or an
    aMUSEd VQ with vqvae/). With init_from, 'fit' means the checkpoint's own image_tokenizer/ folder."""
    tokenizer_vocab: int = TOY_TINY_RECIPE.tokenizer_vocab
    """Vocabulary of the tiny text tokenizer fitted for a fresh model."""
    seq: dict = Field(default_factory=lambda: {k: v for k, v in dataclasses.asdict(TOY_TINY_RECIPE.seq).items()
                                               if k not in RESOLVED_SEQ_FIELDS})
    """Sequence lengths: tasks.sft.sft_data.SequenceConfig fields."""
    sft: dict = Field(default_factory=lambda: dataclasses.asdict(TOY_TINY_RECIPE.sft))
    """Optimiser and schedule: tasks.sft.sft_loop.SFTConfig fields."""
    categories: tuple[str, ...] | None = None
    """Train (and evaluate) only these sample categories; None = all."""
    kinds: tuple[str, ...] | None = None
    """Train only these kinds ('edit', 'generate'); None = both."""
    sampler: dict = Field(default_factory=lambda: dict(
        steps=TOY_TINY_RECIPE.sampler_steps, image_steps=TOY_TINY_RECIPE.sampler_image_steps,
        text_block_length=TOY_TINY_RECIPE.seq.text_tokens, text_temperature=0.0, image_temperature=0.0,
        image_noise=0.0))
    """Sampler of the held-out evaluations: model.sampling.SamplerConfig fields."""
    eval_per_category: int = TOY_TINY_RECIPE.eval_per_category
    """Held-out samples per category in the final evaluation."""
    eval_clip: dict | None = None
    """CLIP alignment of sampled outputs on non-toy data: {"model_name", "pretrained"} (an open_clip architecture
    and a local weights file) or {"clip_folder"}; None skips it (reported as skipped)."""
    toy_samples: int = TOY_TINY_RECIPE.train_samples
    """Toy-world tasks `parapipe run` generates (the toy preset only)."""

    def model_post_init(self, _) -> None:
        SFTConfig(**self.sft), SequenceConfig(**self.seq), SamplerConfig(**self.sampler)  # noqa: B018 (validate)
        bad = [k for k in self.kinds or () if k not in KINDS]
        if bad:
            raise ValueError(f"Recipe.kinds={list(self.kinds)}: {bad} unknown; choose from {KINDS}")
        if self.init_from is None and not self.model:
            raise ValueError("Recipe.model is empty and init_from is None: give a fresh model config or a checkpoint")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _preset(name: str, **over) -> Recipe:
    return Recipe(**Recipe(name=name, **over).to_dict())  # JSON-normalised (lists, not tuples): round trips equal


PRESETS = {
    "toy-tiny": _preset("toy-tiny", categories=TOY_TINY_RECIPE.categories),
    # the toy world's 10 edit categories and generation (what toy ParaBench asks): room for the longest
    # toy instruction (35 tokens) and trace; same tiny model and optimiser as toy-tiny
    "toy-all": _preset("toy-all", categories=None, seq=dict(text_tokens=48, instruction_tokens=40),
                       sampler=dict(steps=24, image_steps=10, text_block_length=48, text_temperature=0.0,
                                    image_temperature=0.0, image_noise=0.0)),
    # any dataset: the same tiny model with room for real traces (semi-autoregressive text blocks of 32)
    "small": _preset("small", model={**TOY_TINY_RECIPE.model, "max_sequence_length": 1024},
                     seq=dict(text_tokens=128, instruction_tokens=32),
                     sampler=dict(steps=64, image_steps=16, text_block_length=32, text_temperature=0.0,
                                  image_temperature=0.0, image_noise=0.0)),
}
SECTIONS = {"sft": SFTConfig, "seq": SequenceConfig, "sampler": SamplerConfig}


def load_recipe(spec: str) -> Recipe:
    """A preset name or a JSON file of Recipe fields (nested sections may be partial)."""
    if spec in PRESETS:
        return PRESETS[spec]
    if not os.path.isfile(spec):
        raise ValueError(f"recipe {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    with open(spec) as f:
        data = json.load(f)
    base = PRESETS[data.pop("preset", "small")]
    return merge(base, data)


def merge(base: Recipe, over: dict) -> Recipe:
    """base with `over` applied; nested sections are merged field by field."""
    d = base.to_dict()
    for k, v in over.items():
        d[k] = {**(d.get(k) or {}), **v} if k in SECTIONS or k == "model" and isinstance(v, dict) else v
    return Recipe(**d)


def default_preset(is_toy: bool) -> str:
    return "toy-tiny" if is_toy else "small"


def _help_docs(cls) -> dict[str, str]:
    """Field docstrings as argparse help text: argparse formats help with %, so a literal % is doubled."""
    return {k: v.replace("%", "%%") for k, v in field_docs(cls).items()}


def recipe_flags(parser) -> None:
    """One option per recipe field: --lr style for top-level fields, --sft.lr for sections."""
    g = parser.add_argument_group("recipe fields (override the --recipe preset or file; defaults: 'small')")
    docs = _help_docs(Recipe)
    for name, info in Recipe.model_fields.items():
        if name in SECTIONS or name in ("model", "name"):
            continue
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"recipe:{name}", default=None, metavar="V",
                       help=f"{docs.get(name, '')} [default: {getattr(PRESETS['small'], name)}]")
    g.add_argument("--model.json", dest="recipe:model", default=None, metavar="JSON",
                   help=f"{docs['model']} [default: {json.dumps(PRESETS['small'].model)}]")
    for sec, cls in SECTIONS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        sdocs = _help_docs(cls)
        base = PRESETS["small"].to_dict()[sec]
        for f in dataclasses.fields(cls):
            if sec == "seq" and f.name in RESOLVED_SEQ_FIELDS:
                continue
            g.add_argument(f"--{sec}.{f.name}", dest=f"recipe:{sec}.{f.name}", default=None, metavar="V",
                           help=f"{sdocs.get(f.name, '')} [default: {base.get(f.name, defaults[f.name])}]")


def _csv(text: str):
    return None if text.lower() in ("none", "null", "") else tuple(s.strip() for s in text.split(",") if s.strip())


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None


def _bool(text: str) -> bool:
    return _parse(text, True)


TOP_LEVEL = {"image_positions": _bool,
             "init_from": lambda t: None if t.lower() in ("none", "null", "") else t, "image_tokenizer": str,
             "tokenizer_vocab": int, "categories": _csv, "kinds": _csv, "eval_per_category": int,
             "eval_clip": _json, "toy_samples": int, "model": _json}


def _parse(text: str, like):
    """A section flag's string as the type of the field's current value."""
    if isinstance(like, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(like, (int, float)):
        return type(like)(text)
    return text if isinstance(like, str) else _json(text)


def _default(section: str, name: str):
    return {f.name: f.default for f in dataclasses.fields(SECTIONS[section])}[name]


def recipe_from_args(args, base: Recipe) -> Recipe:
    """base with every recipe flag the user gave."""
    d, over = base.to_dict(), {}
    for dest, text in vars(args).items():
        if not dest.startswith("recipe:") or text is None:
            continue
        key = dest[len("recipe:"):]
        sec, _, field = key.partition(".")
        try:
            value = _parse(text, d[sec].get(field, _default(sec, field))) if field else TOP_LEVEL[sec](text)
        except ValueError as e:
            flag = key if field else key.replace("_", "-")  # top-level flags use dashes, sections field names
            raise ValueError(f"--{flag}={text!r}: {e}") from None
        if field:
            over.setdefault(sec, {})[field] = value
        else:
            over[sec] = value
    return merge(base, over)
