"""DuckDB inspection of a ParaPipe root: SQL over the committed shards, Arrow out.

Holds: `connect` (an in-memory DuckDB with one view per table plus the canned views in `CANNED_VIEWS`), `query`,
`write_views_sql` (a `.sql` file of `CREATE VIEW`s any DuckDB client can run), `format_table` / `format_csv` /
`format_json` (intervals read `1 min 58.5 s`) and `interactive` (a small read-eval-print loop for `parapipe inspect`;
`parapipe query "SQL"` maps to `query` + a formatter).
Leaves out: writing data (storage/parquet.py) and S3 access inside DuckDB. DuckDB 2.0 has no httpfs offline, so every
table is a `pyarrow.dataset` over the committed shard files (local or S3, via storage/fs.py) registered in the
connection. Connections are read-only in effect: file access from SQL is switched off
(`enable_external_access = false`), so SQL cannot write files, attach databases or read shards no manifest lists.
"""
import datetime as dt
import os
import sys
from typing import TextIO

import duckdb
import pyarrow as pa

from storage import fs
from storage.parquet import committed_files, open_dataset, read_schema
from storage.schema import TABLES

# name -> SELECT over the table views; created in this order after the tables.
CANNED_VIEWS = {
    "samples_by_source": """
        SELECT source, category, split, count(*) AS n
        FROM samples GROUP BY ALL ORDER BY source, category, split""",
    "quarantine_reasons": """
        SELECT source, reason, count(*) AS n
        FROM quarantine GROUP BY ALL ORDER BY n DESC, source, reason""",
    "trace_stats": """
        SELECT generator, count(*) AS n,
               count(*) FILTER (WHERE status = 'ok') AS n_ok,
               count(*) FILTER (WHERE status = 'failed') AS n_failed,
               count(*) FILTER (WHERE status = 'filtered') AS n_filtered,
               avg(length(text)) FILTER (WHERE status = 'ok') AS mean_chars,
               avg(output_tokens) FILTER (WHERE status = 'ok') AS mean_output_tokens,
               avg(latency_s) AS mean_latency_s
        FROM (SELECT * FROM traces  -- each sample's latest attempt: a failure a later one superseded is not one
              QUALIFY row_number() OVER (PARTITION BY run, generator, sample_id ORDER BY attempt DESC) = 1)
        GROUP BY generator ORDER BY generator""",
    "trajectories_by_step": """
        SELECT run_id, round, step, count(*) AS n,
               avg(text_mask_frac) AS mean_text_mask_frac, avg(image_mask_frac) AS mean_image_mask_frac
        FROM trajectories GROUP BY ALL ORDER BY run_id, round, step""",
    "reward_by_step": """
        SELECT run_id, slot, count(*) AS n, avg(step) AS mean_step, avg(reward_raw) AS mean_raw,
               avg(reward) AS mean_reward, stddev_pop(reward) AS std_reward,
               avg(CAST(zero_var AS INTEGER)) AS zero_var_frac
        FROM trajectories WHERE reward IS NOT NULL GROUP BY ALL ORDER BY run_id, slot""",
    "best_and_worst_groups": """
        WITH g AS (
            SELECT run_id, round, sample_id, any_value(instruction) AS instruction, avg(reward) AS mean_reward,
                   stddev_pop(reward) AS std_reward, count(DISTINCT group_index) AS samples
            FROM trajectories WHERE reward IS NOT NULL GROUP BY run_id, round, sample_id),
        r AS (
            SELECT *, row_number() OVER (PARTITION BY run_id ORDER BY mean_reward DESC, sample_id) AS best,
                      row_number() OVER (PARTITION BY run_id ORDER BY mean_reward ASC, sample_id) AS worst
            FROM g)
        SELECT run_id, CASE WHEN best <= 5 THEN 'best' ELSE 'worst' END AS kind, round, sample_id, instruction,
               mean_reward, std_reward, samples
        FROM r WHERE best <= 5 OR worst <= 5 ORDER BY run_id, kind, mean_reward DESC""",
    "rl_progress": """
        SELECT run_id, round, reward_mean, zero_var_frac, kl, clip_frac, entropy, heldout_agreement,
               heldout_exact_image, rollout_s, reward_s, learner_s
        FROM rl_metrics ORDER BY run_id, round""",
}
MAX_ROWS = 40
MAX_CELL = 40
PROMPT = "parapipe> "
CONTINUE = "      ...> "
HELP = ("end SQL statements with ';'.  .tables lists views, .schema NAME describes one, .quit leaves.\n"
        "canned views: " + ", ".join(CANNED_VIEWS))


