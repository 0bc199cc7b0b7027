"""Registrations: the entry rules, the strict JSON body, the version rule, the SQLite store
(`store/`, one part per client), the one writer every source goes through, and the sources
(`sources/`: the sync API, the feed, the DDNS refresher).

Imports `core`, `config.model` and `errors`; never `serve` or `node`. The query path reads
registrations only through the `core.clients` snapshot the node builds from the store.
"""
