"""Command line: argparse subcommands, exit codes, output. `__main__` only calls `main()`.

Exit codes: 0 success, 1 runtime failure (listen address taken, database unusable, stale
write), 2 invalid configuration or input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

from smartdns.config.loader import describe, load_config, warnings
from smartdns.config.model import Config, RegistrationsConfig
from smartdns.errors import ConfigError, RegistrationError, SmartDNSError
from smartdns.registrations.device_ids import DIGESTS_KEY, digests_hex
from smartdns.registrations.entries import (
    format_network,
    parse_addresses,
    parse_device_ids,
    parse_hostnames,
    validate_account_id,
)
from smartdns.registrations.json_body import decode_snapshot
from smartdns.registrations.sink import writing_sink
from smartdns.registrations.store import AccountRecord, RegistrationStore
from smartdns.registrations.writer import RegistrationWriter

DEFAULT_CONFIG: Final = "/etc/smartdns/smartdns.yaml"
EXIT_FAILURE: Final = 1
EXIT_INVALID: Final = 2


_HOSTNAME_OPTION: Final = "--hostname"
# The repeatable options of `add` and `remove`: option, destination, metavar, help.
_REPEATABLE: Final = (
    (_HOSTNAME_OPTION, "hostnames", "NAME", "a DDNS hostname (repeatable)"),
    (
        "--device-id",
        "device_ids",
        "ID",
        "a device ID for DoT/DoH (repeatable; only its SHA-256 digest is stored)",
    ),
)


def _parser() -> argparse.ArgumentParser:
    # --config is accepted before and after the subcommand; SUPPRESS keeps the later one
    # from overwriting the earlier one with its default.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="configuration file"
    )
    parser = argparse.ArgumentParser(
        prog="smartdns",
        description="MediaStreamer DNS authorization server",
        parents=[config_option],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", parents=[config_option], help="run the server in the foreground")
    commands.add_parser("check-config", parents=[config_option], help="validate the configuration")
    registrations = commands.add_parser(
        "registrations", parents=[config_option], help="manage registered addresses"
    )
    actions = registrations.add_subparsers(dest="action", required=True)
    add = actions.add_parser(
        "add",
        parents=[config_option],
        help="add addresses, hostnames and device IDs to an account",
    )
    remove = actions.add_parser(
        "remove", parents=[config_option], help="remove entries, or the whole account"
    )
    for action in (add, remove):
        action.add_argument("account")
        action.add_argument("addresses", nargs="*", metavar="ADDRESS")
        for option, dest, metavar, text in _REPEATABLE:
            action.add_argument(
                option, action="append", default=[], dest=dest, metavar=metavar, help=text
            )
    listing = actions.add_parser("list", parents=[config_option], help="list registrations")
    listing.add_argument("account", nargs="?")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    importing = actions.add_parser(
        "import", parents=[config_option], help="replace all registrations with a snapshot"
    )
    importing.add_argument("file", type=Path)
    actions.add_parser("export", parents=[config_option], help="print a snapshot document")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = getattr(args, "config", None) or Path(os.environ.get("SMARTDNS_CONFIG", DEFAULT_CONFIG))
    try:
        # The registrations commands work on the database only: no TLS, no certificate check.
        config = load_config(path, certificates=args.command != "registrations")
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    try:
        if args.command == "check-config":
            for warning in warnings(config, time.time()):
                print(warning, file=sys.stderr)
            print(describe(config))
            return 0
        if args.command == "serve":
            from smartdns.node.daemon import serve  # the server's imports are not needed elsewhere

            return serve(config)
        return asyncio.run(_registrations(config, args))
    except RegistrationError as error:
        print(f"smartdns: invalid input: {error}", file=sys.stderr)
        return EXIT_INVALID
    except SmartDNSError as error:
        print(f"smartdns: error: {error}", file=sys.stderr)
        return EXIT_FAILURE


async def _registrations(config: Config, args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[Config, RegistrationStore, argparse.Namespace], Awaitable[int]]]
    handlers = {
        "add": _add,
        "remove": _remove,
        "list": _list,
        "import": _import,
        "export": _export,
    }
    # Writers create the database; readers must find it (an empty one would hide a mistake).
    create = args.action in ("add", "import")
    store = await RegistrationStore.open(config.database.path, create=create)
    try:
        return await handlers[args.action](config, store, args)
    finally:
        await store.close()


def _writer(config: Config, store: RegistrationStore) -> RegistrationWriter:
    # No announcement: the DNS side runs in another process and notices the store's new
    # generation within a quarter second (node/daemon.py).
    return RegistrationWriter(store, config.registrations)


def _warn_if_feed(config: Config) -> None:
    """add and remove are operator overrides on this node's database, keeping the account's
    version; a fleet following a feed orders writes by the portal's versions, so the bucket's
    next value for the account, or the next catch-up, undoes them."""
    if config.feed is not None:
        print(
            "smartdns: warning: feed is configured: this changes only this node's copy, and the"
            " feed will undo it; change accounts through the sync API or `registrations import`",
            file=sys.stderr,
        )


async def _add(config: Config, store: RegistrationStore, args: argparse.Namespace) -> int:
    _warn_if_feed(config)
    account = validate_account_id(args.account)
    if not args.addresses and not args.hostnames and not args.device_ids:
        raise RegistrationError("", "give at least one address, --hostname or --device-id")
    networks = parse_addresses(list(args.addresses), config.registrations)
    hostnames = _hostnames(args.hostnames)
    devices = _devices(args.device_ids)
    record = await _writer(config, store).add_entries(account, networks, hostnames, devices)
    print(f"{record.account}: {_counts(record)}, version {record.version}")
    return 0


def _counts(record: AccountRecord) -> str:
    return (
        f"{len(record.networks)} entries, {len(record.hostnames)} hostnames,"
        f" {len(record.devices)} device IDs"
    )


def _hostnames(values: list[str]) -> tuple[str, ...]:
    """Command-line hostnames with the rules of SPEC 3 but no count: the store checks the
    account's total against `max_hostnames_per_account`."""
    return parse_hostnames(values, RegistrationsConfig(max_hostnames_per_account=len(values)))


