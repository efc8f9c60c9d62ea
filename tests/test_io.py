"""lsa_ext.io: atomic writers (CSV, file modes, read-only file systems; JSON/text also through
the evaluation and report tests)."""

from __future__ import annotations

import csv
import errno
import os
import stat
import subprocess
import sys

import pytest

from lsa_ext.errors import LsaUserError
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


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


UMASKS = (0o022, 0o077, 0o002)


def test_outputs_follow_the_umask_in_a_fresh_process(tmp_path):
    """Every writer (text, JSON, CSV, binary, checkpoints) gives 0o666 & ~umask, as ``open``
    would; the umask is set in a child process (022 first, by preexec_fn; then 077 and 002),
    so the test process's own umask is not touched."""
    code = (
        "import os, sys, torch\n"
        "from lsa_ext.io import atomic_write_json, atomic_write_csv, atomic_write_with\n"
        "from lsa_ext.checkpoint import save_checkpoint\n"
        "for d, u in zip(sys.argv[1:], (None, 0o077, 0o002)):\n"
        "    if u is not None: os.umask(u)\n"
        "    atomic_write_json(d + '/a.json', {'x': 1})\n"
        "    atomic_write_json(d + '/a.json', {'x': 2})\n"  # replacing an existing file
        "    atomic_write_csv(d + '/b.csv', [{'a': 1}], ['a'])\n"
        "    atomic_write_with(d + '/c.pt', lambda f: torch.save({'w': torch.ones(2)}, f))\n"
        "    save_checkpoint(d + '/last.pt', {'epoch': 0})\n"
        "    save_checkpoint(d + '/last.pt', {'epoch': 1})\n"  # keeps prev.pt
    )
    dirs = [tmp_path / oct(u) for u in UMASKS]
    for d in dirs:
        d.mkdir()
    res = subprocess.run([sys.executable, "-c", code, *map(str, dirs)], capture_output=True,
                         text=True, timeout=120, preexec_fn=lambda: os.umask(UMASKS[0]))
    assert res.returncode == 0, res.stderr
    for d, umask in zip(dirs, UMASKS, strict=True):
        names = sorted(p.name for p in d.iterdir())
        assert names == ["a.json", "b.csv", "c.pt", "last.pt", "prev.pt"]  # no temporary left
        for name in names:
            assert _mode(d / name) == 0o666 & ~umask, (d.name, name, oct(_mode(d / name)))


def test_read_only_file_system_is_named_as_such(tmp_path, monkeypatch):
    """EROFS, whether found by ``check_dir`` (statvfs) or met while writing, is reported as
    'read-only file system', not as 'permission denied'; the old file is kept."""
    import lsa_ext.io as lio

    target = tmp_path / "r.json"
    target.write_text("old")

    class _Vfs:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(lio.os, "statvfs", lambda p: _Vfs())
    with pytest.raises(LsaUserError, match=r"is on a read-only file system"):
        lio.check_dir(tmp_path / "sub")
    monkeypatch.undo()

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(lio.os, "open", refuse)
    with pytest.raises(LsaUserError, match=r"cannot write .*r\.json': read-only file system"):
        lio.atomic_write_json(target, {"x": 1})
    monkeypatch.undo()
    monkeypatch.setattr(lio.os, "replace", refuse)
    with pytest.raises(LsaUserError, match="read-only file system"):
        lio.atomic_write_json(target, {"x": 1})
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
