"""Config option machinery shared by every section: choices, their checks, and the help.

crv's configs are dataclasses with a string literal right under each field (as sparsify's
are); that string is the option's help text. Python keeps no such attribute docstrings at
run time, so they are read from the class's source with `ast`.

A field with a fixed set of values is typed with a `Choice` enum: OmegaConf rejects any
other value when the config is composed, and `check_choices` (called from each section's
`__post_init__`) turns plain strings into members for configs built in Python.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import textwrap
from collections.abc import Iterable
from dataclasses import MISSING, fields, is_dataclass
from enum import Enum
from typing import Any, get_type_hints


class Choice(str, Enum):
    """A config choice: a str enum whose members' names are their values (OmegaConf parses
    a command-line value by name) and whose str() is the value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def check_choices(cfg: Any, section: str) -> None:
    """Turn every `Choice`-typed field of the dataclass `cfg` into its enum member;
    ValueError naming `section.field` (`field` when `section` is empty) and the allowed
    values when one is not allowed."""
    for name, hint in get_type_hints(type(cfg)).items():
        if isinstance(hint, type) and issubclass(hint, Choice):
            value = getattr(cfg, name)
            try:
                setattr(cfg, name, hint(value))
            except ValueError:
                allowed = ", ".join(m.value for m in hint)
                where = f"{section}.{name}" if section else name
                raise ValueError(f"{where} must be one of {allowed}, got {value!r}") from None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean X?)` for the known name closest to a misspelt one, else ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_names(values: Iterable[str], known: Iterable[str], where: str) -> None:
    """ValueError naming `where`, the first unknown value and the known ones, when one of
    `values` is not among `known` (stage names, task names)."""
    known = list(known)
    for value in values:
        if value not in known:
            raise ValueError(
                f"{where}: unknown name {value!r}{did_you_mean(value, known)}; "
                f"known: {', '.join(known)}"
            )


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return "???"


def override_value(value: Any) -> str:
    """A config value as it is written on the command line (`[a,b]`, `null`, `true`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def options_help(cls: type, prefix: str = "", values: Any = None) -> list[str]:
    """One line per option: `section.field=value  help`, nested dataclasses flattened.
    The value is the field's default, or its value in `values` (an instance of `cls`,
    e.g. the composed config, so that help shows what a run would use)."""
    lines: list[str] = []
    docs = field_docs(cls)
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        value = _default(f) if values is None else getattr(values, f.name)
        if is_dataclass(value):
            lines.extend(options_help(type(value), f"{name}.", None if values is None else value))
            continue
        shown = f"  {name}={override_value(value)}"
        lines.append(shown.ljust(44) + f"  {docs.get(f.name, '')}".rstrip())
    return lines


def option_names(cls: type, prefix: str = "") -> list[str]:
    """Every option's dotted name (`graphs.max_feature_nodes`), nested dataclasses flattened."""
    names: list[str] = []
    for f in fields(cls):
        default = _default(f)
        if is_dataclass(default):
            names += option_names(type(default), f"{prefix}{f.name}.")
        else:
            names.append(f"{prefix}{f.name}")
    return names
