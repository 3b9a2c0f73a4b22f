"""One expression AST, parser, printer, evaluator and reducer shared by every synthetic task.

A task is a `Language` (its operators and literals) plus a generator setting (`TaskSpec`).
Arithmetic and Boolean tasks differ only in those tables, so parsing, printing, step-wise
reduction and generation are written once here.

Printing convention (the canonical text of an expression; `to_text`):

* Literals: non-negative integers `7`, negative integers `-5` (a minus sign glued to digits is
  always a literal, never an operator), `True`, `False`.
* A binary operation is printed `left op right` (`5+9`, `True and False`); an operand is
  wrapped in parentheses when it is itself a binary operation or when its text starts with
  `-` (a negative literal or a unary minus): `7*((5+9)+7)`, `3*(-5)`, `(-(2))+4`. The
  outermost expression is never wrapped. Parentheses therefore make the structure explicit
  and operator precedence never decides anything in canonical text.
* Unary minus is always written with a parenthesised operand, `-(e)`: `-(5)`, `-(-5)`,
  `-(5+9)`, so that `-5` (a literal) and `-(5)` (an operation to reduce) never collide.
* `not` is written `not True` on a literal and `not (e)` on anything else:
  `not (True and False)`, `not (not True)`. Prefix operations bind tighter than any binary
  operator (as in Python), so `not (True and False) or False` needs no more parentheses.

The parser accepts this text and, leniently, any text with redundant parentheses or that
relies on the usual precedence (`*` over `+ -`, `and` over `or`, prefix over binary, binary
operators left-associative); it builds the same AST, so comparisons in the step checker are
structural and ignore redundant parentheses.

Reduction: an *innermost* operation is one whose operands are all literals. One reduction
step replaces one innermost operation by its value; the canonical chain-of-thought always
reduces the leftmost one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from crv.errors import CRVError

Value = int | bool


@dataclass(frozen=True)
class Atom:
    """A literal value."""

    value: Value


@dataclass(frozen=True)
class Unary:
    """A prefix operation such as `-(e)` or `not e`."""

    op: str
    operand: Node


@dataclass(frozen=True)
class Binary:
    """An infix operation `left op right`."""

    op: str
    left: Node
    right: Node


Node = Atom | Unary | Binary
Path = tuple[int, ...]


class ExprError(CRVError, ValueError):
    """Raised for text that is not an expression of the language, or values out of range."""


@dataclass(frozen=True)
class BinaryOp:
    """An infix operator; word operators (`and`) are written with a space on each side."""

    symbol: str
    precedence: int
    apply: Callable[[Value, Value], Value]

    @property
    def joiner(self) -> str:
        """The text between the operands: `+` or ` and `."""
        return f" {self.symbol} " if self.symbol.isalpha() else self.symbol


@dataclass(frozen=True)
class UnaryOp:
    """A prefix operator; `group_atoms` means even a literal operand is parenthesised."""

    symbol: str
    apply: Callable[[Value], Value]
    group_atoms: bool

    @property
    def prefix(self) -> str:
        """The text before the operand: `-` or `not `."""
        return f"{self.symbol} " if self.symbol.isalpha() else self.symbol


@dataclass(frozen=True)
class Language:
    """The operators and literals of one task."""

    name: str
    binary: tuple[BinaryOp, ...]
    unary: tuple[UnaryOp, ...]
    literal_pattern: str  # regex of one literal, without sign
    read_literal: Callable[[str], Value]
    binary_ops: dict[str, BinaryOp] = field(init=False, repr=False)
    unary_ops: dict[str, UnaryOp] = field(init=False, repr=False)
    token_re: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "binary_ops", {op.symbol: op for op in self.binary})
        object.__setattr__(self, "unary_ops", {op.symbol: op for op in self.unary})
        symbols = sorted({*self.binary_ops, *self.unary_ops, "(", ")"}, key=len, reverse=True)
        alternatives = [rf"{re.escape(s)}\b" if s.isalpha() else re.escape(s) for s in symbols]
        pattern = rf"\s*(?:(?P<lit>{self.literal_pattern})|(?P<sym>{'|'.join(alternatives)}))"
        object.__setattr__(self, "token_re", re.compile(pattern))


# ---------------------------------------------------------------- printing and evaluation


def value_text(value: Value) -> str:
    """The text of a value: `147`, `-5`, `True`."""
    return str(value)


def to_text(node: Node, lang: Language) -> str:
    """Canonical text of `node` (see the module docstring)."""
    if isinstance(node, Atom):
        return value_text(node.value)
    if isinstance(node, Unary):
        op = lang.unary_ops[node.op]
        inner = to_text(node.operand, lang)
        if op.group_atoms or not isinstance(node.operand, Atom):
            inner = f"({inner})"
        return op.prefix + inner
    parts = []
    for child in (node.left, node.right):
        text = to_text(child, lang)
        if isinstance(child, Binary) or text.startswith("-"):
            text = f"({text})"
        parts.append(text)
    return lang.binary_ops[node.op].joiner.join(parts)


def evaluate(node: Node, lang: Language) -> Value:
    """The value of `node`."""
    if isinstance(node, Atom):
        return node.value
    if isinstance(node, Unary):
        return lang.unary_ops[node.op].apply(evaluate(node.operand, lang))
    return lang.binary_ops[node.op].apply(evaluate(node.left, lang), evaluate(node.right, lang))


def children(node: Node) -> tuple[Node, ...]:
    """The operands of `node` (none for a literal)."""
    if isinstance(node, Atom):
        return ()
    if isinstance(node, Unary):
        return (node.operand,)
    return (node.left, node.right)


def count_operators(node: Node) -> int:
    """Number of operators in `node`, unary ones included (the task complexity)."""
    return int(not isinstance(node, Atom)) + sum(count_operators(c) for c in children(node))


def walk(node: Node, path: Path = ()) -> Iterator[tuple[Path, Node]]:
    """All sub-expressions with their paths, in pre-order (left to right in the text)."""
    yield path, node
    for i, child in enumerate(children(node)):
        yield from walk(child, (*path, i))


def is_innermost(node: Node) -> bool:
    """True for an operation whose operands are all literals."""
    return not isinstance(node, Atom) and all(isinstance(c, Atom) for c in children(node))


def innermost_paths(node: Node) -> list[Path]:
    """Paths of the innermost operations, leftmost first."""
    return [path for path, sub in walk(node) if is_innermost(sub)]


def replace(node: Node, path: Path, new: Node) -> Node:
    """`node` with the sub-expression at `path` replaced by `new`."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(node, Unary):
        return Unary(node.op, replace(node.operand, rest, new))
    if isinstance(node, Binary):
        if head == 0:
            return Binary(node.op, replace(node.left, rest, new), node.right)
        return Binary(node.op, node.left, replace(node.right, rest, new))
    raise ExprError(f"no sub-expression at path {path}")


