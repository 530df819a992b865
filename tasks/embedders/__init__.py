"""Embedding backends. Each implements only `embed(texts) -> vectors` (see base.Embedder)."""
