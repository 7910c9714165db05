"""The aggregate stage: sources (toy world, JSONL folders, Parquet, WebDataset) -> the samples table.

Records are read safely, normalised, validated (bad ones go to quarantine with a reason) and deduplicated;
flows/aggregate.py runs one ingest task per source.
"""
