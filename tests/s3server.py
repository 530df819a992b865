"""A real S3-compatible server on loopback (moto's server mode) that counts what it serves.

moto's WSGI application is served by werkzeug in a thread, behind a small middleware that
counts requests by kind (object GET, listing, HEAD, PUT) and object, tracks how many object
GETs run at once, and injects faults: a prefix whose listing is refused, an object whose
first GETs fail with 503 SlowDown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, unquote

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class S3Server:
    """moto's S3 on 127.0.0.1:<free port>, counting requests."""

    def __init__(self, get_delay: float = 0.0) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        self.app = DomainDispatcherApplication(create_backend_app)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.object_gets: Counter[str] = Counter()  # "bucket/key" -> GETs
        self.in_flight = 0
        self.peak_in_flight = 0
        self.get_delay = get_delay
        self.denied_prefixes: set[str] = set()  # "bucket/prefix/": listings refused (403)
        self.slow_down: dict[str, int] = {}  # "bucket/key" -> GETs still to refuse
        self.server = make_server(
            "127.0.0.1", 0, self._wsgi, threaded=True, request_handler=MotoRequestHandler
        )
        host, port = self.server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> S3Server:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)

    def dynamodb_table(
        self, name: str, key_id: str, secret: str, keys: tuple[str, str] = ("base_uri", "version")
    ) -> Any:
        """A DynamoDB table on this server (moto serves every AWS API it emulates on one
        port), keyed like Lance's commit store unless `keys` says otherwise; its client."""
        import boto3

        client = boto3.client(
            "dynamodb",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )
        hash_key, range_key = keys
        client.create_table(
            TableName=name,
            KeySchema=[
                {"AttributeName": hash_key, "KeyType": "HASH"},
                {"AttributeName": range_key, "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": hash_key, "AttributeType": "S"},
                {"AttributeName": range_key, "AttributeType": "N"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        return client

    # ---- counters ------------------------------------------------------------------------

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.object_gets.clear()
            self.peak_in_flight = 0

    @property
    def gets(self) -> int:
        """Object GETs (content downloads) since the last reset."""
        return self.counts["object_get"]

    # ---- the middleware --------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        # WSGI gives the path as latin-1 text of its UTF-8 bytes
        raw = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
        path = unquote(raw).lstrip("/")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        bucket, _, key = path.partition("/")
        if method == "GET" and key and not query.keys() & {"uploads", "tagging", "acl"}:
            kind = "object_get"
        elif method == "GET" and not key and ("list-type" in query or "prefix" in query):
            kind = "list"
        else:
            kind = method.lower()
        with self.lock:
            self.counts[kind] += 1
            if method == "PUT" and environ.get("HTTP_IF_NONE_MATCH") == "*":
                self.counts["conditional_put"] += 1  # create-only: a commit that cannot clobber
            if kind == "object_get":
                self.object_gets[path] += 1
        if kind == "list":
            prefix = query.get("prefix", [""])[0]
            if any(f"{bucket}/{prefix}".startswith(p) for p in self.denied_prefixes):
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                return [_DENIED]
        if kind != "object_get":
            return self.app(environ, start_response)
        with self.lock:
            refuse = self.slow_down.get(path, 0)
            if refuse:
                self.slow_down[path] = refuse - 1
        if refuse:
            start_response("503 Slow Down", [("Content-Type", "application/xml")])
            return [_SLOW_DOWN]
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.get_delay:
                time.sleep(self.get_delay)
            return list(self.app(environ, start_response))
        finally:
            with self.lock:
                self.in_flight -= 1
