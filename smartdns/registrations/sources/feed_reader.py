"""The feed's reader: one pull consumer on the bucket's stream, read in batches.

It owns the NATS side of following the bucket and nothing else: it makes an ephemeral pull
consumer (every message, or every message after a revision: never "last per subject", whose
cost grows with the bucket), keeps two fetch requests in flight so the next batch is on its
way while one is applied, and turns each delivered message into a feed_follow.BucketMessage
(revision, consumer sequence and what is still pending, read from the message's reply
subject); a fetch request that expires unserved says the read is at the end. It only ever
asks for what it can hold, so the client's pending limits are never reached (no
slow-consumer drop by design); a consumer that stops answering, or answers with an error
status, raises ConsumerLost, and the follower starts a new one after the last revision
applied. Ordering and decisions are feed_follow's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from typing import Final

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from smartdns.errors import SmartDNSError
from smartdns.registrations.feed_follow import BucketMessage

FETCH_BATCH: Final = 5_000  # messages per fetch request
MIN_BATCH: Final = 1  # after lost messages the follower halves its batch down to this
IN_FLIGHT: Final = 2  # fetch requests outstanding: one served while the other is applied
EXPIRES_S: Final = 1.0  # a fetch request's life on the server; it then answers 408
SILENCE_S: Final = 2.0  # past EXPIRES_S, nothing at all from the consumer: it is gone
INACTIVE_S: Final = 30.0  # the server drops a consumer nobody asked for this long
DELETE_TIMEOUT_S: Final = 1.0
_KV_OPERATION: Final = "KV-Operation"
_STATUS: Final = "Status"
_TIMED_OUT: Final = frozenset({"404", "408"})  # no messages / request expired: not an error
_HEARTBEAT: Final = "100"


class ConsumerLost(SmartDNSError):
    """The consumer stopped answering or reported an error; read again from a new one."""


def parse_reply(reply: str) -> tuple[int, int, int]:
    """(stream sequence, consumer sequence, pending) from a JetStream message's reply subject:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<time>.<pending>`, or the form with
    domain and account hash after `$JS.ACK.` (and a trailing token) that newer servers send."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        base = 2
    elif len(tokens) >= 11:
        base = 4
    else:
        raise ValueError("not a JetStream message reply subject")
    return int(tokens[base + 3]), int(tokens[base + 4]), int(tokens[base + 6])


class PullReader:
    """One ephemeral pull consumer and its inbox; `next` returns what arrived."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        prefix: str,
        batch: int = FETCH_BATCH,
        pending_limit: int = 0,
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._prefix = prefix  # `$KV.<bucket>.`: a message's key is its subject after it
        self.batch = batch  # messages per fetch request from now on
        # Twice what may be in flight: the client's queue can never overflow (0: that bound).
        self._pending_limit = pending_limit or 2 * IN_FLIGHT * FETCH_BATCH
        self._name = ""
        self._inbox = ""
        self._sub: Subscription | None = None
        self._arrived: deque[BucketMessage] = deque()
        self._signal = asyncio.Event()
        self._outstanding: deque[int] = deque()  # messages due per request, oldest first
        self._sizes: deque[int] = deque()  # each request's batch as asked
        self._lost: str | None = None
        # A request expired without a message: nothing was there to deliver. The pending count
        # messages carry can stay above 0 when keys are rewritten during a read (2.9.10).
        self.at_end = False
        self._loop = asyncio.get_running_loop()
        self._heard_at = self._loop.time()  # the last message or status from the consumer

    @property
    def name(self) -> str:
        return self._name

    async def open(self, js: JetStreamContext, after: int, timeout_s: float) -> int:
        """Make the consumer (every message after revision `after`) and start fetching;
        returns how many messages it has pending (0: the read is already at the end)."""
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        if after:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = after + 1
        info = await js.add_consumer(self._stream, config, timeout=timeout_s)
        self._name = info.name
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            self._inbox, cb=self._received, pending_msgs_limit=self._pending_limit
        )
        await self._ask()
        return int(info.num_pending or 0)

    async def close(self, js: JetStreamContext | None) -> None:
        """Unsubscribe and delete the consumer (best effort: the server drops it anyway after
        INACTIVE_S without requests)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if js is not None and self._name:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(DELETE_TIMEOUT_S):
                    await js.delete_consumer(self._stream, self._name)

    async def next(self, timeout_s: float) -> list[BucketMessage]:
        """What arrived since the last call, waiting up to `timeout_s` for something; keeps
        IN_FLIGHT fetch requests outstanding. ConsumerLost when the consumer is gone: an error
        status, or nothing at all (each request ends with a message or a 408 within
        EXPIRES_S) for EXPIRES_S + SILENCE_S, judged only after a wait of our own in which
        the inbox could have delivered (a stalled event loop is not a silent consumer)."""
        quiet = False
        if not self._arrived and self._lost is None:
            self._signal.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._signal.wait()
            except TimeoutError:
                quiet = True
        if self._lost is not None:
            raise ConsumerLost(self._lost)
        silence_s = self._loop.time() - self._heard_at
        if quiet and self._outstanding and silence_s > EXPIRES_S + SILENCE_S:
            raise ConsumerLost("the consumer stopped answering")
        messages = list(self._arrived)
        self._arrived.clear()
        await self._ask()
        return messages

    async def _ask(self) -> None:
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self._name}"
        request = json.dumps({"batch": self.batch, "expires": int(EXPIRES_S * 1e9)}).encode()
        while len(self._outstanding) < IN_FLIGHT:
            if not self._outstanding:
                self._heard_at = self._loop.time()  # silence counts from the first request
            self._outstanding.append(self.batch)
            self._sizes.append(self.batch)
            await self._nc.publish(subject, request, reply=self._inbox)

    def _answered(self) -> None:
        self._outstanding.popleft()
        self._sizes.popleft()

    async def _received(self, msg: Msg) -> None:
        """The inbox's callback: a message of the stream, or a fetch request's status."""
        self._heard_at = self._loop.time()
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status is not None:
            if status == _HEARTBEAT:
                return
            if status in _TIMED_OUT and self._outstanding:
                if self._outstanding[0] == self._sizes[0]:
                    self.at_end = True
                self._answered()
            else:
                self._lost = f"status {status}"
            self._signal.set()
            return
        try:
            sequence, consumer_sequence, pending = parse_reply(msg.reply)
        except ValueError:
            self._lost = "a message without JetStream metadata"
            self._signal.set()
            return
        self.at_end = False
        if self._outstanding:
            self._outstanding[0] -= 1
            if self._outstanding[0] <= 0:
                self._answered()
        operation = headers.get(_KV_OPERATION) if headers else None
        key = msg.subject[len(self._prefix) :]
        self._arrived.append(
            BucketMessage(key, operation, msg.data, sequence, consumer_sequence, pending)
        )
        self._signal.set()
