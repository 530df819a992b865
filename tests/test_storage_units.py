"""Object-store plumbing without a server: change tokens, storage options and their secrets,
and the download-once path of a store whose ETag is not a content hash (an fsspec memory
filesystem that gives every upload a new ETag, as Azure Blob does without Content-MD5)."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections import Counter
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from pydantic import SecretStr, ValidationError

from tasks.errors import ConfigurationError
from tasks.settings import IngestParams, SourceSettings, TableAccess
from tasks.sources import change_token, is_transient
from tasks.storage import (
    MASK,
    lance_options,
    masked,
    parse_options,
    redact_text,
    redact_uri,
    split_credentials,
)

SECRET = "very-secret-value-123"


def test_change_tokens_prefer_a_content_hash_from_the_listing():
    md5 = hashlib.md5(b"hello").digest()
    assert change_token({"ETag": f'"{md5.hex()}"'}) == f"md5:{md5.hex()}"  # S3 single-part
    assert change_token({"ETag": '"abc123-4"'}) == "etag:abc123-4"  # S3 multipart
    # GCS: md5Hash (base64) wins over the generation-specific etag
    gcs = {"md5Hash": base64.b64encode(md5).decode(), "etag": "CJ+7", "generation": "17"}
    assert change_token(gcs) == f"md5:{md5.hex()}"
    # Azure: Content-MD5 when the uploader set one (bytes), else the per-write etag
    azure = {"content_settings": {"content_md5": bytearray(md5)}, "etag": "0x8D"}
    assert change_token(azure) == f"md5:{md5.hex()}"
    assert change_token({"content_settings": {"content_md5": None}, "etag": '"0x8D1"'}) == (
        "etag:0x8d1"
    )
    assert change_token({"VersionId": "v7"}) == "version:v7"
    assert change_token({"size": 3, "mtime": 1.0}) is None  # a local file: size and time


def test_transient_errors_are_retried_and_the_rest_are_not():
    assert is_transient(ConnectionResetError("reset by peer"))
    assert is_transient(OSError("503 SlowDown: Please reduce your request rate"))
    assert is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(PermissionError("AccessDenied"))
    assert not is_transient(ValueError("bad pdf"))


def test_secret_storage_options_are_masked_wherever_they_are_shown():
    opts = parse_options([f"secret={SECRET}", "anon=false", "endpoint_url=http://h:9000"])
    assert isinstance(opts["secret"], SecretStr) and opts["anon"] is False
    settings = SourceSettings(uri="s3://b/p", storage_options=opts)
    assert SECRET not in settings.model_dump_json() and SECRET not in repr(settings)
    params = IngestParams.model_validate({"source": settings.model_dump()})
    shown = params.flow_parameters()
    assert shown["files"]["storage_options"]["secret"] == MASK
    # a flow called in this process gets the real value; Prefect stores it masked
    kept = params.flow_parameters(secrets=True)["files"]["storage_options"]["secret"]
    assert isinstance(kept, SecretStr) and kept.get_secret_value() == SECRET
    from fastapi.encoders import jsonable_encoder

    assert SECRET not in str(jsonable_encoder(params.flow_parameters(secrets=True)))
    # a run started from stored (masked) parameters is refused with what to do instead
    with pytest.raises(ValidationError, match="credentials block"):
        TableAccess(storage_options={"aws_secret_access_key": MASK})
    assert masked({"account_key": "k", "region": "r"}) == {"account_key": MASK, "region": "r"}


def test_credentials_in_a_url_move_out_of_it_and_urls_are_redacted():
    uri, creds = split_credentials("s3://AKIAXXXX:topsecret@bucket/docs")
    assert uri == "s3://bucket/docs" and creds["secret"].get_secret_value() == "topsecret"
    source = SourceSettings(uri="s3://AKIAXXXX:topsecret@bucket/docs")
    assert source.uri == "s3://bucket/docs" and "topsecret" not in source.model_dump_json()
    assert redact_uri("s3://k:s@bucket/p") == "s3://***@bucket/p"
    # AWS secret keys may hold '/', percent-encoded or not; '@' later in a path is no user part
    for url in ("s3://AKIAX:ab/cd@bucket/p", "s3://AKIAX:ab%2Fcd@bucket/p"):
        uri, creds = split_credentials(url)
        assert uri == "s3://bucket/p" and creds["secret"].get_secret_value() == "ab/cd"
        assert "ab" not in redact_uri(url)
    assert split_credentials("s3://bucket/dir@x/f") == ("s3://bucket/dir@x/f", {})
    assert redact_uri("abfs://container@acct.dfs.core.windows.net/p") == (
        "abfs://container@acct.dfs.core.windows.net/p"
    )
    assert "sig=***" in redact_uri("https://a.blob.core.windows.net/c/x?sv=1&sig=abcdef")
    text = redact_text(
        f"403 for AKIAIOSFODNN7EXAMPLE with {SECRET} at s3://u:p@b/k",
        {"secret": SecretStr(SECRET)},
    )
    assert SECRET not in text and "AKIAIOSFODNN7EXAMPLE" not in text and "u:p@" not in text


def test_the_standard_variables_reach_a_table_too(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.delenv("AWS_ENDPOINT", raising=False)
    opts = lance_options("s3://bucket/db", {"aws_region": "eu-west-1"})
    assert opts["aws_endpoint"] == "http://127.0.0.1:9000" and opts["allow_http"] == "true"
    assert opts["aws_region"] == "eu-west-1"  # an explicit option wins
    assert lance_options("/local/db", None) == {}
    with pytest.raises(ConfigurationError, match="KEY=VALUE"):
        parse_options(["no-equals-sign"])


class EtagMemoryFS(MemoryFileSystem):
    """A memory bucket whose listing gives every upload a new ETag that is not a content hash
    (Azure Blob without Content-MD5, S3 with SSE-KMS), and no modification time."""

    protocol = ("etagmem",)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    etags: ClassVar[dict[str, str]] = {}
    downloads: ClassVar[Counter[str]] = Counter()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if path.startswith("etagmem://"):
            path = path[len("etagmem://") :]
        return super()._strip_protocol(path)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        super().pipe_file(path, value, *args, **kwargs)
        self.etags[self._strip_protocol(path)] = f'"0x{uuid.uuid4().hex[:16].upper()}"'

    def _with_etag(self, info: dict[str, Any]) -> dict[str, Any]:
        name = self._strip_protocol(info["name"])
        if info.get("type") == "file" and name in self.etags:
            info = {**info, "etag": self.etags[name]}
        info.pop("created", None)
        return info

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        out = super().ls(path, detail=detail, **kwargs)
        return [self._with_etag(i) for i in out] if detail else out

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._with_etag(super().info(path, **kwargs))

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kwargs: Any) -> bytes:
        self.downloads[self._strip_protocol(path)] += 1
        return super().cat_file(path, start=start, end=end, **kwargs)


@pytest.mark.usefixtures("prefect_harness")
def test_a_new_etag_on_the_same_bytes_costs_one_download_then_none(tmp_path):
    from flows.ingest import run_ingest

    fsspec.register_implementation("etagmem", EtagMemoryFS, clobber=True)
    fs = EtagMemoryFS()
    docs = {
        "/az/docs/a.md": b"# A\n\nThe first document.",
        "/az/docs/sub/b.txt": b"The second document, one folder down.",
        "/az/docs/sub/c.txt": "세 번째 문서입니다.".encode(),
    }
    for path, data in docs.items():
        fs.pipe_file(path, data)
    params = IngestParams.model_validate(
        {
            "source": {"uri": "etagmem://az/docs"},
            "store": {"uri": str(tmp_path / "db")},
            "embedder": {"kind": "hash"},
        }
    )

    def run() -> tuple[tuple[int, int, int], int]:
        EtagMemoryFS.downloads.clear()
        d = run_ingest(params).documents
        return (d.new, d.changed, d.unchanged), sum(EtagMemoryFS.downloads.values())

    assert run() == ((3, 0, 0), 3)
    assert run() == ((0, 0, 3), 0)  # no modification times, but the tokens are unchanged
    for path, data in docs.items():  # re-synced: same bytes, new ETags
        fs.pipe_file(path, data)
    assert run() == ((0, 0, 3), 3)  # downloaded once, found identical by hash, not re-embedded
    assert run() == ((0, 0, 3), 0)  # the new ETags were recorded
    fs.pipe_file("/az/docs/sub/b.txt", b"The second document, edited.")
    assert run() == ((0, 1, 2), 1)


def test_credentials_blocks_map_to_each_librarys_options():
    from tasks.storage import _from_block

    aws = {
        "_type": "aws-credentials",
        "aws_access_key_id": "AKIAEXAMPLE",
        "aws_secret_access_key": SecretStr(SECRET),
        "region_name": "eu-west-1",
        "aws_client_parameters": {"endpoint_url": "http://minio:9000"},
    }
    src = _from_block(aws, for_lance=False)
    assert src["secret"].get_secret_value() == SECRET and src["endpoint_url"] == "http://minio:9000"
    assert src["client_kwargs"] == {"region_name": "eu-west-1"}
    tbl = _from_block(aws, for_lance=True)
    assert tbl["aws_endpoint"] == "http://minio:9000" and tbl["allow_http"] == "true"
    assert tbl["aws_secret_access_key"].get_secret_value() == SECRET
    gcp = {
        "_type": "gcp-credentials",
        "service_account_info": {"private_key": SECRET},
        "project": "p",
    }
    assert _from_block(gcp, for_lance=False)["token"].keys() >= {"private_key"}
    assert (
        SECRET in _from_block(gcp, for_lance=True)["google_service_account_key"].get_secret_value()
    )
    az = {
        "_type": "azure-blob-storage-credentials",
        "connection_string": SecretStr(
            f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET};"
            "BlobEndpoint=https://acct.blob.core.windows.net/;"
        ),
    }
    lance = _from_block(az, for_lance=True)
    assert lance["azure_storage_account_name"] == "acct" and "allow_http" not in lance
    assert lance["azure_storage_account_key"].get_secret_value() == SECRET
    with pytest.raises(ConfigurationError, match="not a credentials block"):
        _from_block({"_type": "secret"}, for_lance=False)


def test_serve_gives_its_deployments_the_source_and_table_options():
    from flows.service import serve_deployments

    deployments = serve_deployments(
        "s3://docs/p",
        "s3://idx/db",
        "queries.jsonl",
        files={"credentials_block": "aws-credentials/src", "storage_options": {}},
        table_access={"credentials_block": "aws-credentials/tbl", "storage_options": {}},
    )
    by_name = {d.name: d.parameters for d in deployments}
    assert by_name["nightly"]["files"]["credentials_block"] == "aws-credentials/src"
    for name in ("nightly", "manual", "weekly", "after-ingest"):
        assert by_name[name]["table_access"]["credentials_block"] == "aws-credentials/tbl"
