"""Coercion of raw reader values into COPY text fields (pure, no I/O)."""

from __future__ import annotations

import datetime as dt

import pytest

from nurseryd.kinds.migrate.coerce import (
    NULL,
    CoerceError,
    ColumnSpec,
    HeaderError,
    RowCoercer,
    excel_serial_to_datetime,
    make_converter,
    match_header,
    normalize_header,
    parse_column_type,
)


def conv(type_: str, **kw):
    return make_converter(parse_column_type(type_), **kw)


def test_ints_from_calamine_floats_openpyxl_ints_and_text() -> None:
    c = conv("bigint")
    assert c(100001.0) == "100001"
    assert c(5) == "5"
    assert c(" 42 ") == "42"
    assert c("1 234") == "1234"
    assert c("12.0") == "12"
    assert c("") is None and c(None) is None
    for bad in (1.5, "abc", True, dt.datetime(2024, 1, 1)):
        with pytest.raises(CoerceError):
            c(bad)
    with pytest.raises(CoerceError, match="out of range for smallint"):
        conv("smallint")(40000.0)


def test_floats_and_numeric() -> None:
    f = conv("double precision")
    assert f(3.9) == "3.9" and f(5) == "5" and f("4,5") == "4.5" and f("1,234.5") == "1234.5"
    with pytest.raises(CoerceError):
        f(float("nan"))
    n = conv("numeric(2,1)")
    assert n(3.9) == "3.9" and n(5) == "5.0" and n("4,25") == "4.2"
    with pytest.raises(CoerceError, match=r"does not fit numeric\(2,1\)"):
        n(12.5)


@pytest.mark.parametrize("raw,expected", [
    (True, "t"), (False, "f"), (1.0, "t"), (0, "f"), ("yes", "t"), ("No", "f"),
    ("да", "t"), ("НЕТ", "f"), ("TRUE", "t"), ("0", "f"), ("", None), (None, None),
])
def test_bools(raw, expected) -> None:
    assert conv("boolean")(raw) == expected


def test_bool_rejects_other_values() -> None:
    with pytest.raises(CoerceError, match="expected a boolean"):
        conv("boolean")("maybe")
    with pytest.raises(CoerceError):
        conv("boolean")(2)


def test_timestamps_from_datetimes_serials_and_text() -> None:
    c = conv("timestamptz")
    assert c(dt.datetime(2024, 3, 1, 10, 0, 5)) == "2024-03-01 10:00:05"
    # 45352.5 is 2024-03-01 12:00 in the 1900 system, 2028-03-02 12:00 in 1904.
    assert c(45352.5) == "2024-03-01 12:00:00"
    assert conv("timestamptz", date1904=True)(45352.5) == "2028-03-02 12:00:00"
    assert c("2024-03-01T10:00:00+03:00") == "2024-03-01 10:00:00+03:00"
    assert c("2024-03-01 10:00") == "2024-03-01 10:00:00"
    assert c("01.03.2024 10:00") == "2024-03-01 10:00:00"
    assert c(dt.date(2024, 3, 1)) == "2024-03-01 00:00:00"
    assert conv("timestamp")("2024-03-01T10:00:00Z") == "2024-03-01 10:00:00"
    assert conv("date")(45352.0) == "2024-03-01"
    for bad in ("yesterday", "32.13.2024", True, -1.0):
        with pytest.raises(CoerceError):
            c(bad)


def test_excel_1900_leap_bug_and_1904_epoch() -> None:
    assert excel_serial_to_datetime(1) == dt.datetime(1900, 1, 1)
    assert excel_serial_to_datetime(59) == dt.datetime(1900, 2, 28)
    assert excel_serial_to_datetime(61) == dt.datetime(1900, 3, 1)
    assert excel_serial_to_datetime(0, date1904=True) == dt.datetime(1904, 1, 1)
    with pytest.raises(CoerceError, match="1900-02-29"):
        excel_serial_to_datetime(60)


