"""Forwarding to upstream resolvers: health order and retries, and the socket exchange.

Imports `core` (wire format), `config.model` and `errors`; never `serve`, `registrations`
or `node`.
"""