def connect(root: str, s3: fs.S3Config | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per table in `TABLES` (empty if the table has no committed rows)
    and the `CANNED_VIEWS`. Each table view has the schema's columns plus the `run` partition column."""
    con = duckdb.connect(":memory:")
    for table in TABLES:
        con.register(table, open_dataset(root, table, s3=s3))
    for name, sql in CANNED_VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {sql}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def query(root: str, sql: str, s3: fs.S3Config | None = None) -> pa.Table:
    """Run one SQL statement against `connect(root)` and return its result as an Arrow table."""
    con = connect(root, s3)
    try:
        rel = con.sql(sql)
        return rel.to_arrow_table() if rel is not None else pa.table({})
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------ .sql export

def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _empty_select(con: duckdb.DuckDBPyConnection, table: str) -> str:
    """A typed zero-row SELECT with the table's columns, for tables with no committed shards."""
    con.register("_empty", read_schema(table).empty_table())
    cols = con.sql("DESCRIBE _empty").fetchall()
    con.unregister("_empty")
    return "SELECT " + ", ".join(f'CAST(NULL AS {typ}) AS "{name}"' for name, typ, *_ in cols) + " WHERE false"


def _table_select(con: duckdb.DuckDBPyConnection, table: str, files: dict[str, list[str]]) -> str:
    parts = []
    for run, uris in files.items():
        paths = ", ".join(_literal(u if fs.is_s3(u) else os.path.abspath(u)) for u in uris)
        parts.append(f"SELECT *, {_literal(run)} AS run FROM read_parquet([{paths}])")
    return "\n  UNION ALL ".join(parts) if parts else _empty_select(con, table)


def views_sql(root: str, s3: fs.S3Config | None = None) -> str:
    """The text of `write_views_sql`: `CREATE OR REPLACE VIEW` statements over the explicit committed shard files."""
    lines = [f"-- ParaPipe views over the committed shards under {root}.",
             "-- Python: duckdb.connect().execute(open('views.sql').read()); DuckDB CLI (installed separately):",
             "-- duckdb -init views.sql, or .read views.sql.",
             "-- Rerun `parapipe inspect --write-sql` to pick up newer shards."]
    if fs.is_s3(root):
        lines.append("-- S3 paths need DuckDB's httpfs extension and a CREATE SECRET for the endpoint and keys.")
    con = duckdb.connect(":memory:")
    try:
        for table in TABLES:
            select = _table_select(con, table, committed_files(root, table, s3=s3))
            lines.append(f"CREATE OR REPLACE VIEW {table} AS\n  {select};")
    finally:
        con.close()
    lines += [f"CREATE OR REPLACE VIEW {name} AS {sql.strip()};" for name, sql in CANNED_VIEWS.items()]
    return "\n".join(lines) + "\n"


def write_views_sql(root: str, path: str, s3: fs.S3Config | None = None) -> str:
    """Write `views_sql(root)` to `path` (local or S3) atomically; returns `path`."""
    fs.write_bytes(path, views_sql(root, s3).encode(), s3)
    return path


# ------------------------------------------------------------------------------------------------ printing

def format_duration(seconds: float) -> str:
    """1.3569 -> '1.357 s', 118.5 -> '1 min 58.5 s', 10800 -> '3 h', 97230 -> '1 d 3 h 0 min 30 s'."""
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 60:
        return f"{sign}{s:.4g} s"
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    parts = [(d, "d"), (h, "h"), (m, "min"), (round(sec, 3), "s")]
    first = next(i for i, (v, _) in enumerate(parts) if v)
    last = max(i for i, (v, _) in enumerate(parts) if v)
    return sign + " ".join(f"{v:g} {unit}" for v, unit in parts[first:last + 1])


def format_interval(v: object) -> str:
    """A DuckDB INTERVAL (Arrow month_day_nano) or Arrow duration as a person reads it."""
    if isinstance(v, dt.timedelta):
        return format_duration(v.total_seconds())
    months, days, ns = v.months, v.days, v.nanoseconds
    parts = [f"{months} mon"] if months else []
    if days or not ns and not parts:
        parts.append(f"{days} d" if days or parts else "0 s")
    if ns:
        parts.append(format_duration(ns / 1e9))
    return " ".join(parts)


def _text(v: object) -> str:
    """A cell's full text: NULL, <N bytes>, 6 significant digits, human intervals."""
    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (pa.MonthDayNano, dt.timedelta)):
        return format_interval(v)
    return str(v)


