"""Arrow schemas for every ParaPipe table, one place.

Holds: one `pyarrow.Schema` per table in `TABLES`, each carrying its table name and schema version in the schema
metadata (`parapipe.table`, `parapipe.schema_version`), the default row key per table (`KEYS`, used by
`storage.parquet.write_rows` for idempotent writes) and the allowed values of enum-like string columns (`CHOICES`).
Leaves out: reading and writing (storage/parquet.py), queries (storage/query.py), any migration between versions.

Conventions: images are PNG bytes (`binary`) next to their width/height (`int32`); free-form structured data is a
JSON string (`*_json` columns are plain `string`); times are UTC microsecond timestamps; a run id is a string.
Bump a table's version in `VERSIONS` whenever its fields change.
"""
import pyarrow as pa

META_TABLE = b"parapipe.table"
META_VERSION = b"parapipe.schema_version"

VERSIONS = {
    "samples": 1,
    "quarantine": 1,
    "traces": 2,
    "train_metrics": 1,
    "trajectories": 2,
    "rewards": 2,
    "rl_metrics": 1,
    "eval_results": 1,
    "eval_outputs": 1,
    "eval_judgments": 1,
    "runs": 1,
}

TIME = pa.timestamp("us", tz="UTC")


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    meta = {META_TABLE: name.encode(), META_VERSION: str(VERSIONS[name]).encode()}
    return pa.schema(fields, metadata=meta)


