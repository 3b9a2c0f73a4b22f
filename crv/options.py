"""Option help read from dataclass field docstrings.

crv's configs are dataclasses with a string literal right under each field (as sparsify's
are); that string is the option's help text. Python keeps no such attribute docstrings at
run time, so they are read from the class's source with `ast`.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import MISSING, fields, is_dataclass
from typing import Any


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
