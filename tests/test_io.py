"""lsa_ext.io: atomic writers (CSV here; JSON/text through the evaluation and report tests)."""

from __future__ import annotations

import csv

import pytest

from lsa_ext.io import atomic_write_csv


def test_atomic_write_csv_round_trip_header_order_and_quoting(tmp_path):
    path = tmp_path / "sub" / "t.csv"
    rows = [{"name": "a,b", "eps": 0.1, "value": 'say "hi"'}, {"name": "c", "value": 3}]
    atomic_write_csv(path, rows, ["name", "eps", "value"])
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "name,eps,value" and "\r" not in text
    back = list(csv.DictReader(path.open(newline="")))
    assert back == [{"name": "a,b", "eps": "0.1", "value": 'say "hi"'},
                    {"name": "c", "eps": "", "value": "3"}]


def test_atomic_write_csv_unknown_field_keeps_the_old_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("old\n")
    with pytest.raises(ValueError):
        atomic_write_csv(path, [{"name": "x", "bogus": 1}], ["name"])
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temporary file left
