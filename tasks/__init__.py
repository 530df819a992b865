"""lanceflow tasks: plain typed functions with thin Prefect task wrappers."""
