"""The pure core of the query path: wire format, the decision table, zones, the client
snapshot, the answer cache and rate limits.

No I/O, no clock (`now` is passed in), no logging. Imports only `errors` and `config.model`.
"""
