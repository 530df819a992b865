"""Object-store access: storage options, credentials from Prefect blocks, and keeping secrets out
of everything that is shown or stored.

A source (read through fsspec: s3fs, gcsfs, adlfs) and a table (read and written by LanceDB's
object store) take different option names for the same thing. Users give either library's own
names in `storage_options`; credentials come from the standard provider chains and environment
variables, or from a Prefect credentials block named in the flow parameters, which is read from
the Prefect API at run time (its secrets never pass through flow parameters).

Option values whose key names a secret (key, secret, token, password, ...) are held as pydantic
`SecretStr`: Prefect stores flow parameters with such values as `**********`, reports and logs
show them masked, and only the filesystem or LanceDB connection sees the real value.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from tasks.errors import ConfigurationError

log = logging.getLogger(__name__)

MASK = "**********"

#: option keys whose values are secrets (matched anywhere in the lower-cased key)
_SECRET_KEY = re.compile(
    r"secret|password|passwd|token|credential|private|sas|signature|connection_string|"
    r"account_key|access_key|(^|_)key$|^key|service_account_key|client_secret"
)

#: the Prefect block type read for a scheme when a block name has no `type/` prefix
BLOCK_TYPES = {
    "s3": "aws-credentials",
    "gs": "gcp-credentials",
    "az": "azure-blob-storage-credentials",
}

_SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "s3n": "s3",
    "s3+ddb": "s3",  # Lance's DynamoDB commit store
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "abfs": "az",
    "abfss": "az",
    "adl": "az",
}


def local_path(uri: str) -> str | None:
    """The path of a local location, a plain path or a file:// URL, with the user's '~'
    expanded as fsspec expands it; None for a bucket or any other scheme."""
    if "://" in uri and not uri.startswith("file://"):
        return None
    return os.path.expanduser(uri.removeprefix("file://"))


def scheme_of(uri: str) -> str:
    """'s3', 'gs', 'az', 'file', or another fsspec protocol, for a location."""
    if "://" not in uri:
        return "file"
    raw = uri.split("://", 1)[0].lower()
    return _SCHEMES.get(raw, raw)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key.lower()))


def _mapped(options: dict[str, Any] | None, leaf: Callable[[str, Any], Any]) -> dict[str, Any]:
    """The options with `leaf(key, value)` applied to every value that is not a dict (nested
    dicts are walked)."""
    return {
        key: _mapped(value, leaf) if isinstance(value, dict) else leaf(str(key), value)
        for key, value in (options or {}).items()
    }


def _is_secret(key: str, value: Any) -> bool:
    return isinstance(value, SecretStr) or (is_secret_key(key) and value is not None)


def _plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _protect_leaf(key: str, value: Any) -> Any:
    if isinstance(value, SecretStr) or not _is_secret(key, value):
        return value
    if value == MASK:
        raise ValueError(
            f"storage option {key!r} arrived masked ({MASK}): secrets are never stored "
            "with flow parameters. Give them through a credentials block "
            "(credentials_block) or the worker's environment."
        )
    return SecretStr(str(value))


def protect(options: dict[str, Any] | None) -> dict[str, Any]:
    """Options with every secret value wrapped in SecretStr (nested dicts too). A value that
    arrives already masked (a flow run started from stored parameters) is refused."""
    return _mapped(options, _protect_leaf)


def reveal(options: dict[str, Any] | None) -> dict[str, Any]:
    """The options with their real values: only for the filesystem or database connection."""
    return _mapped(options, lambda _key, value: _plain(value))


def masked(options: dict[str, Any] | None) -> dict[str, Any]:
    """The options as they may be shown: secrets replaced by the mask."""
    return _mapped(options, lambda key, value: MASK if _is_secret(key, value) else value)


def parse_option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from the command line. A value that parses as JSON (true, 5, {...}) is taken
    as such, except for secret keys, which stay strings."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigurationError(
            f"storage option {text.split('=', 1)[0]!r} is not KEY=VALUE (e.g. "
            "endpoint_url=http://127.0.0.1:9000)"
        )
    if is_secret_key(key):
        return key, SecretStr(value)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_options(items: list[str] | None) -> dict[str, Any]:
    return dict(parse_option(item) for item in items or [])


# ---- locations ---------------------------------------------------------------------------


_QUERY_SECRET = re.compile(r"(?i)((?:sig|signature|token|key|secret|password|x-amz-[a-z-]+)=)[^&]*")


#: `user[:secret]@host/path`: the user part of a URL. A secret may hold '/' (AWS secret keys
#: do); the host is what follows the first '@' after it, so '@' later in a path is no user part
_USERINFO = re.compile(r"^(?P<user>[^/@:]+:[^@]*|[^/@:]+)@(?P<rest>[^/@]+(?:[/?].*)?)$", re.S)


def userinfo(rest: str) -> tuple[str, str] | None:
    """(user part, host and path) of what follows `scheme://`, or None without a user part."""
    m = _USERINFO.match(rest)
    return (m["user"], m["rest"]) if m else None


def redact_uri(uri: str) -> str:
    """A location as it may be shown: a password or key in the URL's user part and secret
    query values masked (`s3://***@bucket/p`, `https://a.blob.core.windows.net/c?sig=***`).
    Azure's `abfs://container@account...` names no secret and is kept."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    found = userinfo(rest)
    if found and (":" in found[0] or scheme_of(uri) != "az"):
        rest = f"***@{found[1]}"
    rest = _QUERY_SECRET.sub(r"\1***", rest)
    return f"{scheme}://{rest}"