def subtree(node: Node, path: Path) -> Node:
    """The sub-expression of `node` at `path`."""
    for i in path:
        node = children(node)[i]
    return node


def reduce_at(node: Node, path: Path, lang: Language) -> Node:
    """`node` with the operation at `path` replaced by its value."""
    return replace(node, path, Atom(evaluate(subtree(node, path), lang)))


# ---------------------------------------------------------------- parsing


@dataclass
class _Parser:
    """Precedence-climbing parser over the tokens of one language."""

    lang: Language
    tokens: list[tuple[str, str, int, int]]  # (kind, text, start, end)
    pos: int = 0

    def peek(self, offset: int = 0) -> tuple[str, str, int, int] | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int, int]:
        token = self.peek()
        if token is None:
            raise ExprError("unexpected end of expression")
        self.pos += 1
        return token

    def expression(self, min_prec: int = 0) -> Node:
        left = self.prefix()
        while True:
            token = self.peek()
            if token is None or token[0] != "sym" or token[1] not in self.lang.binary_ops:
                return left
            op = self.lang.binary_ops[token[1]]
            if op.precedence < min_prec:
                return left
            self.take()
            left = Binary(op.symbol, left, self.expression(op.precedence + 1))

    def prefix(self) -> Node:
        kind, text, _, end = self.take()
        if kind == "lit":
            return Atom(self.lang.read_literal(text))
        if text == "(":
            inner = self.expression()
            if self.take()[1] != ")":
                raise ExprError("expected ')'")
            return inner
        if text in self.lang.unary_ops:
            nxt = self.peek()
            if text == "-" and nxt is not None and nxt[0] == "lit" and nxt[2] == end:
                self.take()  # a minus glued to digits is a negative literal
                return Atom(-self.lang.read_literal(nxt[1]))
            return Unary(text, self.prefix())
        raise ExprError(f"unexpected {text!r}")


