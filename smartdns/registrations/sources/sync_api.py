"""Portal sync API (SPEC 4): the /v1 routes, /healthz and /metrics on aiohttp.

Owns authentication, body limits, validation and the HTTP status of each outcome; writes go
through the node's RegistrationSink (this node's writer, or a feed's bucket: the API does not
know which). Never logs or echoes an address or the token, and never logs an account id; peer
addresses are not logged either.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, NoReturn, Protocol, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from smartdns.config.model import Config, RegistrationsConfig
from smartdns.core.counters import Metrics
from smartdns.errors import RegistrationError, SmartDNSError, StaleWriteError
from smartdns.registrations.bulk import BULK_WORK
from smartdns.registrations.entries import (
    ShapeError,
    format_network,
    parse_version,
    validate_account_id,
)
from smartdns.registrations.json_body import decode_account, decode_snapshot
from smartdns.registrations.sink import RegistrationSink, SinkUnavailable
from smartdns.registrations.store import DatabaseError
from smartdns.registrations.store.readers import Readers
from smartdns.registrations.writer import NotInEffect

log = logging.getLogger(__name__)

# Bodies above this size are decoded and validated in a worker thread, never on the loop.
INLINE_DECODE_BYTES: Final = 64 * 1024
_PUBLIC_ROUTES: Final = frozenset({"/healthz", "/metrics"})
_METHODS: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "POST", "PATCH", "OPTIONS"})
_UNMATCHED: Final = "unmatched"  # route label for paths that match no route
_CHALLENGE: Final = 'Bearer realm="smartdns"'
_MAX_VERSION_DIGITS: Final = 19  # 2**63-1
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; tests shorten them."""

    body_s: float = 30.0  # to receive a whole request body (32 MiB at ~1 MiB/s)
    idle_s: float = 15.0  # keep-alive, and a connection whose request headers never complete
    shutdown_s: float = 5.0  # in-flight requests at shutdown, then they are cancelled
    # After refusing a request whose body it will not read, the API sends its FIN with the
    # reply, then reads and drops what still arrives this long before closing: closing with
    # unread data would reset the connection, and a reset can destroy the reply unread.
    lingering_s: float = 1.0


class Node(Protocol):
    """What the sync API reads from the rest of the process (node/status.py provides it)."""

    async def healthy(self) -> bool:
        """DNS listeners and the database up; bounds its own waits."""
        ...

    def is_degraded(self) -> bool:
        """Answering from the local copy while the registration feed is disconnected or not
        caught up (False without a feed)."""
        ...

    async def metrics_page(self) -> tuple[str, str]:
        """(content type, text) of the Prometheus exposition, the feed's families included
        when the node follows one."""
        ...


class HttpError(Exception):
    """An error response; `message` goes to the client, so it never carries client input."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _unauthorized(message: str, *, invalid_token: bool = False) -> NoReturn:
    challenge = _CHALLENGE + (', error="invalid_token"' if invalid_token else "")
    raise HttpError(401, message, {"WWW-Authenticate": challenge})


def _error_response(status: int, message: str, headers: dict[str, str]) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class _NoDetails(logging.Filter):
    """aiohttp formats the peer address into some of its lines and attaches tracebacks whose
    frames hold request data; keep the message and the exception type only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.args:
            message = message.replace("%s", "-").replace("%r", "-").replace("%d", "-")
            record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            message += f" ({record.exc_info[0].__name__})"
        record.msg = message
        record.exc_info = None
        record.exc_text = None
        return True


_HTTP_LOG: Final = logging.getLogger(__name__ + ".http")
_HTTP_LOG.addFilter(_NoDetails())


# --- bodies -------------------------------------------------------------------------------


# --- the application ----------------------------------------------------------------------


