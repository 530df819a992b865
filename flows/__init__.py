"""lanceflow flows: compose the tasks; parameters are pydantic models."""

from tasks.memory import limit_malloc_arenas

# before LanceDB's threads start: flat memory over long runs (see tasks.memory)
limit_malloc_arenas()