def test_text_is_trimmed_escaped_and_limited() -> None:
    t = conv("text")
    assert t("  a\tb\\c\nd\r ") == "a\\tb\\\\c\\nd"
    assert t("   ") is None
    assert t(100001.0) == "100001" and t(2.5) == "2.5" and t(True) == "true"
    with pytest.raises(CoerceError, match="NUL"):
        t("a\x00b")
    with pytest.raises(CoerceError, match="allows 3"):
        conv("varchar(3)")("abcd")


def test_types_are_validated() -> None:
    assert parse_column_type("int8").sql == "bigint"
    assert parse_column_type("timestamp with time zone").kind == "timestamptz"
    assert parse_column_type("varchar(20)").max_length == 20
    for bad in ("json", "text(5)", "numeric(2,3)", "bigint(3)"):
        with pytest.raises(ValueError):
            parse_column_type(bad)


COLUMNS = [
    ColumnSpec("chat_id", "bigint", False, ("ID чата",), key=True),
    ColumnSpec("created_at", "timestamptz", False, ("Дата создания",)),
    ColumnSpec("rating", "double precision", True, ("Оценка",)),
    ColumnSpec("is_vip", "boolean", False, ("VIP",)),
    ColumnSpec("note", "text", True),
]


def test_header_matching_is_case_spacing_and_alias_insensitive() -> None:
    assert normalize_header(" Chat_ID ") == normalize_header("chat id") == "chatid"
    match = match_header(["Id  Чата", "ДАТА СОЗДАНИЯ", "extra", "vip", None], COLUMNS)
    assert [c.name for c in match.columns] == ["chat_id", "created_at", "is_vip"]
    assert match.positions == (0, 1, 3)
    assert match.ignored == ("extra",)


def test_header_missing_required_columns_lists_them() -> None:
    with pytest.raises(HeaderError, match="created_at, is_vip") as info:
        match_header(["chat_id", "rating"], COLUMNS)
    assert info.value.missing == ["created_at", "is_vip"]


def test_rows_become_copy_lines_and_rejects_with_reasons() -> None:
    coercer = RowCoercer(match_header(["chat_id", "created_at", "rating", "is_vip", "note"],
                                      COLUMNS))
    when = dt.datetime(2024, 1, 2, 3, 4, 5)
    batch = coercer.coerce_rows([
        (2, [1.0, when, 4.5, True, " hi "]),
        (3, [2.0, when, "", False, ""]),
        (4, ["", "", "", "", ""]),  # empty row in the middle: skipped, not a reject
        (5, [3.5, when, None, True, None]),  # not a whole number
        (6, [4.0, None, None, True, None]),  # NOT NULL missing
        (7, [1.0, when, 1.0, "да", "dup"]),  # same key as row 2: last wins
    ])
    assert batch.rows_seen == 5 and batch.good == 3 and batch.written == 2
    assert batch.payload.splitlines() == [
        f"1\t{when.isoformat()}\t1.0\tt\tdup",
        f"2\t{when.isoformat()}\t{NULL}\tf\t{NULL}",
    ]
    assert [(r.row_number, r.column) for r in batch.rejects] == [(5, "chat_id"),
                                                                 (6, "created_at")]
    assert "whole number" in batch.rejects[0].reason
    assert "required" in batch.rejects[1].reason
    assert batch.rejects[0].raw["chat_id"] == 3.5


def test_openpyxl_style_values_take_the_same_path() -> None:
    coercer = RowCoercer(match_header(["chat_id", "created_at", "rating", "is_vip"], COLUMNS))
    when = dt.datetime(2024, 1, 2, 3, 4, 5)
    batch = coercer.coerce_rows([(2, (1, when, 5, True)), (3, (2, when, None, False))])
    assert batch.rejects == []
    assert batch.payload.splitlines()[0] == f"1\t{when.isoformat()}\t5\tt"


