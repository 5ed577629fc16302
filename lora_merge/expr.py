"""A safe parser for composition expressions such as `0.6*math + 0.4*code - 0.3*toxic` (no `eval`).

Grammar (usual precedence, left to right):

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*
    unary  := ('+' | '-') unary | NUMBER | NAME | '(' expr ')'

The value of an expression is a linear combination of named adapters, `{name: coefficient}`. Multiplying two
adapters, dividing by an adapter, or adding a bare number to an adapter are errors, reported with the column.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .adapter import Adapter
from .errors import ExpressionError

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<op>[-+*/()]))")


class _Value:
    """A number (terms empty) or a linear combination of adapters (number unused)."""

    def __init__(self, number: float = 0.0, terms: dict[str, float] | None = None):
        self.number = number
        self.terms = terms or {}

    @property
    def is_number(self) -> bool:
        return not self.terms


class _Parser:
    def __init__(self, text: str, names: set[str] | None):
        self.text, self.names, self.pos = text, names, 0
        self.tokens = []
        while self.pos < len(text):
            if text[self.pos:].strip() == "":
                break
            m = _TOKEN.match(text, self.pos)
            if not m:
                col = self.pos + len(text[self.pos:]) - len(text[self.pos:].lstrip())
                self.error(col, f"unexpected character {text[col]!r}")
            kind = m.lastgroup
            start = m.start(kind)
            self.tokens.append((kind, m.group(kind), start))
            self.pos = m.end()
        self.tokens.append(("end", "", len(text)))
        self.i = 0

    def error(self, col: int, message: str):
        raise ExpressionError(f"{message} at column {col + 1}\n  {self.text}\n  {' ' * col}^", key=self.text)

    def peek(self):
        return self.tokens[self.i]

    def take(self):
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def parse(self) -> _Value:
        if self.peek()[0] == "end":
            self.error(0, "empty expression")
        value = self.expr()
        kind, text, col = self.peek()
        if kind != "end":
            self.error(col, f"unexpected {text!r}")
        return value

    def expr(self) -> _Value:
        left = self.term()
        while self.peek()[1] in ("+", "-") and self.peek()[0] == "op":
            _, op, opcol = self.take()
            right = self.term()
            if left.is_number != right.is_number:
                self.error(opcol, "cannot add a number to an adapter")
            sign = 1.0 if op == "+" else -1.0
            if left.is_number:
                left = _Value(left.number + sign * right.number)
            else:
                terms = dict(left.terms)
                for n, c in right.terms.items():
                    terms[n] = terms.get(n, 0.0) + sign * c
                left = _Value(terms=terms)
        return left

    def term(self) -> _Value:
        left = self.unary()
        while self.peek()[1] in ("*", "/") and self.peek()[0] == "op":
            _, op, opcol = self.take()
            right = self.unary()
            if op == "*":
                if not left.is_number and not right.is_number:
                    self.error(opcol, "cannot multiply two adapters")
                if left.is_number and right.is_number:
                    left = _Value(left.number * right.number)
                else:
                    k, v = (left.number, right) if left.is_number else (right.number, left)
                    left = _Value(terms={n: k * c for n, c in v.terms.items()})
            else:
                if not right.is_number:
                    self.error(opcol, "cannot divide by an adapter")
                if right.number == 0:
                    self.error(opcol, "division by zero")
                left = (_Value(left.number / right.number) if left.is_number
                        else _Value(terms={n: c / right.number for n, c in left.terms.items()}))
        return left

    def unary(self) -> _Value:
        kind, text, col = self.take()
        if kind == "op" and text in "+-":
            v = self.unary()
            s = 1.0 if text == "+" else -1.0
            return _Value(s * v.number) if v.is_number else _Value(terms={n: s * c for n, c in v.terms.items()})
        if kind == "num":
            return _Value(float(text))
        if kind == "name":
            if self.names is not None and text not in self.names:
                known = ", ".join(sorted(self.names)) or "none"
                self.error(col, f"unknown adapter '{text}' (known: {known})")
            return _Value(terms={text: 1.0})
        if kind == "op" and text == "(":
            v = self.expr()
            k2, t2, c2 = self.take()
            if t2 != ")":
                self.error(c2, "expected ')'" if k2 != "end" else "missing ')'")
            return v
        self.error(col, "expected a number, an adapter name or '('" if kind != "end" else "unexpected end")
        raise AssertionError  # unreachable


def parse(expression: str, names: set[str] | None = None) -> dict[str, float]:
    """Parse `expression` into `{adapter name: coefficient}` (in order of first appearance).

    With `names`, an unknown name is an error that points at its column.
    """
    value = _Parser(expression, names).parse()
    if value.is_number:
        raise ExpressionError(f"the expression {expression!r} names no adapter", key=expression)
    return value.terms


def compose(expression: str, adapters: Mapping[str, Adapter] | None = None, *, method: str = "sum",
            rank: int | None = None, energy: float | None = None, params: Mapping[str, Any] | None = None,
            **named: Adapter) -> Adapter:
    """Evaluate `expression` over named adapters, e.g. `compose("0.6*math - 0.3*toxic", math=m, toxic=t)`.

    With the default `method="sum"` the result is the exact weighted sum (lazy; `rank` / `energy` compress it).
    Any registered method can combine the parsed weights instead: `method="pem"` is PEM's factor-wise
    arithmetic, `method="ties"` TIES with these weights, and so on (`params` are the method's own).
    """
    pool = {**(adapters or {}), **named}
    weights = parse(expression, set(pool))
    if method == "sum" and rank is None and energy is None and not params:
        result = Adapter.combination([(c, pool[n]) for n, c in weights.items()])
        if result._terms is not None:
            return result            # lazy and exact; a lone input with weight 1 goes through merge below,
                                     # so that the result records where it came from
    from .merge import merge
    extra = dict(params or {})
    if rank is not None:
        extra["rank"] = rank
    if energy is not None:
        extra["energy"] = energy
    return merge({n: pool[n] for n in weights}, list(weights.values()), method, name=expression, **extra)
