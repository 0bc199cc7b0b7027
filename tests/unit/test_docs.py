"""The repository documents itself: README.md and docs/ stand on their own in a fresh clone.

No reference to the team's shared folder (a clone does not have it), every relative link and
anchor resolves, and every configuration key of the model appears in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path

import pytest

from smartdns.config import model

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)
_CODE_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# SyncConfig.token is read from sync.token_file, EncryptedConfig.not_after from cert_file;
# neither is written in YAML.
_NOT_YAML_KEYS = frozenset({"token", "not_after"})


def _prose(path: Path) -> str:
    """The file without its fenced code blocks (a `# comment` there is no heading)."""
    return _CODE_BLOCK.sub("", path.read_text(encoding="utf-8"))


def _anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(heading) for heading in _HEADING.findall(_prose(path))}


def test_the_documents_exist() -> None:
    names = {path.name for path in DOCS}
    assert {"README.md", "dns.md", "registrations.md", "configuration.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_no_reference_to_the_shared_folder(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert "../shared" not in text
    assert "/work/shared" not in text


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    broken = []
    for target in _LINK.findall(_prose(path)):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken


def _section_type(hint: object) -> type | None:
    """The dataclass a Config field holds, also when it is optional (`FeedConfig | None`)."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for candidate in candidates:
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _config_sections(text: str) -> dict[str, str]:
    """`### name` sections of docs/configuration.md's key reference → their text."""
    parts = re.split(r"^### +(\S+) *$", text, flags=re.MULTILINE)
    names, bodies = parts[1::2], parts[2::2]
    return {name: body.split("\n## ")[0] for name, body in zip(names, bodies, strict=True)}


def test_every_configuration_key_is_documented() -> None:
    sections = _config_sections((REPO / "docs" / "configuration.md").read_text(encoding="utf-8"))
    hints = typing.get_type_hints(model.Config)
    missing = []
    for section in dataclasses.fields(model.Config):
        if section.name == "path":
            continue  # the file itself
        if section.name not in sections:
            missing.append(section.name)
            continue
        kind = _section_type(hints[section.name])
        for key in dataclasses.fields(kind) if kind is not None else ():
            if key.name not in _NOT_YAML_KEYS and f"`{key.name}`" not in sections[section.name]:
                missing.append(f"{section.name}.{key.name}")
    assert not missing, f"not in docs/configuration.md: {missing}"


def test_the_key_check_finds_an_undocumented_key() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    sections = _config_sections(text.replace("`edns_udp_size`", "`udp size`"))
    assert "`edns_udp_size`" not in sections["server"]
    assert "`tcp_idle_timeout`" in sections["server"]


def test_readme_names_what_the_tests_install() -> None:
    """README's "Run the tests" names each Debian package scripts/run-tests installs and each
    package of the `test` extra, so a new test dependency cannot go unmentioned."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    script = (REPO / "scripts" / "run-tests").read_text(encoding="utf-8")
    debian = re.findall(r"missing\+=\(([^)\s]+)\)", script)
    assert debian, "scripts/run-tests lists no packages: the pattern is out of date"
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    python = [
        re.split(r"[<>=!~;\[ ]", entry)[0] for entry in project["optional-dependencies"]["test"]
    ]
    missing = [name for name in [*debian, *python] if name not in readme]
    assert not missing, f"README.md does not mention: {missing}"
