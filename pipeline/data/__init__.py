"""The data layer: sources (raw rows), format adapters (rows to records), loading (mixing, held-out
eval), tokenization and the built-in sentiment task."""
