"""lanceflow flows: compose the tasks; parameters are pydantic models."""

import os

from tasks.memory import bound_lance_io_buffer, limit_malloc_arenas

# a worker runs the flows without the CLI: the same offline, quiet defaults
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# before LanceDB's threads start: flat memory over long runs (see tasks.memory)
limit_malloc_arenas()
bound_lance_io_buffer()
