"""Data stages: download raw files, read metadata, ingest images into Parquet image records."""