def split_credentials(uri: str) -> tuple[str, dict[str, Any]]:
    """`s3://KEY:SECRET@bucket/p` -> (`s3://bucket/p`, {'key': ..., 'secret': ...}): keys in
    a URL's user part (percent-encoded or not) move into secret storage options, so the
    location that is stored and shown carries none. Other URLs are returned as they are."""
    if "://" not in uri or scheme_of(uri) not in ("s3", "gs"):
        return uri, {}
    scheme, rest = uri.split("://", 1)
    found = userinfo(rest)
    if not found:
        return uri, {}
    user, remainder = found
    if scheme_of(uri) == "gs":
        raise ConfigurationError(
            f"{redact_uri(uri)}: credentials in a gs:// URL are not supported. Use "
            "GOOGLE_APPLICATION_CREDENTIALS or a gcp-credentials block."
        )
    key, _, secret = user.partition(":")
    options = {"key": SecretStr(unquote(key)), "secret": SecretStr(unquote(secret))}
    return f"{scheme}://{remainder}", options


def redact_text(text: str, options: dict[str, Any] | None = None) -> str:
    """An error message with every secret value of `options` (and URL secrets) masked."""
    for value in _secret_values(options):
        if value and len(value) >= 4:
            text = text.replace(value, MASK)
    # AWS access key ids (a store's error body may echo them) and signature material
    text = re.sub(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", MASK, text)
    text = re.sub(r"(?s)<(StringToSign|CanonicalRequest|SignatureProvided)>.*?</\1>", "", text)
    return re.sub(r"[a-z0-9+]+://[^\s'\"]+", lambda m: redact_uri(m.group(0)), text)


def _secret_values(options: dict[str, Any] | None) -> list[str]:
    found: list[str] = []

    def collect(key: str, value: Any) -> None:
        if _is_secret(key, value) and isinstance(_plain(value), str):
            found.append(_plain(value))

    _mapped(options, collect)
    return found


# ---- credentials blocks ------------------------------------------------------------------


def read_block(name: str, scheme: str) -> dict[str, Any]:
    """The fields of a Prefect credentials block (secrets included), read from the Prefect API
    by name: `aws-credentials/prod`, or `prod` with the type taken from the scheme. The block's
    Python package need not be installed on the worker."""
    slug, _, block = name.partition("/") if "/" in name else (BLOCK_TYPES.get(scheme, ""), "", name)
    if not slug:
        raise ConfigurationError(
            f"credentials block {name!r}: give it as TYPE/NAME (e.g. aws-credentials/{name})"
        )
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(
                name=block, block_type_slug=slug, include_secrets=True
            )
    except ObjectNotFound as exc:
        raise ConfigurationError(
            f"no Prefect block {slug}/{block}: create it in the UI (Blocks) or with "
            f"`prefect block create {slug}`"
        ) from exc
    data: dict[str, Any] = dict(doc.data or {})
    data["_type"] = slug
    return data


def _from_block(data: dict[str, Any], for_lance: bool) -> dict[str, Any]:
    """A credentials block's fields as fsspec (`for_lance=False`) or LanceDB storage options."""
    kind = data.get("_type", "")
    get = lambda k: _plain(data.get(k))  # noqa: E731
    out: dict[str, Any] = {}
    if kind == "aws-credentials":
        params = get("aws_client_parameters") or {}
        endpoint = params.get("endpoint_url") if isinstance(params, dict) else None
        key, secret, token = (
            get("aws_access_key_id"),
            get("aws_secret_access_key"),
            get("aws_session_token"),
        )
        region = get("region_name")
        if for_lance:
            out.update(
                aws_access_key_id=key,
                aws_secret_access_key=secret,
                aws_session_token=token,
                aws_region=region,
                aws_endpoint=endpoint,
            )
            if endpoint and str(endpoint).startswith("http://"):
                out["allow_http"] = "true"
        else:
            out.update(key=key, secret=secret, token=token, profile=get("profile_name"))
            client_kwargs = {k: v for k, v in {"region_name": region}.items() if v}
            if endpoint:
                out["endpoint_url"] = endpoint
            if client_kwargs:
                out["client_kwargs"] = client_kwargs
    elif kind == "gcp-credentials":
        info = get("service_account_info")
        info = reveal(info) if isinstance(info, dict) else info
        path = get("service_account_file")
        if for_lance:
            if info:
                out["google_service_account_key"] = json.dumps(info)
            elif path:
                out["google_service_account"] = str(path)
        else:
            out["token"] = info if info else (str(path) if path else None)
            out["project"] = get("project")
    elif kind.startswith("azure"):
        conn = get("connection_string")
        account_url = get("account_url")
        if for_lance:
            parts = _parse_connection_string(conn) if conn else {}
            out.update(
                azure_storage_account_name=parts.get("AccountName"),
                azure_storage_account_key=parts.get("AccountKey"),
                azure_storage_sas_token=parts.get("SharedAccessSignature"),
                azure_storage_endpoint=parts.get("BlobEndpoint"),
            )
            if str(parts.get("BlobEndpoint", "")).startswith("http://"):
                out["allow_http"] = "true"  # a local emulator (Azurite)
            if account_url and not conn:
                out["azure_storage_account_name"] = urlsplit(str(account_url)).netloc.split(".")[0]
        else:
            out["connection_string"] = conn
            if account_url and not conn:
                out["account_name"] = urlsplit(str(account_url)).netloc.split(".")[0]
    else:
        raise ConfigurationError(
            f"block type {kind!r} is not a credentials block lanceflow reads: use "
            "aws-credentials, gcp-credentials or azure-blob-storage-credentials"
        )
    return protect({k: v for k, v in out.items() if v not in (None, "", {})})


def _parse_connection_string(conn: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for item in str(conn).split(";"):
        k, sep, v = item.partition("=")
        if sep:
            parts[k.strip()] = v.strip()
    return parts


# ---- options for each library --------------------------------------------------------------


def fsspec_options(
    uri: str, options: dict[str, Any] | None, block: str | None = None
) -> dict[str, Any]:
    """The keyword arguments fsspec's filesystem for `uri` gets (real secret values)."""
    scheme = scheme_of(uri)
    merged: dict[str, Any] = {}
    if block:
        merged.update(_from_block(read_block(block, scheme), for_lance=False))
    merged.update(options or {})
    return reveal(merged)


def lance_options(
    uri: str, options: dict[str, Any] | None, block: str | None = None
) -> dict[str, str]:
    """The storage options LanceDB's object store gets for a table at `uri`.

    Lance reads the standard variables itself (AWS_*, GOOGLE_*, AZURE_*); the two that the
    AWS SDKs and Lance spell differently are mapped here, so one environment serves sources
    and tables alike: AWS_ENDPOINT_URL (-> aws_endpoint) and, for a plain-http endpoint,
    AWS_ALLOW_HTTP.
    """
    scheme = scheme_of(uri)
    merged: dict[str, Any] = {}
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and not os.environ.get("AWS_ENDPOINT"):
            merged["aws_endpoint"] = endpoint
        if is_ddb(uri):
            # Lance's DynamoDB client reads neither of the SDKs' endpoint variables: without
            # this, an S3-compatible setup (LocalStack, moto) reaches AWS for its commits
            ddb = os.environ.get("AWS_ENDPOINT_URL_DYNAMODB") or os.environ.get("AWS_ENDPOINT_URL")
            if ddb:
                merged["dynamodb_endpoint"] = ddb
        if os.environ.get("AWS_ALLOW_HTTP"):
            merged["allow_http"] = os.environ["AWS_ALLOW_HTTP"]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            merged["aws_region"] = region
    if block:
        merged.update(_from_block(read_block(block, scheme), for_lance=True))
    merged.update(options or {})
    plain = reveal(merged)
    return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in plain.items()}


# ---- s3+ddb: Lance's DynamoDB commit store ----------------------------------------------------

#: the key schema Lance's DynamoDB commit store writes: one item per committed version
DDB_KEYS = {"base_uri": "HASH", "version": "RANGE"}


def is_ddb(uri: str) -> bool:
    return uri.lower().startswith("s3+ddb://")


def ddb_table_name(uri: str) -> str:
    """The DynamoDB table an `s3+ddb://bucket/path?ddbTableName=NAME` table commits through."""
    from urllib.parse import parse_qs

    names = parse_qs(urlsplit(uri).query).get("ddbTableName", [])
    if not names or not names[0]:
        raise ConfigurationError(
            f"{redact_uri(uri)}: an s3+ddb:// table names its DynamoDB commit store: "
            "s3+ddb://bucket/path?ddbTableName=TABLE"
        )
    return names[0]


def _first(options: dict[str, str], *keys: str) -> str | None:
    return next((options[k] for k in keys if options.get(k)), None)


def check_commit_store(uri: str, options: dict[str, str] | None) -> None:
    """Before anything is written to an `s3+ddb://` table: its DynamoDB table exists, with
    the key schema Lance writes (`base_uri` hash key, `version` range key), and answers with
    the table's credentials, region and endpoint. Lance reports each of those faults at the
    first commit as an opaque SDK error. Needs botocore (every s3fs install has it);
    without it, Lance's own errors stand."""
    if not is_ddb(uri):
        return
    name = ddb_table_name(uri)
    try:
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - an install without s3fs
        return
    opts = options or {}
    endpoint = _first(opts, "dynamodb_endpoint")
    limits: dict[str, Any] = {
        "connect_timeout": 10,
        "read_timeout": 20,
        "retries": {"max_attempts": 3},
    }
    try:
        # the endpoint Lance will use, not one from ~/.aws/config or AWS_ENDPOINT_URL (which
        # Lance's DynamoDB client does not read; lance_options maps the variables)
        config = Config(**limits, ignore_configured_endpoint_urls=True)
    except TypeError:  # pragma: no cover - botocore before 1.31 has no configured endpoints
        config = Config(**limits)
    client = botocore.session.get_session().create_client(
        "dynamodb",
        region_name=_first(opts, "aws_region", "region") or None,
        endpoint_url=endpoint,
        aws_access_key_id=_first(opts, "aws_access_key_id", "access_key_id"),
        aws_secret_access_key=_first(opts, "aws_secret_access_key", "secret_access_key"),
        aws_session_token=_first(opts, "aws_session_token", "session_token", "token"),
        config=config,
    )
    where = f"DynamoDB table {name!r} (the commit store of {redact_uri(uri)})" + (
        f" at {redact_uri(endpoint)}" if endpoint else ""
    )
    create = (
        "create it with hash key base_uri (string) and range key version (number): "
        f"aws dynamodb create-table --table-name {name} --attribute-definitions "
        "AttributeName=base_uri,AttributeType=S AttributeName=version,AttributeType=N "
        "--key-schema AttributeName=base_uri,KeyType=HASH "
        "AttributeName=version,KeyType=RANGE --billing-mode PAY_PER_REQUEST"
    )
    check = (
        "Check the table's credentials and region (--table-option aws_region=..., or "
        "AWS_REGION), and for a DynamoDB-compatible server dynamodb_endpoint (or "
        "AWS_ENDPOINT_URL_DYNAMODB)"
    )
    try:
        table = client.describe_table(TableName=name)["Table"]
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "ResourceNotFoundException":
            raise ConfigurationError(f"{where} does not exist: {create}") from None
        why = redact_text(str(exc), opts)
        raise ConfigurationError(f"{where}: {code or 'error'}: {why}. {check}") from None
    except BotoCoreError as exc:
        why = redact_text(str(exc), opts)
        raise ConfigurationError(f"{where} cannot be reached: {why}. {check}") from None
    finally:
        client.close()
    keys = {k["AttributeName"]: k["KeyType"] for k in table.get("KeySchema", [])}
    if keys != DDB_KEYS:
        raise ConfigurationError(
            f"{where} has the key schema {keys}, not the one Lance writes ({DDB_KEYS}): "
            f"use another table, and {create}"
        )
