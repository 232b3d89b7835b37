"""docs/configuration.md cannot drift from the config loader.

The key sets are read from ``rpxy.config.load`` when the test runs (not copied here),
so a key added to the loader fails this test until it is documented:

- every module-level collection of strings in ``rpxy.config.load`` (``_TOP_KEYS``,
  ``_APP_KEYS``, ..., ``UPSTREAM_OPTIONS``, ``LOAD_BALANCE_CHOICES``, and whatever set is
  added next) has a table in docs/configuration.md introduced by ``<!-- keys: NAME -->``;
  the first column of that table lists exactly the keys (or values) of the set;
- every table the loader validates (``_Section(...)``, ``_subsection(...)``,
  ``get_choice(...)``) is given one of those named sets, so no key set can hide inline;
- the default column matches the attrs model defaults (``rpxy.config.model``);
- each example in the example column sets its row's key and loads (in ``SECTION_PATHS``,
  with the siblings it needs from ``SECTION_CONTEXT``);
- every ```toml block of docs/configuration.md, the other docs/*.md and README.md loads
  with the real loader, without "unknown key" warnings. A block with ``apps`` and a listen
  port must be a complete config; any other block, or one preceded by
  ``<!-- fragment -->``, is merged into a minimal config first (``BASE``). A block preceded
  by ``<!-- not-checked -->`` is skipped. Certificate/key/CA paths are replaced by
  placeholder files, since the loader checks that they can be opened.
"""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from rpxy.config import load as load_module
from rpxy.config import model
from rpxy.config.load import ConfigError, parse_config
from rpxy.config.proxies import PROXY_ALIASES

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
REFERENCE = DOCS / "configuration.md"

#: Module-level string collections of rpxy.config.load that are not config keys.
NOT_KEY_SETS = frozenset({"NOT_YET_SUPPORTED", "__all__"})

#: Which model class holds the defaults of the keys of a set (sets not listed here are
#: still checked for completeness, just not for defaults).
MODELS: dict[str, str] = {
    "_TOP_KEYS": "Config",
    "_TLS_KEYS": "TlsConfig",
    "_ROUTE_KEYS": "ReverseProxyConfig",
    "_UPSTREAM_KEYS": "UpstreamConfig",
    "_HEALTH_CHECK_KEYS": "HealthCheckConfig",
    "_EXPERIMENTAL_KEYS": "ExperimentalConfig",
    "_H3_KEYS": "H3Config",
    "_CACHE_KEYS": "CacheConfig",
    "_ACME_KEYS": "AcmeConfig",
    "_PROXY_PROTOCOL_KEYS": "ProxyProtocolConfig",
    "_METRICS_KEYS": "MetricsConfig",
}

#: (set, key) whose effective default is computed by the loader, not the model field.
COMPUTED_DEFAULTS = frozenset(
    {
        ("_TLS_KEYS", "https_redirection"),  # follows the ports: true only when both are set
    }
)

#: Fragments are merged into this before loading.
BASE: dict[str, Any] = {
    "listen_port": 80,
    "listen_port_tls": 443,
    "apps": {
        "app": {
            "server_name": "app.example.com",
            "reverse_proxy": [{"upstream": [{"location": "127.0.0.1:3000"}]}],
        }
    },
}

