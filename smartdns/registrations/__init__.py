"""Registrations: the entry rules, the strict JSON body, the SQLite store, the one writer
every source goes through, and the sources (`sources/`: the sync API today).

Imports `core`, `config.model` and `errors`; never `serve` or `node`. The query path reads
registrations only through the `core.clients` snapshot the node builds from the store.
"""
