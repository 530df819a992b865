"""Every error lanceflow raises on purpose.

    LanceflowError                 base class; the message always says what to do
    ├── ConfigurationError         a setting or parameter that cannot work
    ├── SourceError                the source cannot be listed (nothing is deleted then)
    ├── DocumentError              one document cannot be read or parsed; it is skipped
    │   ├── ReadError              I/O failed (permissions, vanished, symlink loop)
    │   └── ParseError             content is not what its extension says
    ├── ModelError                 the embedding model cannot be loaded
    ├── EmbeddingAuthError         the embeddings API refused the key (401/403): stop at once
    ├── QuotaExhaustedError        the account's quota is spent (429 insufficient_quota)
    ├── PartialEmbeddingError      some inputs were rejected; carries the other vectors
    ├── ModelMismatchError         the table was built with another model or dimension
    ├── IndexDriftError            the run's settings differ from the index's fingerprint
    ├── DeletionRefusedError       the run would delete too much of its source (nothing written)
    ├── TableError                 the LanceDB table is missing or unusable
    └── TooManyFailuresError       the failed share exceeded the configured threshold

Transient network errors from libraries are *not* wrapped: they propagate so the retry layer
(Prefect task retries, tenacity) sees them.
"""

from __future__ import annotations

from typing import Any


class LanceflowError(Exception):
    """Base class of every lanceflow error."""


class ConfigurationError(LanceflowError):
    """A setting or parameter that cannot work."""


class SourceError(LanceflowError):
    """The document source cannot be listed or opened."""


class DocumentError(LanceflowError):
    """One document cannot be used; the run skips it and records the reason."""


class ReadError(DocumentError):
    """The document's bytes could not be read."""


class ParseError(DocumentError):
    """The document's bytes could not be parsed into text."""


class ModelError(LanceflowError):
    """The embedding model cannot be loaded or run."""


class EmbeddingAuthError(LanceflowError):
    """The embeddings API refused the credentials; retrying cannot help."""


class QuotaExhaustedError(LanceflowError):
    """The account's quota is spent; retrying cannot help."""


class PartialEmbeddingError(LanceflowError):
    """Some inputs of a batch were rejected (e.g. a 400 for one input).

    `vectors` holds every row (rejected rows are zeros); `failed` maps row -> reason.
    """

    def __init__(self, vectors: Any, failed: dict[int, str]) -> None:
        super().__init__(f"{len(failed)} inputs rejected by the embeddings API")
        self.vectors = vectors
        self.failed = failed


class ModelMismatchError(LanceflowError):
    """The table was embedded with another model or dimension than the one asked for."""


class IndexDriftError(LanceflowError):
    """The run's embedding or chunking settings differ from those the index was built with.

    `differences` lists (setting, old, new)."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]) -> None:
        super().__init__(message)
        self.differences = differences


class DeletionRefusedError(LanceflowError):
    """The listing would delete more of the source's documents than allowed: the source may be
    unmounted, moved or mistyped. Nothing was written."""


class TableError(LanceflowError):
    """The LanceDB table is missing or unusable."""


class TableBusyError(LanceflowError):
    """Another run kept the table's write slot past the wait limit."""


class TooManyFailuresError(LanceflowError):
    """More documents failed than the run's threshold allows.

    Carries the run report so the CLI can still print it.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report