_MARKER = re.compile(r"<!--\s*keys:\s*([A-Za-z0-9_]+)\s*-->")
_TICKED = re.compile(r"`([^`]+)`")
_FENCE = re.compile(r"^```toml[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


# ---- what the loader accepts ------------------------------------------------------------


def loader_key_sets() -> dict[str, frozenset[str]]:
    """Every module-level non-empty tuple/frozenset/set of strings in rpxy.config.load."""
    sets = {}
    for name, value in vars(load_module).items():
        if name in NOT_KEY_SETS or not isinstance(value, (tuple, frozenset, set)) or not value:
            continue
        if all(isinstance(item, str) for item in value):
            sets[name] = frozenset(value)
    return sets


def test_the_loader_has_the_expected_kinds_of_sets() -> None:
    """Guards the discovery itself: if this finds nothing, the other tests prove nothing."""
    sets = loader_key_sets()
    for name in ("_TOP_KEYS", "_APP_KEYS", "_ROUTE_KEYS", "UPSTREAM_OPTIONS", "LOAD_BALANCE_CHOICES"):
        assert name in sets
    assert "listen_port" in sets["_TOP_KEYS"]
    assert "round_robin" in sets["LOAD_BALANCE_CHOICES"]


def test_every_table_the_loader_validates_uses_a_named_key_set() -> None:
    """A ``_Section(..., {"inline", "keys"})`` would escape the documentation check."""
    sets = loader_key_sets()
    tree = ast.parse(inspect.getsource(load_module))
    # call name -> index of the argument naming the accepted keys / choices
    positions = {"_Section": 3, "_subsection": 2, "get_choice": 2}
    # _subsection passes its own ``known`` parameter on to _Section: its callers are checked.
    forwarding = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef) and function.name == "_subsection"
        for node in ast.walk(function)
    }
    problems = []
    seen = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in forwarding:
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name not in positions:
            continue
        index = positions[name]
        if len(node.args) > index:
            arg = node.args[index]
        else:
            keyword = [kw.value for kw in node.keywords if kw.arg in ("known", "choices")]
            if not keyword:
                problems.append(f"line {node.lineno}: {name}(...) without a recognisable key set argument")
                continue
            arg = keyword[0]
        seen += 1
        if not (isinstance(arg, ast.Name) and arg.id in sets):
            problems.append(f"line {node.lineno}: {name}(...) is given {ast.unparse(arg)}, not a named key set")
    assert seen >= 10
    assert not problems, "\n".join(problems)


# ---- what the reference documents -------------------------------------------------------


@attrs.frozen
class DocTable:
    name: str
    keys: list[str]
    rows: dict[str, dict[str, str]]  # key -> {column header: cell}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def documented_tables(text: str) -> dict[str, DocTable]:
    """``<!-- keys: NAME -->`` followed by a Markdown table: its first-column keys."""
    tables: dict[str, DocTable] = {}
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = _MARKER.match(line.strip())
        if not match:
            continue
        name = match.group(1)
        assert name not in tables, f"docs/configuration.md: two tables marked {name}"
        rest = iter(lines[number + 1 :])
        table_lines = []
        for following in rest:
            if not following.strip() and not table_lines:
                continue
            if not following.lstrip().startswith("|"):
                break
            table_lines.append(following)
        assert len(table_lines) >= 3, f"docs/configuration.md: the marker {name} is not followed by a table"
        header = [cell.lower() for cell in _cells(table_lines[0])]
        keys, rows = [], {}
        for row_line in table_lines[2:]:
            cells = _cells(row_line)
            ticked = _TICKED.search(cells[0])
            assert ticked, f"docs/configuration.md ({name}): no `key` in the first cell of {row_line!r}"
            key = ticked.group(1).strip('"')
            keys.append(key)
            rows[key] = dict(zip(header, cells, strict=False))
        tables[name] = DocTable(name, keys, rows)
    return tables


def reference_text() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def test_every_key_set_of_the_loader_has_a_table() -> None:
    tables = documented_tables(reference_text())
    missing = sorted(set(loader_key_sets()) - set(tables))
    assert not missing, (
        "docs/configuration.md has no table for these key sets of rpxy.config.load "
        f"(add one introduced by <!-- keys: NAME -->): {missing}"
    )


def test_no_table_names_a_set_the_loader_does_not_have() -> None:
    tables = documented_tables(reference_text())
    unknown = sorted(set(tables) - set(loader_key_sets()))
    assert not unknown, f"docs/configuration.md documents key sets rpxy.config.load does not have: {unknown}"


def test_each_table_lists_exactly_the_keys_the_loader_accepts() -> None:
    sets = loader_key_sets()
    problems = []
    for name, table in documented_tables(reference_text()).items():
        if name not in sets:
            continue  # reported by the test above
        documented = set(table.keys)
        duplicates = sorted({key for key in table.keys if table.keys.count(key) > 1})
        if duplicates:
            problems.append(f"{name}: listed twice: {duplicates}")
        if missing := sorted(sets[name] - documented):
            problems.append(f"{name}: accepted by the loader but not documented: {missing}")
        if extra := sorted(documented - sets[name]):
            problems.append(f"{name}: documented but not accepted by the loader: {extra}")
    assert not problems, "docs/configuration.md:\n" + "\n".join(problems)