def tokenize(text: str, lang: Language) -> list[tuple[str, str, int, int]]:
    """Tokens `(kind, text, start, end)` with kind `lit` or `sym`; raises on stray text."""
    text = text.rstrip()
    tokens, pos = [], 0
    while pos < len(text):
        match = lang.token_re.match(text, pos)
        if match is None:
            raise ExprError(f"unexpected text {text[pos : pos + 10].strip()!r}")
        kind = match.lastgroup or "sym"
        tokens.append((kind, match.group(kind), match.start(kind), match.end(kind)))
        pos = match.end()
    return tokens


def parse(text: str, lang: Language) -> Node:
    """Parse `text` into an AST of `lang`; raises `ExprError` on anything else."""
    parser = _Parser(lang, tokenize(text, lang))
    node = parser.expression()
    if parser.peek() is not None:
        raise ExprError(f"unexpected {parser.peek()[1]!r} after the expression")
    return node


def parse_value(text: str, lang: Language) -> Value:
    """Parse a single (possibly negative) literal such as `-5` or `True`."""
    node = parse(text, lang)
    if not isinstance(node, Atom):
        raise ExprError(f"{text!r} is not a single value")
    return node.value


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class TaskSpec:
    """A task: its language, the literals drawn as leaves, and generation settings.

    `unary_prob` is the chance that an operator slot is a unary operator; `max_abs` rejects
    problems with an intermediate value whose magnitude exceeds it (None: no bound).
    """

    lang: Language
    leaves: tuple[Value, ...]
    unary_prob: float
    max_abs: int | None = None

    def random_tree(self, n_ops: int, rng: random.Random) -> Node:
        """A random expression with exactly `n_ops` operators.

        Each operator slot is unary with probability `unary_prob`, else binary with the
        remaining operators split uniformly between its two operands.
        """
        if n_ops == 0:
            return Atom(rng.choice(self.leaves))
        if self.lang.unary and rng.random() < self.unary_prob:
            return Unary(rng.choice(self.lang.unary).symbol, self.random_tree(n_ops - 1, rng))
        n_left = rng.randrange(n_ops)
        return Binary(
            rng.choice(self.lang.binary).symbol,
            self.random_tree(n_left, rng),
            self.random_tree(n_ops - 1 - n_left, rng),
        )

    def in_range(self, node: Node) -> bool:
        """True when every intermediate value respects `max_abs`."""
        if self.max_abs is None:
            return True
        return all(abs(evaluate(sub, self.lang)) <= self.max_abs for _, sub in walk(node))

    def sample(self, n_ops: int, rng: random.Random) -> Node:
        """A random in-range expression with `n_ops` operators (rejection sampling)."""
        if n_ops < 1:
            raise ValueError(f"complexity must be >= 1, got {n_ops}")
        while True:
            node = self.random_tree(n_ops, rng)
            if self.in_range(node):
                return node
