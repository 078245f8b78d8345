"""JSON Lines from a page of rows held by column: for each row, the text ``json.dumps(row, ensure_ascii=False,
default=str)`` writes for the dict of the names and the row's values, byte for byte.

``json.dumps`` per row makes an encoder every call and goes through each value in turn: about half of export's
time on a JSONL file. Here each column is turned into JSON texts once, by one function for the whole column
when the column is of one type (text, integers, finite floats, booleans, each maybe with nulls), and the lines
are made by ``%``-formatting one template, whose keys are encoded once, with each row's texts. Every step is
the one ``json.dumps`` takes for that type (``encode_basestring``, ``int.__repr__``, ``float.__repr__``); a
column of anything else has each value encoded by the C encoder ``json.dumps`` uses, made once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring
from typing import Any

Encoder = Callable[[Any, int], Sequence[str]]

_NONE = type(None)
# The whole column in one call, by the exact type of its values; floats only when all are finite (NaN and the
# infinities are written "NaN", "Infinity" and "-Infinity", which float.__repr__ does not).
_SCALAR_TEXT: dict[type, Callable[[Any], str]] = {
    str: encode_basestring,
    int: int.__repr__,
    float: float.__repr__,
    bool: {True: "true", False: "false"}.__getitem__,
}


def page_encoder(names: Sequence[str]) -> Callable[[Sequence[Sequence[Any]]], str]:
    """A function from a page (one sequence of values a name, all as long) to its lines, each ending in a
    newline. Two equal names make a dict of one key, as ``json.dumps`` of the row's dict did: such rows go
    through a dict each."""
    if len(set(names)) != len(names):
        keys = list(names)
        return lambda columns: "".join(value_text(dict(zip(keys, row))) + "\n" for row in zip(*columns))
    line = "{" + ", ".join(encode_basestring(name).replace("%", "%%") + ": %s" for name in names) + "}\n"
    fill = line.__mod__
    return lambda columns: "".join(map(fill, zip(*map(column_texts, columns))))


def column_texts(column: Sequence[Any]) -> Sequence[str]:
    """The JSON text of each value of the column."""
    kinds = set(map(type, column))
    nulls = _NONE in kinds
    kinds.discard(_NONE)
    if not kinds:
        return ["null"] * len(column)
    if len(kinds) == 1:
        (kind,) = kinds
        text = _SCALAR_TEXT.get(kind)
        if text is not None and (kind is not float or _all_finite(column)):
            return ["null" if value is None else text(value) for value in column] if nulls else list(map(text, column))
    return list(map(value_text, column))


def _all_finite(column: Sequence[Any]) -> bool:
    """Whether no float of the column (floats and None) is NaN or infinite: a sum with one of them is not
    finite (an overflow of the sum only sends the column down the slower, always right, path)."""
    return math.isfinite(sum(filter(None, column), 0.0))


def value_text(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, default=str)``, by an encoder made once."""
    return "".join(_ENCODER(value, 0))


def _dumps(value: Any, _indent: int) -> Sequence[str]:
    return (json.dumps(value, ensure_ascii=False, default=str),)


def _c_encoder() -> Encoder:
    """The C encoder ``json.dumps(..., ensure_ascii=False, default=str)`` makes on every call, with the same
    arguments, made once (or ``json.dumps`` itself where this Python has no such encoder). Values here hold no
    container that holds itself, so it goes without the circular-reference check, which changes nothing
    else. Checked against ``json.dumps`` once, on a value of every kind."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _dumps
    try:
        encoder: Encoder = make(None, str, encode_basestring, None, ": ", ", ", False, False, True)
    except TypeError:  # another Python's arguments
        return _dumps
    probe = {"text": 'é"\n\x00😀', "n": -1, "x": 0.1, "big": 10**20, "nan": float("nan"), "t": [True, None], "d": {}}
    return encoder if "".join(encoder(probe, 0)) == _dumps(probe, 0)[0] else _dumps


_ENCODER = _c_encoder()