def _toml_literal(value: object) -> str | None:
    """How a scalar default is written in TOML (None for defaults without one)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    return None


def test_documented_defaults_are_the_model_defaults() -> None:
    tables = documented_tables(reference_text())
    problems = []
    checked = 0
    for name, class_name in MODELS.items():
        table = tables.get(name)
        model_class = getattr(model, class_name, None)
        if table is None or model_class is None:
            continue  # a missing table is reported above
        for field in attrs.fields(model_class):
            if field.name not in table.rows or (name, field.name) in COMPUTED_DEFAULTS:
                continue
            literal = _toml_literal(field.default) if field.default is not attrs.NOTHING else None
            if literal is None:
                continue
            cell = table.rows[field.name].get("default", "")
            checked += 1
            if f"`{literal}`" not in cell:
                problems.append(f"{name}.{field.name}: the model default is {literal}, the doc says {cell!r}")
    assert checked >= 30
    assert not problems, "docs/configuration.md:\n" + "\n".join(problems)


def test_trusted_proxy_aliases_are_documented() -> None:
    text = reference_text()
    missing = [alias for alias in PROXY_ALIASES if f"`{alias}`" not in text]
    assert not missing, f"docs/configuration.md does not mention the trusted_forwarded_proxies aliases {missing}"


def test_the_check_can_fail() -> None:
    """Deleting one documented row (or adding a bogus one) is noticed."""
    text = reference_text()
    row = next(line for line in text.splitlines() if line.startswith("| `max_clients_per_ip` |"))
    without = documented_tables(text.replace(row + "\n", ""))
    assert "max_clients_per_ip" not in without["_TOP_KEYS"].keys
    assert "max_clients_per_ip" in loader_key_sets()["_TOP_KEYS"]
    bogus = documented_tables(text.replace(row, row + "\n| `max_clientz` | integer | `0` | | beyond | typo |"))
    assert "max_clientz" in bogus["_TOP_KEYS"].keys


# ---- the example column: each example sets its row's key, and loads ---------------------

#: Where the keys of each set live in a config (``0``: the first array element).
SECTION_PATHS: dict[str, tuple[str | int, ...]] = {
    "_TOP_KEYS": (),
    "_APP_KEYS": ("apps", "app1"),
    "_TLS_KEYS": ("apps", "app1", "tls"),
    "_ROUTE_KEYS": ("apps", "app1", "reverse_proxy", 0),
    "_UPSTREAM_KEYS": ("apps", "app1", "reverse_proxy", 0, "upstream", 0),
    "_HEALTH_CHECK_KEYS": ("apps", "app1", "reverse_proxy", 0, "health_check"),
    "_EXPERIMENTAL_KEYS": ("experimental",),
    "_H3_KEYS": ("experimental", "h3"),
    "_CACHE_KEYS": ("experimental", "cache"),
    "_ACME_KEYS": ("experimental", "acme"),
    "_PROXY_PROTOCOL_KEYS": ("experimental", "tcp_recv_proxy_protocol"),
    "_METRICS_KEYS": ("experimental", "metrics"),
}

#: What an example of a set needs around it (required sibling keys).
SECTION_CONTEXT: dict[str, dict[str, Any]] = {
    "_TLS_KEYS": {"apps": {"app1": {"tls": {"tls_cert_path": "c.pem", "tls_cert_key_path": "k.pem"}}}},
    "_HEALTH_CHECK_KEYS": {"apps": {"app1": {"reverse_proxy": [{"upstream": [{"location": "127.0.0.1:3000"}],
                                                                "health_check": {"type": "http", "path": "/"}}]}}},
    "_ACME_KEYS": {"experimental": {"acme": {"email": "admin@example.org"}}},
    "_PROXY_PROTOCOL_KEYS": {"experimental": {"tcp_recv_proxy_protocol": {"trusted_proxies": ["10.0.0.0/8"]}}},
}


def _example_config(set_name: str, key: str, value: Any) -> dict[str, Any]:
    config = _merge(
        {
            "listen_port": 80,
            "listen_port_tls": 443,
            "apps": {
                "app1": {
                    "server_name": "app1.example.com",
                    "reverse_proxy": [{"upstream": [{"location": "127.0.0.1:3000"}]}],
                }
            },
        },
        SECTION_CONTEXT.get(set_name, {}),
    )
    if (set_name, key) == ("_TLS_KEYS", "acme"):
        config["apps"]["app1"]["tls"] = {}
        config["experimental"] = {"acme": {"email": "admin@example.org"}}
    node: Any = config
    for step in SECTION_PATHS[set_name]:
        if isinstance(step, str):
            node = node.setdefault(step, {})
        else:
            node = node[step]
    node[key] = value
    return config


def example_rows() -> list[tuple[str, str, str]]:
    """``(set, key, example)`` of every row with a ``key = value`` example."""
    rows = []
    for name, table in documented_tables(reference_text()).items():
        for key, row in table.rows.items():
            ticked = _TICKED.search(row.get("example", ""))
            if ticked and not ticked.group(1).startswith("["):
                rows.append((name, key, ticked.group(1)))
    return rows


def test_examples_set_their_own_key_and_load(tmp_path: Path) -> None:
    rows = example_rows()
    assert len(rows) >= 50
    problems = []
    for name, key, example in rows:
        try:
            data = tomllib.loads(example)
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{name} {key}: example {example!r} is not TOML: {exc}")
            continue
        if list(data) != [key]:
            problems.append(f"{name} {key}: example {example!r} sets {list(data)}, not {key}")
            continue
        if name not in SECTION_PATHS:
            continue  # a new set: completeness is checked, its examples once it is placed here
        try:
            loaded = parse_config(_placeholders(_example_config(name, key, data[key]), tmp_path))
        except ConfigError as exc:
            problems.append(f"{name} {key}: example {example!r} is refused: {exc}")
            continue
        problems += [f"{name} {key}: {w}" for w in loaded.warnings if w.startswith("unknown key")]
    assert not problems, "docs/configuration.md examples:\n" + "\n".join(problems)


# ---- the TOML examples load -------------------------------------------------------------


def toml_blocks() -> list[tuple[str, str, str]]:
    """``(where, mode, text)`` of every ```toml block; mode is "fragment", "skip" or ""."""
    files = [REFERENCE, REPO / "README.md", *sorted(p for p in DOCS.glob("*.md") if p != REFERENCE)]
    blocks = []
    for path in files:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
            mode = "fragment" if "<!-- fragment -->" in before else "skip" if "<!-- not-checked -->" in before else ""
            blocks.append((f"{path.relative_to(REPO)}:{line}", mode, match.group(1)))
    return blocks


def test_the_reference_has_examples() -> None:
    assert sum(where.startswith("docs/configuration.md") for where, _, _ in toml_blocks()) >= 1


def _merge(base: Mapping[str, Any], fragment: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in fragment.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _placeholders(data: Any, directory: Path) -> Any:
    """Replace certificate, key and CA file names by files that exist (the loader opens them)."""
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            if isinstance(value, str) and key.endswith(("cert_path", "key_path")):
                placeholder = directory / f"placeholder-{len(list(directory.iterdir()))}.pem"
                placeholder.write_bytes(b"")
                placeholder.chmod(0o600)
                out[key] = str(placeholder)
            else:
                out[key] = _placeholders(value, directory)
        return out
    if isinstance(data, list):
        return [_placeholders(item, directory) for item in data]
    return data


@pytest.mark.parametrize(("where", "mode", "text"), toml_blocks(), ids=[b[0] for b in toml_blocks()])
def test_toml_example_loads(where: str, mode: str, text: str, tmp_path: Path) -> None:
    if mode == "skip":
        pytest.skip("marked <!-- not-checked -->")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{where}: not valid TOML: {exc}")
    complete = "apps" in data and ("listen_port" in data or "listen_port_tls" in data)
    if mode == "fragment" or not complete:
        data = _merge(BASE, data)
    try:
        loaded = parse_config(_placeholders(data, tmp_path))
    except ConfigError as exc:
        pytest.fail(f"{where}: the loader refuses this example:\n{exc}")
    unknown = [warning for warning in loaded.warnings if warning.startswith("unknown key")]
    assert not unknown, f"{where}: {unknown}"