class SyncApi:
    """Request handling. `reload` swaps token, registration rules and body limit at once."""

    def __init__(
        self,
        config: Config,
        sink: RegistrationSink,
        readers: Readers,
        metrics: Metrics,
        node: Node,
        timeouts: Timeouts = Timeouts(),
    ) -> None:
        self._sink = sink  # writes: each returns once in effect on this node
        self._readers = readers  # on the connection the sink writes through (read-your-writes)
        self._metrics = metrics
        self._node = node
        self._timeouts = timeouts
        self._token = b""
        self._rules = config.registrations
        self._max_body = config.sync.max_body
        self.reload(config)

    def reload(self, config: Config) -> None:
        """Take the token and limits of a newly loaded config (already checked by load_config);
        the sink's owner reloads the sink."""
        self._token = config.sync.token.value
        self._rules = config.registrations
        self._max_body = config.sync.max_body

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._count, self._guard, self._authenticate])
        app.router.add_put("/v1/accounts/{account}", self._put_account)
        app.router.add_delete("/v1/accounts/{account}", self._delete_account)
        app.router.add_get("/v1/accounts/{account}", self._get_account)
        app.router.add_put("/v1/snapshot", self._put_snapshot)
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._render_metrics)
        return app

    # --- middlewares (outermost first) ----------------------------------------------------

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Count every answered request by method, route template and status (never the path)."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else _UNMATCHED
        method = request.method if request.method in _METHODS else "OTHER"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self._metrics.sync_requests[method, route, exc.status] += 1
            raise
        self._metrics.sync_requests[method, route, response.status] += 1
        return response

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The HTTP handler error boundary: every failure becomes a JSON error response."""
        try:
            return await handler(request)
        except HttpError as error:
            response = _error_response(error.status, error.message, error.headers)
        except RegistrationError as error:
            # SPEC 4: wrong shape 400, a broken rule of SPEC 3 422; names a position only.
            status = 400 if isinstance(error, ShapeError) else 422
            response = _error_response(status, str(error), {})
        except StaleWriteError as error:
            response = _error_response(409, str(error), {})
        except (SinkUnavailable, NotInEffect) as error:
            response = _error_response(503, str(error), {})
        except DatabaseError as error:
            log.error("sync API: %s", error)
            response = _error_response(503, "registrations database unavailable", {})
        except web.HTTPException as error:
            if error.status < 400:
                raise
            headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else {}
            response = _error_response(error.status, error.reason, headers)
        except Exception as error:
            log.error("sync API: unexpected %s while handling a request", type(error).__name__)
            response = _error_response(500, "internal error", {})
        if response.status in (408, 413) or not request.content.is_eof():
            # The rest of the body is not read (a refusal, a 401 to a request with a body):
            # the connection is done, closed right after this reply (_JsonErrors).
            response.force_close()
        return response

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Everything but /healthz and /metrics needs `Authorization: Bearer <token>`; unknown
        paths too, so an unauthenticated client learns nothing about the routes."""
        resource = request.match_info.route.resource
        if resource is None or resource.canonical not in _PUBLIC_ROUTES:
            self._check_credentials(request)
        return await handler(request)

    def _check_credentials(self, request: web.Request) -> None:
        """401 unless the one Authorization header carries our token. Credentials anywhere
        else (a cookie, the query string, Basic) are refused even next to a valid header: a
        token in a URL ends up in proxy logs and shell history."""
        if "Cookie" in request.headers:
            _unauthorized("cookies are not accepted; send Authorization: Bearer <token>")
        if any(key != "version" for key in request.query):
            _unauthorized(
                "query parameters other than version are not accepted; "
                "send the token only in the Authorization header"
            )
        values = request.headers.getall("Authorization", [])
        if not values:
            _unauthorized("missing Authorization: Bearer <token>")
        if len(values) > 1:
            _unauthorized("more than one Authorization header")
        scheme, _, presented = values[0].partition(" ")
        if scheme.lower() != "bearer":
            _unauthorized("only the Bearer scheme is accepted")
        try:
            presented_bytes = presented.strip().encode("ascii")
        except UnicodeEncodeError:
            _unauthorized("invalid token", invalid_token=True)
        # compare_digest's time depends on the lengths only, not on where the bytes differ.
        if not self._token or not hmac.compare_digest(presented_bytes, self._token):
            _unauthorized("invalid token", invalid_token=True)

    # --- request parts ----------------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, at most `sync.max_body` bytes: 413 from Content-Length before reading,
        else as soon as the running total passes the limit; 408 if it does not arrive in time."""
        if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            # The body arrives as sent (auto_decompress=False); the portal sends plain JSON,
            # and a decoder is attack surface (a zip bomb against max_body). RFC 7694 §3.
            raise HttpError(
                415,
                "Content-Encoding is not supported; send identity",
                {"Accept-Encoding": "identity"},
            )
        limit = self._max_body
        too_large = HttpError(413, f"request body is over {limit} bytes (sync.max_body)")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = bytearray()
        try:
            async with asyncio.timeout(self._timeouts.body_s):
                async for chunk in request.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise too_large
        except TimeoutError:
            raise HttpError(408, "request body not received in time") from None
        return bytes(body)

    async def _parse(self, body: bytes, parse: Callable[[bytes, RegistrationsConfig], _T]) -> _T:
        """Decode and validate; a large body in a worker thread so DNS is never stalled."""
        if len(body) <= INLINE_DECODE_BYTES:
            return parse(body, self._rules)
        return await asyncio.to_thread(parse, body, self._rules)

    @staticmethod
    def _account(request: web.Request) -> str:
        return validate_account_id(request.match_info["account"])

    @staticmethod
    def _delete_version(request: web.Request) -> int:
        values = request.query.getall("version", [])
        if len(values) != 1:
            raise ShapeError("version", "give exactly one ?version=N")
        text = values[0]
        if not (text.isascii() and text.isdigit()) or len(text) > _MAX_VERSION_DIGITS:
            raise ShapeError("version", "must be an integer between 0 and 2**63-1")
        return parse_version(int(text))

    # --- routes ---------------------------------------------------------------------------

    async def _put_account(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        account = self._account(request)
        version, networks, hostnames, devices = await self._parse(body, decode_account)
        record = await self._sink.put_account(account, version, networks, hostnames, devices)
        return web.json_response(
            {
                "account": account,
                "version": record.version,
                "addresses": len(record.networks),
                "hostnames": len(record.hostnames),
                "device_ids": len(record.devices),
            }
        )

    async def _delete_account(self, request: web.Request) -> web.Response:
        account = self._account(request)
        version = self._delete_version(request)
        existed = await self._sink.delete_account(account, version)
        return web.json_response({"account": account, "version": version, "existed": existed})

    async def _get_account(self, request: web.Request) -> web.Response:
        account = self._account(request)
        record = await self._readers.get_account(account)
        if record is None:
            raise HttpError(404, "no such account")
        return web.json_response(
            {
                "account": record.account,
                "version": record.version,
                "addresses": [format_network(network) for network in record.networks],
                "hostnames": list(record.hostnames),
                "device_ids": len(record.devices),  # SPEC 3: the count, never IDs or digests
            }
        )

    async def _put_snapshot(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        loop = asyncio.get_running_loop()
        with BULK_WORK:
            started = loop.time()
            snapshot = await self._parse(body, decode_snapshot)
            del body
            validated = loop.time()
            version = snapshot.version
            holder = [snapshot]
            del snapshot  # freed once stored, before the DNS side loads the new set
            result = await self._sink.replace_snapshot(holder)
        log.info(
            "snapshot version %d applied: %d accounts, %d entries "
            "(validated in %.2f s, stored in %.2f s)",
            version,
            result.accounts,
            result.entries,
            validated - started,
            loop.time() - validated,
        )
        return web.json_response(
            {
                "version": version,
                "accounts": result.accounts,
                "entries": result.entries,
                "device_ids": result.devices,
            }
        )

    async def _status(self, _request: web.Request) -> web.Response:
        status = await self._readers.status()
        return web.json_response(
            {
                "accounts": status.accounts,
                "entries": status.entries,
                "snapshot_version": status.snapshot_version,
            }
        )

    async def _healthz(self, _request: web.Request) -> web.Response:
        """200 `ok`; 200 `degraded` while DNS answers from the local copy but the feed is
        disconnected or not caught up (not down: the node serves); 503 `unavailable`."""
        if not await self._node.healthy():
            return web.Response(status=503, text="unavailable\n")
        if self._node.is_degraded():
            return web.Response(text="degraded\n")
        return web.Response(text="ok\n")

    async def _render_metrics(self, _request: web.Request) -> web.Response:
        content_type, text = await self._node.metrics_page()
        return web.Response(body=text.encode(), headers={"Content-Type": content_type})


# --- the server ---------------------------------------------------------------------------


class _JsonErrors(RequestHandler):
    """aiohttp's connection handler, with the errors it answers itself made JSON.

    The HTTP parser's failures (a control character in a header, an over-long line, a bad
    request line, an unsupported Content-Encoding, a bad chunk) and a handler that escapes
    every middleware end in `handle_error`, which by default answers text/plain quoting the
    offending request line or header: the bearer token and body addresses included. Here the
    reply is `{"error": <the status's phrase>}` and the log line names the exception type only.

    A reply that closes the connection is followed at once by our FIN: aiohttp would keep
    the connection open while it lingers over the unread body (10 s by default), leaving a
    refused client waiting; the lingering that remains (`Timeouts.lingering_s`) only drains.
    """

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        finished = await super().finish_response(request, resp, start_time)
        transport = self.transport
        if not resp.keep_alive and transport is not None and transport.can_write_eof():
            transport.write_eof()
        return finished

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        _HTTP_LOG.debug("malformed HTTP request (%s)", type(exc).__name__ if exc else status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        try:
            reason = HTTPStatus(status).phrase.lower()
        except ValueError:
            reason = "error"
        response = _error_response(status, reason, {})
        response.force_close()  # the parser cannot resynchronize on this connection
        return response


class _Runner(web.AppRunner):
    """An AppRunner whose connections are handled by `_JsonErrors`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no hook for the parser's error replies (aio-libs/aiohttp#3287, #9882):
        # its Server builds a RequestHandler per connection, so use a Server that builds ours.
        server.__class__ = _JsonErrorServer
        return server


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrors(self, loop=self._loop, **self._kwargs)


