"""The registrations database's tables and indexes, version by version (SPEC 3 and 7).

Statements only; database.py runs them (a new file gets version 1, then each migration in
turn). What a table may hold is what SPEC 3 allows: no timestamps, no counters of use.
"""

from __future__ import annotations

from typing import Final

SCHEMA_VERSION: Final = 4

SCHEMA_V1: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # deleted = 1 is a tombstone: the account has no entries and blocks older writes.
    "CREATE TABLE IF NOT EXISTS accounts ("
    " account TEXT PRIMARY KEY,"
    " version INTEGER NOT NULL,"
    " deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)))",
    # network: 4- or 16-byte big-endian address, so blob order is address order.
    "CREATE TABLE IF NOT EXISTS entries ("
    " account TEXT NOT NULL REFERENCES accounts(account) ON DELETE CASCADE,"
    " family INTEGER NOT NULL CHECK (family IN (4, 6)),"
    " network BLOB NOT NULL,"
    " prefix_len INTEGER NOT NULL,"
    " PRIMARY KEY (account, family, network, prefix_len)"
    ") WITHOUT ROWID",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('snapshot_version', 0), ('generation', 0)",
)
# Version 2: what changed since a generation is an indexed read of what changed. Each
# account row carries the generation of its last write; each entry a write took away leaves
# a `removed` row at that generation (pruned after database.KEEP_REMOVED_GENERATIONS); a snapshot
# clears them and records its generation, since it rewrites everything.
ENTRIES_BY_PREFIX: Final = (
    "CREATE INDEX IF NOT EXISTS entries_by_prefix ON entries (family, network, prefix_len)"
)
SCHEMA_V2: Final = (
    "ALTER TABLE accounts ADD COLUMN generation INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS accounts_by_generation ON accounts (generation)",
    ENTRIES_BY_PREFIX,
    "CREATE TABLE IF NOT EXISTS removed ("
    " generation INTEGER NOT NULL,"
    " family INTEGER NOT NULL,"
    " network BLOB NOT NULL,"
    " prefix_len INTEGER NOT NULL,"
    " PRIMARY KEY (generation, family, network, prefix_len)"
    ") WITHOUT ROWID",
    # An existing database's readers all start with a full load: mark everything as new.
    "INSERT OR IGNORE INTO meta (key, value) SELECT 'snapshot_generation', value"
    " FROM meta WHERE key = 'generation'",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('removed_floor', 0)",
    "UPDATE meta SET value = 2 WHERE key = 'schema_version'",
)
# Version 3: hostname registrations (SPEC 3) and what they resolve to. `resolved` holds the
# DDNS refresher's results only while some account holds the hostname; they authorize as /32
# and /128 entries of each such account (see readers.py). `hostnames_generation` moves
# when the set of registered hostnames does, so the refresher polls one value.
SCHEMA_V3: Final = (
    "CREATE TABLE IF NOT EXISTS hostnames ("
    " account TEXT NOT NULL REFERENCES accounts(account) ON DELETE CASCADE,"
    " hostname TEXT NOT NULL,"
    " PRIMARY KEY (account, hostname)"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS hostnames_by_name ON hostnames (hostname)",
    "CREATE TABLE IF NOT EXISTS resolved ("
    " hostname TEXT NOT NULL,"
    " family INTEGER NOT NULL CHECK (family IN (4, 6)),"
    " network BLOB NOT NULL,"
    " PRIMARY KEY (hostname, family, network)"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS resolved_by_address ON resolved (family, network)",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('hostnames_generation', 0)",
    "UPDATE meta SET value = 3 WHERE key = 'schema_version'",
)
DEVICES_BY_DIGEST: Final = "CREATE INDEX IF NOT EXISTS device_ids_by_digest ON device_ids (digest)"
# Version 4: device IDs (SPEC 2a, 3), as SHA-256 digests only; tombstones hold none. A digest
# authorizes while exactly one account holds it (decided in SQL, through device_ids_by_digest:
# an ID two accounts of a fleet hold authorizes neither). Each digest a write took away leaves
# a `removed_devices` row, so changes_since stays a read of what changed, as for entries.
SCHEMA_V4: Final = (
    "CREATE TABLE IF NOT EXISTS device_ids ("
    " account TEXT NOT NULL REFERENCES accounts(account) ON DELETE CASCADE,"
    " digest BLOB NOT NULL,"
    " PRIMARY KEY (account, digest)"
    ") WITHOUT ROWID",
    DEVICES_BY_DIGEST,
    "CREATE TABLE IF NOT EXISTS removed_devices ("
    " generation INTEGER NOT NULL,"
    " digest BLOB NOT NULL,"
    " PRIMARY KEY (generation, digest)"
    ") WITHOUT ROWID",
    "UPDATE meta SET value = 4 WHERE key = 'schema_version'",
)
# The prefix length a resolved address `r` authorizes as: a host route.
HOST_PREFIX: Final = "CASE r.family WHEN 4 THEN 32 ELSE 128 END"