def _devices(values: list[str]) -> tuple[bytes, ...]:
    """Command-line device IDs as digests, with the rules of SPEC 3 but no count: the store
    checks the account's total against `max_device_ids_per_account`."""
    return parse_device_ids(values, RegistrationsConfig(max_device_ids_per_account=len(values)))


async def _remove(config: Config, store: RegistrationStore, args: argparse.Namespace) -> int:
    _warn_if_feed(config)
    account = validate_account_id(args.account)
    whole = not args.addresses and not args.hostnames and not args.device_ids
    networks = None if whole else parse_addresses(list(args.addresses), config.registrations)
    hostnames = _hostnames(args.hostnames)
    devices = _devices(args.device_ids)
    if not await _writer(config, store).remove_entries(account, networks, hostnames, devices):
        print(f"smartdns: error: no registered account {account}", file=sys.stderr)
        return EXIT_FAILURE
    if networks is None:
        print(f"{account}: removed")
    else:
        counts = f"{len(networks)} entries, {len(hostnames)} hostnames, {len(devices)} device IDs"
        print(f"{account}: {counts} removed")
    return 0


def _record_json(record: AccountRecord) -> dict[str, Any]:
    return {
        "account": record.account,
        "version": record.version,
        "addresses": [format_network(network) for network in record.networks],
        "hostnames": list(record.hostnames),
        "device_ids": len(record.devices),  # SPEC 3: a count; the IDs are not kept
    }


async def _list(config: Config, store: RegistrationStore, args: argparse.Namespace) -> int:
    account = validate_account_id(args.account) if args.account is not None else None
    records = await store.readers.list_accounts(account)
    if args.json:
        print(json.dumps({"accounts": [_record_json(record) for record in records]}, indent=2))
        return 0
    for record in records:
        entries = [format_network(network) for network in record.networks]
        entries += [f"{_HOSTNAME_OPTION} {hostname}" for hostname in record.hostnames]
        if record.devices:
            entries.append(f"({len(record.devices)} device IDs)")
        print(f"{record.account}\tversion {record.version}\t{' '.join(entries)}")
    if account is not None and not records:
        print(f"smartdns: error: no registered account {account}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


async def _import(config: Config, store: RegistrationStore, args: argparse.Namespace) -> int:
    try:
        body = args.file.read_bytes()
    except OSError as error:
        print(f"smartdns: error: {args.file}: {error.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    # The sync API's decoder and rules (SPEC 5: "with the same rules"): a duplicate account
    # key is an error here too, where json.loads would silently keep the last one.
    try:
        snapshot = decode_snapshot(body, config.registrations)
    except RegistrationError as error:
        print(f"smartdns: invalid input: {args.file}: {error}", file=sys.stderr)
        return EXIT_INVALID
    version = snapshot.version
    # With `feed`, into the bucket: every node of the fleet, this one too, applies it there.
    async with writing_sink(config, store) as sink:
        result = await sink.replace_snapshot([snapshot])
    print(f"imported snapshot version {version}: {result}")
    return 0


async def _export(config: Config, store: RegistrationStore, args: argparse.Namespace) -> int:
    version = await store.readers.snapshot_version()
    records = await store.readers.list_accounts(None)
    # The list form, or the object form for an account with hostnames or device IDs (SPEC 4).
    # Device IDs are kept only as digests, so those are written (DIGESTS_KEY), and `import`
    # of this document gives the same digests back: the devices keep working.
    accounts: dict[str, Any] = {}
    for record in records:
        entry = _record_json(record)
        if not record.hostnames and not record.devices:
            accounts[record.account] = entry["addresses"]
            continue
        accounts[record.account] = {"addresses": entry["addresses"]}
        if record.hostnames:
            accounts[record.account]["hostnames"] = entry["hostnames"]
        if record.devices:
            accounts[record.account][DIGESTS_KEY] = digests_hex(record.devices)
    print(json.dumps({"version": version, "accounts": accounts}, indent=2))
    return 0
