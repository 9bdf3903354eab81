"""Reading values from untrusted files within limits: JSON and whole numbers.

Every JSON text an input file carries (mask, stats and delta metadata,
``.jsonl`` lines, a model folder's ``config.json`` and ``tokenizer_config.json``)
is read by :func:`read_json`: its size, nesting depth and integer lengths are
checked before it is parsed, so a few hundred bytes of ``[[[[...`` or a
5,000-digit number is one error, never a RecursionError or a ValueError from
``int``. Every number a file gives (counts, shapes, shard K/N, batch sizes,
seeds) goes through :func:`whole_number` with the range it may take before it
sizes a loop or an allocation; so do the numbers of the command line that
size one (``--max-length``, ``--seed``).
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from .errors import FpsError

INT64_MAX = 2**63 - 1
#: The largest seed every command accepts (NumPy's legacy seeds are 32-bit; torch takes them too).
SEED_MAX = 2**32 - 1
#: Tokens per text sample (``--max-length`` of ``select`` and ``train``): above any model's positions.
MAX_LENGTH = 1 << 24
#: The most shards one calibration may be cut into (``--shard K/N`` and a stats file's ``shard``).
MAX_SHARDS = 1_000_000
#: Characters of one JSON text (a metadata entry, a config file, a .jsonl line).
MAX_JSON_CHARS = 16 << 20
#: Nesting of JSON arrays and objects (Python's parser recurses: about 1,000 levels end it).
MAX_JSON_DEPTH = 100
#: Values of one JSON text (arrays and objects, and their members): ~100 MB parsed at most.
MAX_JSON_VALUES = 1_000_000
#: Digits of a JSON integer (Hugging Face writes 1e30 as a 31-digit sentinel length).
MAX_JSON_DIGITS = 40
#: Entries of one weight a file may claim (a mask's shape): 64 G, far above any model's largest
#: matrix (a 128k vocabulary x 16k hidden embedding is 2 G), far below what int64 indices hold.
MAX_WEIGHT_ENTRIES = 1 << 36

# A JSON string, escapes included; what lies between quotes never nests.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_PIECE = 1 << 20


class _Refused(ValueError):
    """A value the parse hooks refuse; the message completes "<what> ..."."""


def read_json(text: str | bytes, what: str, error: type[FpsError], *,
              max_chars: int = MAX_JSON_CHARS, max_depth: int = MAX_JSON_DEPTH,
              max_values: int = MAX_JSON_VALUES) -> object:
    """The value of the JSON ``text``; ``error("<what> ...")`` unless it is JSON within the limits.

    Refused before parsing: more than ``max_chars`` characters, arrays and
    objects nested deeper than ``max_depth`` (counted without recursion), more
    than about ``max_values`` values (what the parsed value costs in memory);
    while parsing: integers of more than :data:`MAX_JSON_DIGITS` digits, and
    NaN, Infinity and numbers beyond float64 (not JSON numbers).
    """
    if len(text) > max_chars:
        raise error(f"{what} is larger than {max_chars:,} characters")
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    else:
        data = bytes(text)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    outside = _STRING.sub(b'""', data)  # what lies between quotes never nests
    if _depth(outside) > max_depth:
        raise error(f"{what} nests arrays and objects deeper than {max_depth} levels")
    values = sum(outside.count(c) for c in (b",", b"[", b"{"))  # about one per value (a pair: one)
    if values > max_values:
        raise error(f"{what} holds more than {max_values:,} values")
    try:
        return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    except _Refused as exc:
        raise error(f"{what} {exc}") from None
    except RecursionError:  # the depth check above keeps far from it; kept as a last guard
        raise error(f"{what} nests arrays and objects too deeply") from None


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of the JSON ``data`` nest (brackets in strings not
    counted), in one vectorised pass; an unclosed string's brackets count too."""
    return _depth(_STRING.sub(b'""', data))


def _depth(outside: bytes) -> int:
    """:func:`json_depth` of JSON whose strings are already emptied."""
    brackets = outside.translate(None, _BRACKETS)
    deepest = depth = 0
    for start in range(0, len(brackets), _PIECE):
        run = np.cumsum(_STEP[np.frombuffer(brackets, np.uint8, min(_PIECE, len(brackets) - start), start)],
                        dtype=np.int64) + depth
        deepest, depth = max(deepest, int(run.max())), int(run[-1])
    return deepest


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_DIGITS:
        raise _Refused(f"holds an integer of {len(digits.lstrip('-')):,} digits "
                       f"(at most {MAX_JSON_DIGITS})")
    return int(digits)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"holds a number beyond float64: {shown(text)}")
    return value


def _constant(name: str):
    raise _Refused(f"holds {name}, which is not a JSON number")


def whole_number(value: object, what: str, error: type[FpsError], lo: int = 0, hi: int = INT64_MAX) -> int:
    """``value`` (an int, a NumPy integer, or a string of decimal digits from a file's
    metadata) as an int in [``lo``, ``hi``]; else ``error("<what> must be ...")``."""
    number = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value) \
            and len(value.lstrip("-").lstrip("0")) <= len(str(max(abs(lo), abs(hi)))):
        number = int(value)
    if number is None or not lo <= number <= hi:
        raise error(f"{what} must be a whole number from {lo:,} to {hi:,}, not {shown(value)}")
    return number


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def shown(value: object, limit: int = 40) -> str:
    """``value`` for a message: repr'd (so control characters are escaped), and cut to
    about ``limit`` characters with the full length said."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = int(value)
        if value.bit_length() > 128:
            return f"a {value.bit_length():,}-bit number"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}... ({len(text):,} characters)"
