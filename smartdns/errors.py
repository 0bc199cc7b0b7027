"""The error tree. Messages never carry a client address, a query name or a token."""

from __future__ import annotations


class SmartDNSError(Exception):
    """Base of every error smartdns raises on purpose."""


class ConfigError(SmartDNSError):
    """One or more configuration problems, each already formatted as `PATH:LINE: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class WireError(SmartDNSError):
    """A query that cannot be answered normally: `rcode` to reply with, or None to drop it.

    `question` holds the question section when it was readable, so the error reply can echo it.
    """

    def __init__(self, rcode: int | None, reason: str, question: bytes = b"") -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.question = question


class UpstreamError(SmartDNSError):
    """No upstream produced a usable answer in time."""


class RegistrationError(SmartDNSError):
    """Invalid registration input; `position` names the entry (`addresses[3]`), never its value."""

    def __init__(self, position: str, reason: str) -> None:
        super().__init__(f"{position}: {reason}" if position else reason)
        self.position = position
        self.reason = reason


class StaleWriteError(SmartDNSError):
    """A sync write whose version conflicts with what is stored (HTTP 409)."""
