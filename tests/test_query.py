"""storage/query.py: DuckDB views over committed shards (local and S3), .sql export, formatting and the REPL."""
import io

import duckdb
import pyarrow as pa
import pytest

from storage.parquet import write_rows
from storage.query import CANNED_VIEWS, connect, format_table, interactive, query, write_views_sql
from storage.schema import TABLES
from tests.s3server import s3_root, s3_server  # noqa: F401  (pytest fixtures)
from tests.test_storage import sample

SAMPLES_BY_SOURCE = [("laion", None, "train", 2), ("laion", None, "val", 1), ("magicbrush", None, "train", 3)]
QUARANTINE_REASONS = [("laion", "decode_error", 2), ("laion", "too_small", 1), ("magicbrush", "too_small", 1)]
TRACE_STATS = [("g1", 3, 2, 1, 0, 5.0, 15.0, 2.0), ("g2", 1, 0, 0, 1, None, None, 4.0)]
TRAJECTORIES_BY_STEP = [("rl1", 0, 0, 2, 0.75, 1.0), ("rl1", 0, 1, 2, 0.25, 0.5)]
TABLE_COUNTS = {"samples": 6, "quarantine": 4, "traces": 4, "trajectories": 4, "rewards": 0, "runs": 0,
                "train_metrics": 0, "eval_results": 0, "rl_metrics": 0}


def trace(sample_id: str, generator: str, status: str, text: str | None, latency: float, out_tokens: int | None):
    return dict(sample_id=sample_id, generator=generator, attempt=1, template_hash="t", text=text, status=status, model="m",
                run_id="syn1", latency_s=latency, output_tokens=out_tokens)


def step(group: int, t: int, text_frac: float, image_frac: float) -> dict:
    return dict(run_id="rl1", round=0, sample_id="s000", group_index=group, step=t, text_mask_frac=text_frac,
                image_mask_frac=image_frac)


def populate(root: str, s3=None) -> None:
    """Known rows: 6 samples over two runs, 4 quarantined records, 4 traces, 4 trajectory steps; the rest empty."""
    write_rows(root, "samples", [sample(0, "laion"), sample(1, "laion"), sample(2, "laion", "val")], run="a", s3=s3)
    write_rows(root, "samples", [sample(i, "magicbrush") for i in range(3)], run="b", s3=s3)
    bad = [("laion", "1", "decode_error"), ("laion", "2", "decode_error"), ("laion", "3", "too_small"),
           ("magicbrush", "9", "too_small")]
    write_rows(root, "quarantine", [dict(source=s, source_ref=r, reason=why) for s, r, why in bad], run="a", s3=s3)
    traces = [trace("s000", "g1", "ok", "abc", 1.0, 10), trace("s001", "g1", "ok", "abcdefg", 2.0, 20),
              trace("s002", "g1", "failed", None, 3.0, None), trace("s000", "g2", "filtered", "x", 4.0, 1)]
    write_rows(root, "traces", traces, run="syn1", s3=s3)
    steps = [step(0, 0, 1.0, 1.0), step(1, 0, 0.5, 1.0), step(0, 1, 0.5, 0.5), step(1, 1, 0.0, 0.5)]
    write_rows(root, "trajectories", steps, run="rl1", s3=s3)


def rows(tbl: pa.Table) -> list[tuple]:
    return [tuple(r.values()) for r in tbl.to_pylist()]


def check_views(root: str, s3=None) -> None:
    assert rows(query(root, "SELECT * FROM samples_by_source", s3)) == SAMPLES_BY_SOURCE
    assert rows(query(root, "SELECT * FROM quarantine_reasons", s3)) == QUARANTINE_REASONS
    assert rows(query(root, "SELECT * FROM trace_stats", s3)) == TRACE_STATS
    assert rows(query(root, "SELECT * FROM trajectories_by_step", s3)) == TRAJECTORIES_BY_STEP
    for table, n in TABLE_COUNTS.items():
        assert query(root, f"SELECT count(*) AS n FROM {table}", s3).column("n").to_pylist() == [n], table
    by_run = query(root, "SELECT run, count(*) AS n FROM samples GROUP BY run ORDER BY run", s3)
    assert rows(by_run) == [("a", 3), ("b", 3)]


@pytest.fixture
def local_root(tmp_path) -> str:
    root = str(tmp_path / "lake")
    populate(root)
    return root


def test_views_local(local_root):
    check_views(local_root)


def test_views_over_s3_through_pyarrow(s3_server, s3_root):
    populate(s3_root, s3_server.config())
    check_views(s3_root, s3_server.config())


