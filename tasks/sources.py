"""Listing and reading documents from a folder or a bucket (anything fsspec opens).

Files are listed lazily, one directory at a time. Record files (.jsonl, .csv, .parquet) are
streamed record by record; every record is a document with its own id.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from tasks.errors import ConfigurationError, ReadError, SourceError
from tasks.settings import FILE_EXTENSIONS, RECORD_EXTENSIONS, SourceSettings
from tasks.storage import fsspec_options, local_path, redact_text, redact_uri, userinfo

log = logging.getLogger(__name__)

ID_FIELD_CANDIDATES = ("_id", "id", "doc_id")
#: attempts at reading one object from a bucket (transient errors only)
READ_ATTEMPTS = int(os.environ.get("LANCEFLOW_READ_ATTEMPTS", "5"))


@dataclass(slots=True)
class FileEntry:
    """One file found in the source."""

    path: str  # the path fsspec reads
    rel: str  # the path relative to the source root, '/'-separated: a file's document id
    size: int
    mtime: float
    error: str | None = None  # set when the entry itself is unusable (symlink loop, ...)
    #: the store's change token from the listing (tasks.sources.change_token): equal tokens
    #: and sizes mean the same content, so the object is not downloaded
    etag: str | None = None

    @property
    def is_records(self) -> bool:
        return self.rel.lower().endswith(RECORD_EXTENSIONS)


@dataclass(slots=True)
class Record:
    """One document read from a record file."""

    doc_id: str
    title: str
    text: str
    source: str
    line: int


@dataclass(slots=True)
class RecordError:
    """A record that cannot be used, with where it is."""

    doc_id: str
    source: str
    line: int
    error: str


_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}


def canonical_source_uri(uri: str) -> str:
    """One name per source: an absolute local path (symlinks resolved, no trailing slash), or
    a bucket URL with a lower-case scheme and no trailing or doubled slashes. `docs`, `./docs/`
    and `/abs/docs` are one source; so are `s3://b/p/` and `s3a://b/p`."""
    uri = uri.strip()
    path = local_path(uri)
    if path is not None:
        return os.path.realpath(path)
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    scheme = _SCHEME_ALIASES.get(scheme, scheme)
    found = userinfo(rest)
    if found and (scheme != "az" or ":" in found[0]):
        # no credentials; abfs://container@account names no secret and is kept
        rest = found[1]
    parts = [p for p in rest.split("/") if p]
    return redact_uri(f"{scheme}://{'/'.join(parts)}")  # no secret query values either


def supported(rel: str) -> bool:
    return rel.lower().endswith(FILE_EXTENSIONS + RECORD_EXTENSIONS)


def _glob_match(rel: str, pattern: str) -> bool:
    pattern = pattern.strip()
    if not pattern:
        return False
    candidates = {pattern}
    while pattern.startswith("**/"):
        pattern = pattern[3:]
        candidates.add(pattern)
    name = rel.rsplit("/", 1)[-1]
    for p in candidates:
        if fnmatchcase(rel, p) or ("/" not in p and fnmatchcase(name, p)):
            return True
    return False


def selected(rel: str, include: list[str], exclude: list[str]) -> bool:
    """Whether a relative path passes the include and exclude globs."""
    if include and not any(_glob_match(rel, p) for p in include):
        return False
    return not any(_glob_match(rel, p) for p in exclude)


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return 0.0


_MD5_HEX = re.compile(r"[0-9a-f]{32}")


def change_token(info: dict[str, Any]) -> str | None:
    """What the listing says about an object's content, without reading it.

    A content hash when the store gives one: GCS's `md5Hash`, Azure's Content-MD5, an S3 ETag
    of a single-part upload (the object's MD5). These survive an identical re-upload, so a
    bucket re-synced with the same bytes is not downloaded. Otherwise the ETag (multipart S3,
    Azure without Content-MD5) or version id, which change on every upload: such an object is
    downloaded once, found identical by hash, and its new token recorded.
    """
    md5 = info.get("md5Hash")
    if md5:
        return f"md5:{_hex(md5)}"
    settings = info.get("content_settings")
    if isinstance(settings, dict):
        content_md5 = settings.get("content_md5")
    else:
        content_md5 = getattr(settings, "content_md5", None)
    content_md5 = content_md5 or info.get("content_md5")
    if content_md5:
        return f"md5:{_hex(content_md5)}"
    etag = info.get("ETag") or info.get("etag") or info.get("e_tag")
    if etag:
        etag = str(etag).strip().strip('"').lower()
        return f"md5:{etag}" if _MD5_HEX.fullmatch(etag) else f"etag:{etag}"
    version = info.get("VersionId") or info.get("version_id") or info.get("generation")
    if version:
        return f"version:{version}"
    return None


def _hex(value: Any) -> str:
    """A Content-MD5 as hex, whether given as base64 text, raw bytes or hex."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    text = str(value).strip().strip('"')
    if _MD5_HEX.fullmatch(text.lower()):
        return text.lower()
    try:
        return base64.b64decode(text, validate=True).hex()
    except (ValueError, binascii.Error):
        return text


def is_transient(exc: BaseException) -> bool:
    """A read failure worth retrying: throttling, a reset connection, a timeout, a 5xx."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | ReadError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__} {exc}"[:500].lower()
    markers = (
        "throttl", "slowdown", "slow down", "toomanyrequests", "too many requests", "429",
        "500", "502", "503", "504", "serviceunavailable", "internalerror", "reset",
        "timeout", "timed out", "temporar", "connection", "broken pipe", "incompleteread",
    )  # fmt: skip
    return any(m in text for m in markers)


def _where(where: str, root: str) -> str:
    """A prefix relative to the source root, for a listing error."""
    if where.startswith(root):
        where = where[len(root) :].lstrip("/")
    return (where.rstrip("/") + "/") if where else "(a prefix)"


def _brief(exc: BaseException, options: dict[str, Any] | None) -> str:
    text = str(exc).strip() or type(exc).__name__
    return redact_text(f"{type(exc).__name__}: {text}"[:300], options)


def stat_local_root(uri: str, root: str) -> os.stat_result:
    """A local source's root (a folder or a file), or SourceError saying what to check."""
    try:
        return os.stat(root)
    except OSError as exc:
        raise SourceError(
            f"source {uri!r} cannot be opened: {exc.strerror or exc}. "
            "Check the path and its permissions."
        ) from exc


class Source:
    """A document source: a local folder or file, or a bucket prefix."""

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        options = fsspec_options(settings.uri, settings.storage_options, settings.credentials_block)
        self._secrets = options  # every secret value, for redacting error texts
        try:
            fs, root = fsspec.core.url_to_fs(settings.uri, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"cannot open source {redact_uri(settings.uri)!r}: "
                f"{redact_text(str(exc), options)}. For s3://, gs:// or az:// install "
                "lanceflow[s3], [gcs] or [azure]; storage options are the filesystem's own "
                "keyword arguments (s3fs, gcsfs, adlfs)."
            ) from None
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.local = isinstance(fs, LocalFileSystem)
        self.uri = canonical_source_uri(settings.uri)
        self.real_root = os.path.realpath(self.root) if self.local else self.root
        #: False once any part of the listing failed: the run must then delete nothing.
        self.complete = True
        self.listing_errors: list[tuple[str, str]] = []
        #: links to outside the source root, left out (follow_external_links is off)
        self.skipped_links: list[str] = []
        #: False when the listing gave no modification times: every file is then re-hashed
        self.reliable_mtime = True

    # ---- listing -------------------------------------------------------------------------

    def iter_entries(self) -> Iterator[FileEntry]:
        """Every supported, selected file, lazily. Raises SourceError when the root fails."""
        s = self.settings
        for entry in self._walk():
            if not supported(entry.rel):
                continue
            if not s.include_hidden and any(part.startswith(".") for part in entry.rel.split("/")):
                continue
            if not selected(entry.rel, s.include, s.exclude):
                continue
            yield entry

    def _walk(self) -> Iterator[FileEntry]:
        if self.local:
            yield from self._walk_local()
        else:
            yield from self._walk_remote()

    def _walk_local(self) -> Iterator[FileEntry]:
        root = self.root
        st = stat_local_root(self.settings.uri, root)
        if not stat.S_ISDIR(st.st_mode):
            name = os.path.basename(root)
            yield FileEntry(root, name, st.st_size, st.st_mtime)
            return
        visited: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
        yield from self._scan_local(root, "", visited, top=True)

    def _scan_local(
        self, path: str, rel: str, visited: set[tuple[int, int]], top: bool = False
    ) -> Iterator[FileEntry]:
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if top:
                raise SourceError(
                    f"source {self.settings.uri!r} cannot be listed: {exc.strerror or exc}. "
                    "Check its permissions."
                ) from exc
            self._listing_failed(rel + "/", f"folder cannot be listed: {exc.strerror or exc}")
            return
        for e in entries:
            child_rel = f"{rel}/{e.name}" if rel else e.name
            if not self.settings.include_hidden and e.name.startswith("."):
                continue
            try:
                st = e.stat(follow_symlinks=True)
            except OSError as exc:
                if e.is_symlink():
                    reason = (
                        "symlink loop" if exc.errno == 40 else f"broken symlink ({exc.strerror})"
                    )
                else:
                    reason = f"cannot stat: {exc.strerror or exc}"
                # whatever it pointed at may be a document we index: delete nothing this run
                self._listing_failed(child_rel, reason)
                if supported(child_rel):
                    yield FileEntry(e.path, child_rel, 0, 0.0, error=reason)
                continue
            if e.is_symlink() and not self.settings.follow_external_links:
                target = os.path.realpath(e.path)
                if os.path.commonpath([target, self.real_root]) != self.real_root:
                    self.skipped_links.append(child_rel)
                    log.info("left out %s: a link to %s, outside the source", child_rel, target)
                    continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    # A folder link back to a folder already being walked: a loop.
                    self.listing_errors.append((child_rel + "/", "symlink loop: folder skipped"))
                    continue
                visited.add(key)
                yield from self._scan_local(e.path, child_rel, visited)
                visited.discard(key)
            elif stat.S_ISREG(st.st_mode):
                yield FileEntry(e.path, child_rel, st.st_size, st.st_mtime)

    def _walk_remote(self) -> Iterator[FileEntry]:
        fs, root = self.fs, self.root
        shown = redact_uri(self.settings.uri)
        # a long-lived process (a worker, `lanceflow serve`) must see tonight's bucket, not a
        # listing fsspec cached on an earlier run
        fs.invalidate_cache()
        first = True
        try:
            if fs.isfile(root):
                info = fs.info(root)
                yield FileEntry(
                    root,
                    root.rsplit("/", 1)[-1],
                    int(info.get("size") or 0),
                    _mtime(info),
                    etag=change_token(info),
                )
                return
            # a prefix that cannot be listed below the root is recorded, not fatal: the run
            # goes on with what was listed and deletes nothing. (fsspec's own walk drops
            # errors below the top folder silently, so the walk is done here.)
            for full, info in self._walk_prefixes(root):
                first = False
                rel = full[len(root) :].lstrip("/") if full.startswith(root) else full
                if not rel:
                    continue
                mtime = _mtime(info)
                if mtime == 0.0:
                    self.reliable_mtime = False
                yield FileEntry(
                    full, rel, int(info.get("size") or 0), mtime, etag=change_token(info)
                )
            if first and not fs.exists(root):
                raise SourceError(f"source {shown!r} does not exist.")
        except SourceError:
            raise
        except FileNotFoundError:
            raise SourceError(
                f"source {shown!r} does not exist. Check the bucket and prefix."
            ) from None
        except PermissionError:
            raise SourceError(
                f"source {shown!r} cannot be listed: access denied. Check the credentials "
                "(environment, provider chain or credentials_block) and that they may list "
                "the bucket."
            ) from None
        except Exception as exc:
            # only the root's own listing raises here, before anything was listed (a deeper
            # prefix's failure is recorded by _walk_prefixes)
            raise SourceError(
                f"source {shown!r} cannot be listed: {_brief(exc, self._secrets)}"
            ) from None

    def _walk_prefixes(self, root: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(path, listing info) of every object under `root`, one prefix at a time in name
        order. The root's own failure raises; a deeper prefix's failure is recorded."""
        stack = [root]
        while stack:
            prefix = stack.pop()
            try:
                listing = self.fs.ls(prefix, detail=True)
            except Exception as exc:
                if prefix == root:
                    raise
                self._listing_failed(
                    _where(prefix, root),
                    f"prefix cannot be listed: {_brief(exc, self._secrets)}",
                )
                continue
            files: list[tuple[str, dict[str, Any]]] = []
            folders: list[str] = []
            for info in listing:
                name = str(info.get("name", "")).rstrip("/")
                if not name or name == prefix.rstrip("/"):
                    continue
                if info.get("type") == "directory":
                    folders.append(name)
                else:
                    files.append((name, info))
            yield from sorted(files, key=lambda item: item[0])
            stack.extend(sorted(folders, reverse=True))

    def _listing_failed(self, where: str, why: str) -> None:
        self.complete = False
        self.listing_errors.append((where, why))
        log.warning("listing incomplete at %s: %s", where, why)

    # ---- reading ---------------------------------------------------------------------

    def read_bytes(self, entry_path: str, max_bytes: int) -> bytes:
        """A file's bytes; ReadError for anything that keeps it from being read. Reads from a
        bucket are retried with backoff on throttling, resets and timeouts."""
        if self.local:
            return self._read_once(entry_path, max_bytes)
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(READ_ATTEMPTS),
            wait=wait_exponential_jitter(initial=0.5, max=20),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._read_once(entry_path, max_bytes)
        except ReadError:
            raise
        except Exception as exc:
            raise ReadError(
                f"cannot read after {READ_ATTEMPTS} attempts: {_brief(exc, self._secrets)}"
            ) from None
        raise AssertionError("unreachable")

    def read_many(self, paths: list[str], max_bytes: int) -> dict[str, bytes | ReadError]:
        """Several files' bytes, downloaded `download_concurrency` at a time from a bucket
        (the caller bounds the batch's bytes); each failure is its file's ReadError."""

        def one(path: str) -> bytes | ReadError:
            try:
                return self.read_bytes(path, max_bytes)
            except ReadError as exc:
                return exc

        workers = 1 if self.local else min(self.settings.download_concurrency, len(paths))
        if workers <= 1:
            return {p: one(p) for p in paths}
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
            return dict(zip(paths, pool.map(one, paths), strict=True))

    def _read_once(self, entry_path: str, max_bytes: int) -> bytes:
        try:
            if self.local:
                with self.fs.open(entry_path, "rb") as fh:
                    data = fh.read(max_bytes + 1)
            else:
                # one ranged GET: never more than the limit, whatever the object grew to
                try:
                    data = self.fs.cat_file(entry_path, start=0, end=max_bytes + 1)
                except OSError as exc:
                    # a store answers 416 to any range on an empty object
                    if "range" not in str(exc).lower() or self.fs.size(entry_path) != 0:
                        raise
                    data = b""
        except IsADirectoryError as exc:
            raise ReadError("is a folder, not a file") from exc
        except PermissionError as exc:
            raise ReadError("permission denied: make the file readable") from exc
        except FileNotFoundError as exc:
            raise ReadError("file vanished while the run was reading") from exc
        except OSError as exc:
            if getattr(exc, "errno", None) == 40:
                raise ReadError("symlink loop") from exc
            if not self.local and is_transient(exc):
                raise
            raise ReadError(
                f"cannot read: {redact_text(str(exc.strerror or exc), self._secrets)}"
            ) from None
        if len(data) > max_bytes:
            raise ReadError(
                f"larger than max_file_mb ({max_bytes / 2**20:g} MB): raise the limit or split "
                "the file"
            )
        return data

    def iter_records(self, entry: FileEntry) -> Iterator[Record | RecordError]:
        """Every record of a .jsonl/.csv/.parquet file, streamed."""
        lower = entry.rel.lower()
        if lower.endswith((".jsonl", ".ndjson")):
            yield from self._iter_jsonl(entry)
        elif lower.endswith(".csv"):
            yield from self._iter_table(entry, "csv")
        else:
            yield from self._iter_table(entry, "parquet")

    def _pick_id_field(self, fields: list[str] | dict[str, Any], entry: FileEntry) -> str:
        s = self.settings
        if s.id_field:
            if s.id_field not in fields:
                raise ReadError(f"{entry.rel}: no id column {s.id_field!r}; set id_field")
            return s.id_field
        for name in ID_FIELD_CANDIDATES:
            if name in fields:
                return name
        raise ReadError(
            f"{entry.rel}: no id column (looked for {', '.join(ID_FIELD_CANDIDATES)}); set id_field"
        )

    def _make(
        self, row: dict[str, Any], id_field: str, entry: FileEntry, line: int
    ) -> Record | RecordError:
        s = self.settings
        raw_id = row.get(id_field)
        if raw_id is None or str(raw_id).strip() == "":
            return RecordError(f"{entry.rel}#{line}", entry.rel, line, f"no {id_field!r} value")
        doc_id = str(raw_id)
        text = row.get(s.text_field)
        if not isinstance(text, str):
            if text is None:
                return RecordError(doc_id, entry.rel, line, f"no {s.text_field!r} field")
            text = str(text)
        title = row.get(s.title_field)
        title = "" if title is None else str(title)
        return Record(doc_id, title.strip(), text, entry.rel, line)

    def _iter_jsonl(self, entry: FileEntry) -> Iterator[Record | RecordError]:
        id_field: str | None = None
        try:
            with self.fs.open(entry.path, "rb") as fh:
                for line_no, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        yield RecordError(
                            f"{entry.rel}#{line_no}", entry.rel, line_no, f"invalid JSON: {exc}"
                        )
                        continue
                    if not isinstance(row, dict):
                        yield RecordError(
                            f"{entry.rel}#{line_no}", entry.rel, line_no, "not a JSON object"
                        )
                        continue
                    if id_field is None:
                        id_field = self._pick_id_field(row, entry)
                    yield self._make(row, id_field, entry, line_no)
        except PermissionError as exc:
            raise ReadError("permission denied: make the file readable") from exc
        except FileNotFoundError as exc:
            raise ReadError("file vanished while the run was reading") from exc
        except OSError as exc:  # a connection lost mid-file: this file fails, not the run
            raise ReadError(f"cannot read records: {_brief(exc, self._secrets)}") from None

    def _iter_table(self, entry: FileEntry, kind: str) -> Iterator[Record | RecordError]:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        try:
            with self.fs.open(entry.path, "rb") as fh:
                batches: Iterator[pa.RecordBatch]
                if kind == "csv":
                    reader = pacsv.open_csv(
                        fh,
                        read_options=pacsv.ReadOptions(block_size=1 << 22),
                        convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
                    )
                    names = reader.schema.names
                    batches = iter(reader)
                else:
                    pf = pq.ParquetFile(fh)
                    names = pf.schema_arrow.names
                    batches = pf.iter_batches(batch_size=2048)
                id_field = self._pick_id_field(names, entry)
                line = 1 if kind == "csv" else 0  # csv: line 1 is the header
                for batch in batches:
                    for row in batch.to_pylist():
                        line += 1
                        yield self._make(row, id_field, entry, line)
        except (pa.ArrowInvalid, OSError) as exc:
            if isinstance(exc, PermissionError):
                raise ReadError("permission denied: make the file readable") from exc
            raise ReadError(f"cannot read {kind} records: {_brief(exc, self._secrets)}") from None
