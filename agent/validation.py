"""One wording for a request body that its pydantic model refused, shared by the socket API
and the local server: the field's place (``components[2].size``) and what is wrong with it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

_WANTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "an array",
    "dict_type": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
}


def json_type(value: Any) -> str:
    """How a JSON value's type is named in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def place(loc: tuple[int | str, ...]) -> str:
    """``("components", 2, "size")`` as ``components[2].size``; a key that is not a plain
    word (a component name in a map) as ``['model.bin']``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "body"


def describe(error: ErrorDetails) -> str:
    where = place(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return f"{where} is required"
    if kind == "extra_forbidden":
        return f"{where}: unknown field"
    if kind in _WANTED:
        return f"{where} must be {_WANTED[kind]}, not {json_type(error.get('input'))}"
    if kind == "literal_error":
        return f"{where} must be {error['ctx']['expected']}, not {error.get('input')!r}"
    limits = error.get("ctx") or {}
    if kind == "too_short":
        return f"{where} must have at least {limits['min_length']} item(s)"
    if kind == "too_long":
        return f"{where} may have at most {limits['max_length']} item(s)"
    if kind == "string_too_short":
        n = limits["min_length"]
        return f"{where} must not be empty" if n == 1 else f"{where} must be at least {n} " \
            "characters long"
    if kind == "string_too_long":
        return f"{where} must be at most {limits['max_length']} characters long"
    if kind == "greater_than_equal":
        return f"{where} must be at least {limits['ge']}, not {error.get('input')!r}"
    if kind == "less_than_equal":
        return f"{where} must be at most {limits['le']}, not {error.get('input')!r}"
    if kind == "custom":  # a rule of our own: its message is a phrase about the field
        return f"{where} {error['msg']}"
    return f"{where}: {error['msg']}"


def message(e: ValidationError) -> str:
    """The first problem (as :func:`describe` words it), with how many more there are."""
    errors = e.errors(include_url=False)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return describe(errors[0]) + more
