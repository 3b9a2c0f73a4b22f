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
import inspect
import textwrap
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


def options_help(cls: type, prefix: str = "") -> list[str]:
    """One line per option: `section.field=default  help`, nested dataclasses flattened."""
    lines: list[str] = []
    docs = field_docs(cls)
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        default = _default(f)
        if is_dataclass(default):
            lines.extend(options_help(type(default), prefix=f"{name}."))
            continue
        lines.append(f"  {name}={default}".ljust(44) + f"  {docs.get(f.name, '')}".rstrip())
    return lines
