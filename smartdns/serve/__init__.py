"""Serving DNS: the pipeline (a query's walk from bytes to reply) and the transports that
feed it: `udp`, `tcp` (driving the sans-IO RFC 7766 `framing`), and `listeners` (binding,
rebinding, drain).

Imports `core`, `upstream`, `config.model`, `errors` and `logs`; never `registrations` or
`node` (the query path sees registrations only as the `core.clients` snapshot).
"""