def test_connection_has_every_table_and_canned_view_and_no_file_access(local_root, tmp_path):
    con = connect(local_root)
    names = [r[0] for r in con.sql("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
    assert names == sorted([*TABLES, *CANNED_VIEWS])
    assert [c[0] for c in con.sql("DESCRIBE rewards").fetchall()] == [*TABLES["rewards"].names, "run"]
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"COPY samples TO '{tmp_path}/out.csv'")
    with pytest.raises(duckdb.PermissionException):
        con.sql(f"SELECT * FROM read_parquet('{local_root}/samples/run=a/shard-00000.parquet')").fetchall()
    con.close()


def test_uncommitted_shard_is_not_queried(local_root):
    with open(f"{local_root}/samples/run=a/shard-00001.parquet", "wb") as f:
        f.write(b"torn")
    assert query(local_root, "SELECT count(*) AS n FROM samples").column("n").to_pylist() == [6]


def test_views_sql_file_gives_same_counts_in_fresh_duckdb(local_root, tmp_path):
    path = write_views_sql(local_root, str(tmp_path / "views.sql"))
    con = duckdb.connect()
    con.execute(open(path).read())
    for view in CANNED_VIEWS:
        sql = f"SELECT * FROM {view}"
        assert rows(con.sql(sql).to_arrow_table()) == rows(query(local_root, sql))
    for table, n in TABLE_COUNTS.items():
        assert con.sql(f"SELECT count(*) FROM {table}").fetchall() == [(n,)], table
    assert con.sql("SELECT run, count(*) FROM samples GROUP BY run ORDER BY run").fetchall() == [("a", 3), ("b", 3)]
    assert [c[0] for c in con.sql("DESCRIBE runs").fetchall()] == [*TABLES["runs"].names, "run"]
    con.close()


def test_format_table():
    tbl = pa.table({"name": ["a", None, "x" * 50], "n": [1, 22, 333], "img": [b"\x89PNG", None, b""],
                    "f": [0.5, 1 / 3, 2.0]})
    assert format_table(tbl, max_rows=2, max_cell=10) == "\n".join([
        "name | n  | img       | f",
        "-----+----+-----------+---------",
        "a    |  1 | <4 bytes> |      0.5",
        "NULL | 22 | NULL      | 0.333333",
        "(2 of 3 rows)"])
    assert format_table(tbl.slice(2), max_cell=10).splitlines()[2] == "xxxxxxxxx… | 333 | <0 bytes> | 2"


def test_interactive_runs_piped_sql_until_quit(local_root):
    stdin = io.StringIO("SELECT count(*) AS n\n  FROM samples;\n\n.tables\nSELECT * FROM nope;\n"
                        "SELECT source, n FROM quarantine_reasons WHERE n > 1;\n.quit\nSELECT 1;\n")
    out = io.StringIO()
    assert interactive(local_root, stdin=stdin, stdout=out) == 1  # one statement failed
    text = out.getvalue()
    assert text.startswith("n\n-\n6\n(1 rows)\ntable_name\n")
    assert "error: Catalog Error: Table with name nope does not exist" in text
    assert text.endswith("source | n\n-------+--\nlaion  | 2\n(1 rows)\n")  # nothing after .quit


def test_interactive_last_statement_needs_no_semicolon(local_root):
    out = io.StringIO()
    assert interactive(local_root, stdin=io.StringIO("SELECT count(*) AS n FROM traces"), stdout=out) == 0
    assert out.getvalue() == "n\n-\n4\n(1 rows)\n"


def test_intervals_and_durations_read_as_people_write_them():
    import datetime as dt

    from storage.query import format_csv, format_interval

    s = 10**9
    values = [(0, 0, 1_356_939_835), (0, 0, 0), (0, 2, 0), (14, 0, 90 * s), (0, 1, 30 * s), (0, 0, -5 * s)]
    assert [format_interval(pa.MonthDayNano(v)) for v in values] == \
        ["1.357 s", "0 s", "2 d", "14 mon 1 min 30 s", "1 d 30 s", "-5 s"]
    assert format_interval(dt.timedelta(hours=2, seconds=5)) == "2 h 0 min 5 s"
    tbl = pa.table({"d": pa.array([dt.timedelta(seconds=1.5), None], pa.duration("us")), "s": ["a,b", "x"]})
    assert format_table(tbl).splitlines()[2:4] == ["1.5 s | a,b", "NULL  | x"]
    assert format_csv(tbl) == 'd,s\n1.5 s,"a,b"\n,x\n'
