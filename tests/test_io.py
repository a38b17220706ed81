import csv
from pathlib import Path

from gape._io import replace_atomic, write_csv_atomic


def test_atomic_csv_and_replace(tmp_path):
    path = tmp_path / "rows.csv"
    write_csv_atomic(path, ["a", "b"], [{"a": 1, "b": "x"}, {"a": 2, "b": "y,z"}])
    with open(path, newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y,z"}]
    target = tmp_path / "blob.bin"
    replace_atomic(target, lambda tmp: Path(tmp).write_bytes(b"abc"))
    assert target.read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "rows.csv"]  # no temporaries left
