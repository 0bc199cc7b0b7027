"""Serving DNS: the pipeline (a query's walk from bytes to reply) and the UDP and TCP
listeners that feed it.

Imports `core`, `upstream`, `config.model`, `errors` and `logs`; never `registrations` or
`node` (the query path sees registrations only as the `core.clients` snapshot).
"""