def test_aware_datetime_columns_keep_the_instant_on_the_fast_path() -> None:
    """asyncpg returns timestamptz as aware datetimes: converted a column at a time,
    they must mean the same instants as the per-value converter's output."""
    from nurseryd.kinds.migrate.coerce import convert_column

    column_type = parse_column_type("timestamptz")
    scalar = make_converter(column_type)
    moscow = dt.timezone(dt.timedelta(hours=3))
    values = [dt.datetime(2024, 3, 1, 10, 0, 5, tzinfo=moscow),
              dt.datetime(2023, 12, 31, 23, 59, 59, 123456, tzinfo=dt.UTC)]
    errors: dict[int, str] = {}
    fast = convert_column(column_type, scalar, values, errors)
    assert not errors
    assert [dt.datetime.fromisoformat(text) for text in fast] == values
    assert [dt.datetime.fromisoformat(text) for text in fast] == [
        dt.datetime.fromisoformat(scalar(value)) for value in values]


@pytest.mark.parametrize("type_", ["timestamptz", "timestamp"])
def test_iso_text_columns_take_the_fast_path_with_the_same_values(type_: str) -> None:
    """SQLite hands timestamps over as ISO text: column-wise conversion must give
    the values the per-value converter gives, and still reject what it rejects."""
    from nurseryd.kinds.migrate.coerce import convert_column

    column_type = parse_column_type(type_)
    scalar = make_converter(column_type)
    values = ["2024-03-01 10:00:05", "2023-12-31T23:59:59.123456", "2024-02-29"]
    errors: dict[int, str] = {}
    fast = convert_column(column_type, scalar, values, errors)
    assert not errors
    assert [dt.datetime.fromisoformat(text) for text in fast] == [
        dt.datetime.fromisoformat(scalar(value)) for value in values]
    # One bad value sends the whole column down the per-value path: it is rejected
    # with a reason and its neighbours still convert.
    errors = {}
    mixed = convert_column(column_type, scalar, ["2024-03-01 10:00:05", "2024-13-01"], errors)
    assert list(errors) == [1] and mixed[0] is not None


def test_columns_with_nulls_and_sqlite_booleans_stay_exact_on_the_fast_path() -> None:
    """NULLs go back to their rows; 0/1 are booleans; a 2 is still a reject."""
    from nurseryd.kinds.migrate.coerce import convert_column

    stamp = parse_column_type("timestamptz")
    errors: dict[int, str] = {}
    out = convert_column(stamp, make_converter(stamp),
                         [None, "2024-03-01 10:00:05", None, "2024-02-29"], errors)
    assert not errors
    assert out[0] is NULL and out[2] is NULL
    assert dt.datetime.fromisoformat(out[1]) == dt.datetime(2024, 3, 1, 10, 0, 5)
    assert dt.datetime.fromisoformat(out[3]) == dt.datetime(2024, 2, 29)
    flag = parse_column_type("boolean")
    assert convert_column(flag, make_converter(flag), [1, 0, None, True], errors) == [
        "t", "f", NULL, "t"]
    assert not errors
    convert_column(flag, make_converter(flag), [1, 2, 0], errors)
    assert list(errors) == [1]


@pytest.mark.parametrize("value", [1e39, -3.5e38, 1e-50, "1e39", "-1e-46", 10**39])
def test_real_columns_reject_what_postgresql_cannot_store_as_real(value) -> None:
    """A value outside float4's range passed as text to a real column makes PostgreSQL
    fail the whole COPY (found by the equivalence test: "1e+39" is out of range for type
    real): it must be this row's reject, on the scalar and on the column path."""
    with pytest.raises(CoerceError, match="out of range for real"):
        conv("real")(value)
    assert conv("double precision")(value) is not None
    header = ["id", "r"]
    columns = [ColumnSpec("id", "bigint", False, key=True), ColumnSpec("r", "real")]
    for rows in ([[1.0, value]], [[1.0, value], [2.0, 1.5]], [[2.0, 1.5], [1.0, value]]):
        batch = RowCoercer(match_header(header, columns)).coerce_rows(
            [(i + 2, row) for i, row in enumerate(rows)])
        assert [r.row_number for r in batch.rejects] == [2 + rows.index([1.0, value])]
        assert "out of range for real" in batch.rejects[0].reason
    assert conv("real")(3.4e38) == repr(3.4e38) and conv("real")(1.5e-45) == repr(1.5e-45)
