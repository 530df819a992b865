"""lanceflow flows: compose the tasks; parameters are pydantic models."""
