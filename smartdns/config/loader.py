"""Configuration loader: the YAML file → `model`'s dataclasses, every check in one pass,
every problem as `PATH:LINE: message`.

Only the loader and cli.py read settings; everything else receives these values. The
sections and their checks are in `sections`; no I/O here beyond reading the one file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

import yaml
from yaml.nodes import MappingNode

from smartdns.config.model import Config
from smartdns.config.reader import Reader, shown
from smartdns.config.sections import read_config
from smartdns.errors import ConfigError

EXPIRY_WARNING_S: Final = 14 * 86_400  # SPEC 2a: check-config warns 14 days ahead


def load_config(path: Path, *, certificates: bool = True) -> Config:
    """Read and check the YAML file at `path`; raise ConfigError listing every problem.

    Problems are `PATH:LINE: message`, sorted by line; a file that cannot be read or parsed,
    or whose top level is not a mapping, gives one `PATH: message`. Relative file paths in
    the config resolve against the config file's directory. The sync token is read here, so
    a missing, empty or group/other-accessible token file is a problem like any other; so is
    `encrypted`'s certificate pair unless `certificates` is False (config.certificates).
    """
    reader = Reader(path, certificates=certificates)
    config = read_config(reader, _compose(path))
    problems = reader.problems()
    if problems:
        raise ConfigError(problems)
    return config


def _compose(path: Path) -> MappingNode:
    """The file's YAML nodes (composed, not loaded: every value keeps its line), or
    ConfigError with one `PATH: message` when it cannot be read, parsed or is no mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the file: {error.strerror or error}"]) from error
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 text (byte {error.start})"]) from error
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = error.problem or error.context or "unreadable"
        raise ConfigError([f"{path}: invalid YAML{at}: {problem}"]) from error
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: invalid YAML: {error}"]) from error
    except RecursionError as error:
        raise ConfigError([f"{path}: invalid YAML: nested too deeply"]) from error
    if root is None:
        raise ConfigError([f"{path}: the file is empty; at least upstream.servers is required"])
    if not isinstance(root, MappingNode):
        raise ConfigError(
            [f"{path}: the top level must be a mapping of sections, got {shown(root)}"]
        )
    return root


def warnings(config: Config, now: float) -> list[str]:
    """What `check-config` (and start and reload) warn about without refusing the file: a
    certificate that expires within EXPIRY_WARNING_S of `now` (epoch seconds), or has."""
    encrypted = config.encrypted
    if encrypted is None or encrypted.not_after is None:
        return []
    left_s = encrypted.not_after - now
    if left_s >= EXPIRY_WARNING_S:
        return []
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(encrypted.not_after))
    state = "expired on" if left_s <= 0 else f"expires in {left_s / 86_400:.1f} days, on"
    return [f"{config.path}: warning: encrypted.cert_file: {encrypted.cert_file}: {state} {when}"]


def describe(config: Config) -> str:
    """The line `check-config` prints for a valid file."""
    return "config OK: " + summary(config)


def summary(config: Config) -> str:
    """The configuration in one line for `check-config` and the start and reload log lines:
    counts and modes only, no addresses of clients, no secrets."""
    parts = [
        _count(len(config.server.listen), "listen address", "listen addresses"),
        _count(config.server.workers, "worker", "workers"),
        _count(len(config.unblock.regions), "region", "regions"),
        _count(len(config.unblock.zones), "zone", "zones"),
        _count(len(config.upstream.servers), "upstream", "upstreams"),
        f"unregistered={config.unregistered.value}",
        f"encrypted={_encrypted(config)}",
        f"feed={'off' if config.feed is None else 'on'}",
    ]
    return ", ".join(parts)


def _encrypted(config: Config) -> str:
    """`off`, or which encrypted transports listen: `dot+doh`, `dot` or `doh`."""
    encrypted = config.encrypted
    if encrypted is None:
        return "off"
    served = [
        name
        for name, listen in (("dot", encrypted.dot_listen), ("doh", encrypted.doh_listen))
        if listen
    ]
    return "+".join(served)


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"
