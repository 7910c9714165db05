"""ParaPipe storage: Arrow schemas, atomic run-partitioned Parquet datasets on local disk or S3, and DuckDB inspection.

    schema.py   pyarrow schemas for every table (`TABLES`), their versions, row keys and enum values
    fs.py       local paths and s3:// URIs behind one interface (pyarrow.fs), atomic writes, S3 settings from AWS_* vars
    parquet.py  write_rows (atomic, idempotent, partitioned by run; manifest last), read_table (committed shards only)
    query.py    DuckDB views over committed shards, canned views, query -> Arrow, .sql export, a small REPL

Import the submodules directly (`from storage.parquet import write_rows`); this file imports nothing so that
`import storage.schema` stays free of duckdb.
"""