class SyncServer:
    """The running API: its aiohttp runner (the sink and its store belong to the caller)."""

    def __init__(self, runner: web.AppRunner, api: SyncApi) -> None:
        self._runner: web.AppRunner | None = runner
        self.api = api

    @property
    def port(self) -> int:
        """The bound TCP port (useful when the config asked for port 0)."""
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    def reload(self, config: Config) -> None:
        self.api.reload(config)

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded). Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def start_sync_api(
    config: Config,
    sink: RegistrationSink,
    readers: Readers,
    metrics: Metrics,
    node: Node,
    timeouts: Timeouts = Timeouts(),
) -> SyncServer:
    """Bind `sync.listen` and serve, writing through `sink` and reading through `readers`.
    Raises SmartDNSError when the address cannot be bound."""
    api = SyncApi(config, sink, readers, metrics, node, timeouts)
    runner = _Runner(
        api.application(),
        handle_signals=False,
        access_log=None,  # it would log peer addresses (SPEC 7)
        logger=_HTTP_LOG,
        keepalive_timeout=timeouts.idle_s,
        shutdown_timeout=timeouts.shutdown_s,
        lingering_time=timeouts.lingering_s,
        # Bodies reach _read_body as sent, so every Content-Encoding but identity gets its 415
        # there: the parser would inflate gzip and deflate itself and refuse br or zstd with 400.
        auto_decompress=False,
    )
    try:
        await runner.setup()
        listen = config.sync.listen
        site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError as error:
            raise SmartDNSError(
                f"cannot listen on {listen} (sync API): {error.strerror or error}"
            ) from None
    except BaseException:
        await runner.cleanup()
        raise
    return SyncServer(runner, api)
