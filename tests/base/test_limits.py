"""The bounded readers of untrusted values: JSON with limits, whole numbers in ranges."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fps_onnx._limits import INT64_MAX, json_depth, read_json, shown, whole_number
from fps_onnx.errors import DataError


def test_ordinary_json_reads_as_json_does():
    text = ('{"model_max_length": 1000000000000000019884624838656, "eps": 1e-05, "s": "a[{\\"]}", '
            '"n": null, "l": [true, -3, 2.5, {"k": []}], "u": "\\u00e9"}')
    assert read_json(text, "x", DataError) == {
        "model_max_length": 1000000000000000019884624838656, "eps": 1e-05, "s": 'a[{"]}', "n": None,
        "l": [True, -3, 2.5, {"k": []}], "u": "é"}
    assert read_json(text.encode(), "x", DataError)["u"] == "é"


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ("[]", 1), ('{"a": [[1], {"b": {}}]}', 4), ('"[[[["', 0), ('["\\"[[", ["]"]]', 2),
    ('"\\\\" [[', 2),  # an escaped backslash ends the string: the brackets after it count
    ("[" * 100_000, 100_000), ("[]" * 50_000, 1),
])
def test_depth_is_counted_without_recursion_and_not_inside_strings(text, depth):
    assert json_depth(text.encode()) == depth


def test_depth_limit_is_exact_and_the_check_is_fast():
    assert read_json("[" * 100 + "]" * 100, "x", DataError) is not None
    with pytest.raises(DataError, match=r"^x nests arrays and objects deeper than 100 levels$"):
        read_json("[" * 101 + "]" * 101, "x", DataError)
    start = time.monotonic()
    for text, message in (("[" * (2 << 20), "deeper than 100"), ("[" + "[]," * 1_100_000 + "[]]", "more than 1,000,000 values"),
                          ('{"a": ' + "[0]," * 1_000_000 + "1}", "more than 1,000,000 values")):
        with pytest.raises(DataError, match=message):
            read_json(text, "x", DataError)
    assert len(read_json("[" + "0," * 999_999 + "0]", "x", DataError)) == 1_000_000
    assert read_json('["' + "[" * ((16 << 20) - 4) + '"]', "x", DataError)[0][:3] == "[[["  # in a string
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("text, message", [
    ("[" + "1" * 41 + "]", r"^x holds an integer of 41 digits \(at most 40\)$"),
    ("-" + "1" * 5000, r"^x holds an integer of 5,000 digits"),
    ('{"a": NaN}', r"^x holds NaN, which is not a JSON number$"),
    ("[Infinity]", r"^x holds Infinity"),
    ("[-Infinity]", r"^x holds -Infinity"),
    ("1e309", r"^x holds a number beyond float64: '1e309'$"),
    ("{", r"^x is not JSON \(Expecting property name enclosed in double quotes: line 1 column 2\)$"),
    (b"\xff[]", r"^x is not UTF-8 text"),
    ("x" * 17, r"^x is larger than 16 characters$"),
])
def test_json_past_the_limits_is_one_message(text, message):
    with pytest.raises(DataError, match=message):
        read_json(text, "x", DataError, max_chars=16 if len(text) == 17 else 1 << 24)


@pytest.mark.parametrize("value, lo, hi, expected", [
    (5, 0, 10, 5), (np.int64(7), 0, 10, 7), ("10", 0, 10, 10), ("-3", -5, 0, -3), ("0007", 0, 10, 7),
    (INT64_MAX, 1, INT64_MAX, INT64_MAX), (str(INT64_MAX), 1, INT64_MAX, INT64_MAX),
])
def test_whole_numbers_in_range(value, lo, hi, expected):
    assert whole_number(value, "n", DataError, lo, hi) == expected


@pytest.mark.parametrize("value, shown_as", [
    (11, "11"), (-1, "-1"), ("11", "'11'"), (True, "True"), (1.0, "1.0"), ("1.5", "'1.5'"), ("", "''"),
    (" 1", "' 1'"), ("1_0", "'1_0'"), ("٣", "'٣'"), (None, "None"), (np.int64(-2), "-2"),
    (str(INT64_MAX + 1), "'9223372036854775808'"), ("9" * 5000, r"'9999.*'\.\.\. \(5,000 characters\)"),
    (2**200, r"a 201-bit number"), ("1\nError: x", r"'1\\nError: x'"),
])
def test_whole_numbers_out_of_range_or_not_numbers(value, shown_as):
    with pytest.raises(DataError, match=rf"^n must be a whole number from 0 to 10, not {shown_as}$"):
        whole_number(value, "n", DataError, 0, 10)


def test_shown_cuts_long_values_and_escapes_control_characters():
    assert shown("a\nb") == "'a\\nb'"
    assert shown("x" * 100) == "'" + "x" * 40 + "'... (100 characters)"
    assert shown(list(range(100))).endswith("... (390 characters)")