def _f(name: str, type_: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# One row per training example: an instruction, an optional input image (edit) and the target image.
SAMPLES = _schema("samples", [
    _f("sample_id", pa.string(), False),
    _f("source", pa.string(), False),          # dataset or generator the sample came from
    _f("kind", pa.string(), False),            # "edit" | "generate"
    _f("category", pa.string()),
    _f("split", pa.string(), False),           # "train" | "val" | "test"
    _f("instruction", pa.string(), False),
    _f("input_image", pa.binary()),            # PNG bytes; null for generation
    _f("input_width", pa.int32()),
    _f("input_height", pa.int32()),
    _f("output_image", pa.binary(), False),    # PNG bytes
    _f("output_width", pa.int32(), False),
    _f("output_height", pa.int32(), False),
    _f("reference_trace", pa.string()),        # reasoning text shipped with the source, if any
    _f("content_hash", pa.string(), False),    # hex digest over instruction + image bytes
    _f("phash", pa.string()),                  # perceptual hash of the output image, hex
    _f("extra_json", pa.string()),
])

# Raw records rejected at ingestion, kept for inspection instead of silently dropped.
QUARANTINE = _schema("quarantine", [
    _f("source", pa.string(), False),
    _f("source_ref", pa.string(), False),      # row index, file name or URL within the source
    _f("reason", pa.string(), False),          # short machine-readable reason, e.g. "decode_error"
    _f("detail", pa.string()),
    _f("raw_json", pa.string()),               # the offending record's fields (images replaced by sizes)
])

# One reasoning trace per (sample, generator): what the teacher model wrote and how it went.
TRACES = _schema("traces", [
    _f("sample_id", pa.string(), False),
    _f("generator", pa.string(), False),       # hash of (model, revision, template, sampling params)
    _f("attempt", pa.int32(), False),          # 1 for the first try; failed rows are retried as attempt + 1
    _f("template_hash", pa.string(), False),
    _f("text", pa.string()),
    _f("status", pa.string(), False),          # "ok" | "failed" | "filtered"
    _f("error", pa.string()),
    _f("filter_reason", pa.string()),
    _f("model", pa.string(), False),
    _f("revision", pa.string()),
    _f("seed", pa.int64()),
    _f("run_id", pa.string(), False),
    _f("latency_s", pa.float64()),
    _f("prompt_tokens", pa.int32()),
    _f("output_tokens", pa.int32()),
])

# One row per logged optimiser step (SFT or RL).
TRAIN_METRICS = _schema("train_metrics", [
    _f("run_id", pa.string(), False),
    _f("step", pa.int64(), False),
    _f("loss", pa.float64(), False),
    _f("loss_text", pa.float64()),
    _f("loss_image", pa.float64()),
    _f("tokens_per_s", pa.float64()),
    _f("lr", pa.float64()),
    _f("grad_norm", pa.float64()),
    _f("time", TIME, False),
])

# One row per sampled denoising step of one RL rollout: the partially unmasked text and image after
# that step, its reward and the group-relative advantage credited to the tokens decoded at it.
TRAJECTORIES = _schema("trajectories", [
    _f("run_id", pa.string(), False),
    _f("round", pa.int32(), False),
    _f("sample_id", pa.string(), False),
    _f("group_index", pa.int32(), False),      # member of the GRPO group, 0..G-1
    _f("step", pa.int32(), False),             # denoising step, 0..T-1
    _f("text_tokens", pa.list_(pa.int32())),   # text ids so far, MASK_ID where still masked
    _f("text", pa.string()),                   # decoded text so far (masked tokens dropped)
    _f("image_codes", pa.list_(pa.int32())),   # image codebook ids so far, -1 where still masked
    _f("text_mask_frac", pa.float32(), False),
    _f("image_mask_frac", pa.float32(), False),
    _f("instruction", pa.string()),            # the prompt's instruction
    _f("slot", pa.int32()),                    # index of this step among the round's K sampled steps
    _f("decoded_text", pa.int32()),            # text tokens decoded at this step (credited by the loss)
    _f("decoded_image", pa.int32()),           # image codes decoded at this step
    _f("reward_raw", pa.float64()),            # reward model score of the partial pair
    _f("reward", pa.float64()),                # normalised to [0, 1] (rl/grpo.normalise_rewards)
    _f("advantage", pa.float64()),             # standardised over the group at this step
    _f("zero_var", pa.bool_()),                # the group's rewards at this step had no variance
])

# One row per finished rollout: its final output and reward terms.
REWARDS = _schema("rewards", [
    _f("run_id", pa.string(), False),
    _f("round", pa.int32(), False),
    _f("sample_id", pa.string(), False),
    _f("group_index", pa.int32(), False),
    _f("reward", pa.float64(), False),         # mean normalised reward over the sampled steps
    _f("clip_score", pa.float64()),            # raw reward-model score of the final output
    _f("advantage", pa.float64()),             # mean advantage over the sampled steps
    _f("terms_json", pa.string()),             # {"final_raw": .., "exact_agreement": .., "text": ..}
])

# One row per RL round: what the rollouts scored, what the update did, and where the time went.
RL_METRICS = _schema("rl_metrics", [
    _f("run_id", pa.string(), False),
    _f("round", pa.int32(), False),
    _f("reward_mean", pa.float64()),           # normalised reward, all sampled steps
    _f("reward_std", pa.float64()),
    _f("reward_by_step_json", pa.string()),    # {step: {"mean": .., "std": .., "raw_mean": ..}}
    _f("zero_var_frac", pa.float64()),         # (prompt, step) groups dropped for zero variance
    _f("loss", pa.float64()),
    _f("pg_loss", pa.float64()),
    _f("kl", pa.float64()),                    # k3 KL to the reference policy, token mean
    _f("clip_frac", pa.float64()),
    _f("ratio_max", pa.float64()),
    _f("entropy", pa.float64()),               # policy entropy on credited tokens, nats
    _f("grad_norm", pa.float64()),
    _f("lr", pa.float64()),
    _f("heldout_agreement", pa.float64()),     # exact toy text-image agreement (null off the toy world)
    _f("heldout_exact_image", pa.float64()),
    _f("heldout_text_correct", pa.float64()),
    _f("rollouts", pa.int64()),
    _f("reward_pairs", pa.int64()),
    _f("learner_tokens", pa.int64()),
    _f("text_split_rate", pa.float64()),       # reward texts longer than the CLIP context (split, not cut)
    _f("rollout_s", pa.float64()),
    _f("reward_s", pa.float64()),
    _f("learner_s", pa.float64()),
    _f("eval_s", pa.float64()),
    _f("wall_s", pa.float64()),
    _f("time", TIME),
])

# One row per (checkpoint, eval suite, metric).
EVAL_RESULTS = _schema("eval_results", [
    _f("run_id", pa.string(), False),
    _f("checkpoint", pa.string(), False),      # checkpoint URI
    _f("step", pa.int64()),
    _f("suite", pa.string(), False),           # eval set name
    _f("metric", pa.string(), False),
    _f("value", pa.float64(), False),
    _f("num_samples", pa.int64()),
    _f("time", TIME),
])

# One row per (benchmark item, decoding mode, seed) of an evaluation run: the output, kept so judging can be redone.
EVAL_OUTPUTS = _schema("eval_outputs", [
    _f("run_id", pa.string(), False),
    _f("benchmark", pa.string(), False),
    _f("item_id", pa.string(), False),
    _f("mode", pa.string(), False),            # "parallel" | "sequential"
    _f("seed", pa.int64(), False),
    _f("checkpoint", pa.string(), False),
    _f("kind", pa.string(), False),            # "edit" | "generate"
    _f("category", pa.string()),
    _f("instruction", pa.string()),
    _f("text", pa.string()),                   # decoded reasoning text
    _f("image", pa.binary()),                  # PNG; null when the output could not be produced
    _f("error", pa.string()),                  # why not
    _f("nfe", pa.int64()),
    _f("time", TIME),
])

# One row per (output, judge version): the six ParaBench metrics on 0-100 (null where a metric does not apply).
EVAL_JUDGMENTS = _schema("eval_judgments", [
    _f("run_id", pa.string(), False),
    _f("benchmark", pa.string(), False),
    _f("item_id", pa.string(), False),
    _f("mode", pa.string(), False),
    _f("seed", pa.int64(), False),
    _f("judge", pa.string(), False),
    _f("judge_version", pa.string(), False),
    _f("kind", pa.string(), False),
    _f("category", pa.string()),
    _f("text_quality", pa.float64()),
    _f("text_alignment", pa.float64()),
    _f("image_consistency", pa.float64()),
    _f("image_alignment", pa.float64()),
    _f("image_quality", pa.float64()),
    _f("output_alignment", pa.float64()),
    _f("overall", pa.float64()),
    _f("failed", pa.bool_(), False),
    _f("reason", pa.string()),
    _f("time", TIME),
])

# One row per stage invocation (tasks/common/runs.py): what ran, with which config and code, how long each part took.
RUNS = _schema("runs", [
    _f("run_id", pa.string(), False),
    _f("stage", pa.string(), False),           # "aggregate" | "traces" | "sft" | "rl" | "eval" | "pipeline"
    _f("config_json", pa.string(), False),
    _f("code_version", pa.string()),           # git commit or package version
    _f("start_time", TIME, False),
    _f("end_time", TIME),
    _f("timings_json", pa.string()),           # {"phase_s": seconds, "seconds": total, counts; "error" if it failed}
])

TABLES = {
    "samples": SAMPLES,
    "quarantine": QUARANTINE,
    "traces": TRACES,
    "train_metrics": TRAIN_METRICS,
    "trajectories": TRAJECTORIES,
    "rewards": REWARDS,
    "rl_metrics": RL_METRICS,
    "eval_results": EVAL_RESULTS,
    "eval_outputs": EVAL_OUTPUTS,
    "eval_judgments": EVAL_JUDGMENTS,
    "runs": RUNS,
}

# Columns that identify a row within one run partition; write_rows skips keys already committed.
KEYS = {
    "samples": ("sample_id",),
    "quarantine": ("source", "source_ref", "reason"),
    "traces": ("sample_id", "generator", "attempt"),
    "train_metrics": ("run_id", "step"),
    "trajectories": ("run_id", "round", "sample_id", "group_index", "step"),
    "rewards": ("run_id", "round", "sample_id", "group_index"),
    "rl_metrics": ("run_id", "round"),
    "eval_results": ("run_id", "checkpoint", "suite", "metric"),
    "eval_outputs": ("run_id", "benchmark", "item_id", "mode", "seed"),
    "eval_judgments": ("run_id", "benchmark", "item_id", "mode", "seed", "judge", "judge_version"),
    "runs": ("run_id", "stage", "start_time"),  # a resumed run adds a row for the part it did
}

# Allowed values of enum-like string columns, checked on write.
CHOICES = {
    ("samples", "kind"): ("edit", "generate"),
    ("samples", "split"): ("train", "val", "test"),
    ("traces", "status"): ("ok", "failed", "filtered"),
    ("eval_outputs", "mode"): ("parallel", "sequential"),
    ("eval_outputs", "kind"): ("edit", "generate"),
    ("eval_judgments", "mode"): ("parallel", "sequential"),
}


def schema_version(schema: pa.Schema) -> int | None:
    """The version stamped in a schema's metadata, or None for a schema ParaPipe did not write."""
    meta = schema.metadata or {}
    return int(meta[META_VERSION]) if META_VERSION in meta else None
