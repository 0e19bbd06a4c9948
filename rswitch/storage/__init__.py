"""Per-prompt SQLite datasets, the DuckDB analytics store, and the batched writer that feeds both."""
