"""Typed configuration machinery: a YAML file plus dotted overrides, validated against dataclass
sections (unknown keys, wrong types and ranges are one-line ConfigErrors), and --help that lists
every key with its default and docstring."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from core.errors import ConfigError, first_line


def check_choice(section: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(
            f"{section}.{key}: {value!r} is not a valid choice; choose one of {', '.join(map(str, choices))}"
        )


def check_range(section: str, key: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{key}: {value!r} is out of range; expected {expected}")


def build_section(cls: type, raw: Any, section: str):
    """Validate a mapping against dataclass `cls` and return an instance.

    Unknown keys list the valid keys of the section, wrong types name the key and the
    expected type; range and choice checks run in the dataclass's __post_init__.
    """
    if raw is None:
        raw = {}
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping of keys to values, got {raw!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{section}.{key}: unknown key; valid keys of {section}: {', '.join(valid)}")
    types = {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(cls)}
    merged = OmegaConf.structured(cls)
    for key, value in raw.items():
        if value is None and types[key] == "str":
            value = ""  # `key=` on the command line or `key:` in YAML: the empty string
        try:
            merged = OmegaConf.merge(merged, {key: value})
        except (ValidationError, ConfigKeyError):
            shown = "an empty value" if value is None else repr(value)
            raise ConfigError(f"{section}.{key}: {shown} is not a valid {types[key]}") from None
    return OmegaConf.to_object(merged)


def read_yaml(path: Path, name: str = "--config") -> DictConfig:
    """A YAML file whose top level is a mapping; `name` is the option that gave the path."""
    if path.is_dir():
        raise ConfigError(f"{name} {path}: is a folder; pass a YAML file such as configs/tiny.yaml")
    if not path.is_file():
        raise ConfigError(f"{name} {path}: no such file; pass a YAML file such as configs/tiny.yaml")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, UnicodeDecodeError and friends: report in one line
        raise ConfigError(f"{name} {path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{name} {path}: holds a list; expected a mapping of sections (model:, data:, train:, ...)")
    return cfg


def load_yaml(path: str | Path | None, overrides: list[str] = (), name: str = "--config") -> dict:
    """Read a YAML config and apply dotted `section.key=value` overrides; returns a plain dict.
    `name` is the option that gave the path, for error messages."""
    cfg = OmegaConf.create({}) if path is None else read_yaml(Path(path), name)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.max_steps=100")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"overrides {list(overrides)}: {first_line(e)}") from None
    try:
        return OmegaConf.to_container(cfg, resolve=True) or {}
    except OmegaConfBaseException as e:  # an interpolation ${...} that does not resolve
        key = getattr(e, "full_key", None)
        where = f"{key} in " if key else ""
        where += f"{name} {path}" if path is not None else "the overrides"
        where += " with its overrides" if path is not None and overrides else ""
        raise ConfigError(f"{where}: {first_line(e)}; use a value or an existing ${{section.key}}") from None


def check_output_path(name: str, path: str | Path, folder: bool = True) -> None:
    """An output `path` (a folder, or a file when folder=False) must be absent or of that kind,
    and the nearest existing folder on its way must be writable; checked before any work."""
    if str(path) == "":
        raise ConfigError(f"{name} is empty; give a path")
    path = Path(path)
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{name} {path}: is a {other}, expected a {kind}; choose another {name}")
    start = path if folder else path.parent
    base = next((p for p in (start, *start.parents) if p.exists()), Path("."))
    if not base.is_dir():
        raise ConfigError(f"{name} {path}: cannot be created, {base} is a file; choose another {name}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} {path}: cannot be written, {base} is not writable; choose another {name}")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (Python keeps none at run time)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: " ".join(doc.value.value.split())
        for node, doc in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    }


def config_help(sections: dict[str, type]) -> str:
    """Every key of `sections` with its default and field docstring: the epilog of a CLI's --help."""
    lines = ["config keys (section.key=value overrides; defaults in brackets):"]
    for name, cls in sections.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"  {name}.{f.name} [{default!r}]")
            lines.append(textwrap.fill(docs.get(f.name, ""), 92, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(line for line in lines if line.strip())


def help_parser(prog: str, description: str, sections: dict[str, type]) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help ends with the config keys of `sections`."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=config_help(sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
