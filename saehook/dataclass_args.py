"""Command-line flags generated from a dataclass: one flag per field, its default and help from the field.

Each field ``some_name: T = default`` followed by a string literal (its attribute docstring) becomes
``--some-name`` with ``default`` and the docstring's first sentence as help, so the dataclass stays the one
source of defaults. Types:

- ``int`` / ``float`` / ``str``: one value (``int`` accepts counts like ``500k``, ``2M``);
- ``X | None``: as ``X``, or ``none`` for None;
- ``bool``: ``--name`` / ``--no-name``;
- ``Literal[...]``: one of the listed values;
- ``tuple[X, ...]`` of fixed length n: n values (``--betas 0.9 0.999``).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import textwrap
import types
import typing
from dataclasses import MISSING, fields


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal after each annotated field in ``cls``'s source (whitespace
    collapsed); empty when the source is unavailable."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def plain(text: str) -> str:
    """reST markup removed for a terminal: ``:meth:`x``` and ````x```` -> ``x``."""
    return re.sub(r"``(.+?)``", r"\1", re.sub(r":\w+:`~?([^`]+)`", r"\1", text))


def first_sentence(text: str) -> str:
    """The text up to the first ``.``, ``!`` or ``?`` followed by a space and a capital letter, a bracket or
    a backquote (so ``e.g. 0.999`` does not end a sentence); the whole text when there is none."""
    return re.split(r"(?<=[.!?])\s+(?=[A-Z(`])", text, maxsplit=1)[0]


def parse_count(text: str) -> int:
    """``"2M"`` -> 2_000_000, ``"500k"`` -> 500_000, ``"8192"`` -> 8192.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a count.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a count like 8192, 500k or 2M, got {text!r}")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _optional(parse):
    def parse_optional(text: str):
        return None if text.strip().lower() == "none" else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its errors
    return parse_optional


def _arg_spec(name: str, hint) -> dict:
    """argparse keywords (type, nargs, choices, action) for a field of type ``hint``."""
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"field {name!r}: only X | None unions are supported, got {hint}")
        hint = rest[0]
    origin = typing.get_origin(hint)
    if hint is bool:
        if optional:
            raise TypeError(f"field {name!r}: bool | None has no command-line form")
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        values = typing.get_args(hint)
        spec = {"type": type(values[0]), "choices": list(values)}
    elif origin is tuple:
        items = typing.get_args(hint)
        if not items or Ellipsis in items or len(set(items)) != 1:
            raise TypeError(f"field {name!r}: only fixed-length tuples of one type are supported, got {hint}")
        spec = {"type": parse_count if items[0] is int else items[0], "nargs": len(items)}
    elif hint in (int, float, str):
        spec = {"type": parse_count if hint is int else hint}
    else:
        raise TypeError(f"field {name!r}: type {hint} has no command-line form")
    if optional:
        spec["type"] = _optional(spec["type"])
    return spec


def flag(name: str) -> str:
    """``batch_tokens`` -> ``--batch-tokens``."""
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of the dataclass ``cls`` (``dest`` = the field name), its default the field's default
    and its help the first sentence of the field's docstring plus ``(default: ...)``.

    Raises:
        TypeError: a field has no default or a type without a command-line form (see the module docstring).
    """
    hints = typing.get_type_hints(cls, include_extras=False)
    docs = field_docs(cls)
    for f in fields(cls):
        if f.default is MISSING:
            raise TypeError(f"field {f.name!r} of {cls.__name__} has no default; give it one or add the flag by hand")
        spec = _arg_spec(f.name, hints[f.name])
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        text = plain(first_sentence(docs.get(f.name, "")))
        help_ = f"{text} (default: {shown})".strip().replace("%", "%%")
        parser.add_argument(flag(f.name), dest=f.name, default=f.default, help=help_, **spec)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    """An instance of ``cls`` from the parsed flags of :func:`add_dataclass_args` (sequences become tuples)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