def _cell(v: object, max_cell: int) -> str:
    s = _text(v).replace("\n", "\\n")
    return s if not max_cell or len(s) <= max_cell else s[:max_cell - 1] + "…"


def format_table(tbl: pa.Table, max_rows: int = MAX_ROWS, max_cell: int = MAX_CELL) -> str:
    """A fixed-width text rendering of the first `max_rows` rows (0: all), cells cut at `max_cell` characters
    (0: never); bytes show as `<N bytes>`, intervals as `1 min 58.5 s`, numbers right-aligned."""
    names = tbl.column_names
    shown_tbl = tbl.slice(0, max_rows) if max_rows else tbl
    rows = [[_cell(v, max_cell) for v in r.values()] for r in shown_tbl.to_pylist()]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in tbl.schema.types]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]

    def line(cells: list[str], align: list[bool]) -> str:
        return " | ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, align)).rstrip()

    header = line(names, [False] * len(names))
    out = [header, "-+-".join("-" * w for w in widths)] + [line(r, numeric) for r in rows]
    shown = f"{len(rows)} of {tbl.num_rows} rows" if tbl.num_rows > len(rows) else f"{tbl.num_rows} rows"
    return "\n".join(out + [f"({shown})"])


def format_csv(tbl: pa.Table, max_rows: int = 0) -> str:
    """CSV with a header row, full cell text (no cutting); NULL is an empty field."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(tbl.column_names)
    for r in (tbl.slice(0, max_rows) if max_rows else tbl).to_pylist():
        w.writerow(["" if v is None else _text(v) for v in r.values()])
    return buf.getvalue()


def _json_value(v: object):
    if isinstance(v, (pa.MonthDayNano, dt.timedelta)):
        return format_interval(v)
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if isinstance(v, (dt.date, dt.datetime, dt.time)):
        return v.isoformat()
    return str(v)  # Decimal, UUID, ...


def format_json(tbl: pa.Table, max_rows: int = 0) -> str:
    """A JSON array of row objects with full values (bytes as `<N bytes>`, intervals as text, times ISO)."""
    import json

    rows = [{k: format_interval(v) if isinstance(v, pa.MonthDayNano) else v for k, v in r.items()}
            for r in (tbl.slice(0, max_rows) if max_rows else tbl).to_pylist()]  # a namedtuple would be a list
    return json.dumps(rows, default=_json_value, indent=1, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ REPL

def _run_sql(con: duckdb.DuckDBPyConnection, sql: str, out: TextIO) -> bool:
    try:
        rel = con.sql(sql)
        out.write((format_table(rel.to_arrow_table()) if rel is not None else "OK") + "\n")
        return True
    except duckdb.Error as e:
        out.write(f"error: {e}\n")
        return False


def _dot_command(con: duckdb.DuckDBPyConnection, cmd: str, out: TextIO) -> bool:
    name, _, arg = cmd.partition(" ")
    if name == ".tables":
        return _run_sql(con, "SELECT table_name FROM information_schema.tables ORDER BY table_name", out)
    if name == ".schema" and arg.strip():
        return _run_sql(con, f'DESCRIBE "{arg.strip()}"', out)
    if name == ".help":
        out.write(HELP + "\n")
        return True
    out.write(f"error: unknown command {cmd!r}; {HELP}\n")
    return False


def interactive(root: str, s3: fs.S3Config | None = None, stdin: TextIO | None = None,
                stdout: TextIO | None = None) -> int:
    """Read SQL from `stdin` (statements end with ';', or at end of input), print each result as a text table.

    Works piped (`echo "SELECT * FROM trace_stats;" | parapipe inspect ROOT`): prompts appear only on a terminal.
    Returns 0 if every statement succeeded, else 1 (a usable exit code).
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdin.isatty()
    con = connect(root, s3)
    ok, buf = True, []
    if tty:
        stdout.write(f"ParaPipe inspect: {root}\n{HELP}\n")
    try:
        while True:
            if tty:
                stdout.write(CONTINUE if buf else PROMPT)
                stdout.flush()
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not buf and text in (".quit", ".exit"):
                break
            if not buf and text.startswith("."):
                ok &= _dot_command(con, text, stdout)
            elif text or buf:
                buf.append(line)
                if text.endswith(";"):
                    ok &= _run_sql(con, "".join(buf), stdout)
                    buf = []
        if "".join(buf).strip():
            ok &= _run_sql(con, "".join(buf), stdout)
    finally:
        con.close()
    return 0 if ok else 1
