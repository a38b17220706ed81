import csv
from pathlib import Path

import pytest

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


def test_read_jsonl_rows_skips_torn_invalid_and_duplicate_lines(tmp_path):
    from gape._io import read_jsonl_rows

    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"k": 1, "v": "a"}\n'
        "\n"
        '{"k": 2, "v": "b"}\n'
        '{"k": "x", "v": "not an int key"}\n'  # valid JSON, fails the check
        "[1, 2]\n"  # valid JSON, not a row
        '{"k": 1, "v": "a again"}\n'  # a unit redone after a resume: the last row wins
        '{"k": 3, "v": "c"}\n'
        '{"k": 4, "v": "to',  # torn by a kill mid-write
        encoding="utf-8",
    )

    def valid(row):
        return isinstance(row, dict) and isinstance(row.get("k"), int) and not isinstance(row.get("k"), bool)

    rows, bad, duplicates = read_jsonl_rows(path, valid, lambda r: r["k"])
    assert rows == [{"k": 1, "v": "a again"}, {"k": 2, "v": "b"}, {"k": 3, "v": "c"}]  # first place, last row
    assert (bad, duplicates) == (3, 1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert read_jsonl_rows(empty, valid, lambda r: r["k"]) == ([], 0, 0)


@pytest.mark.parametrize("content, reason", [
    (b"\xff\xfe{}", "can't decode byte 0xff"),  # not UTF-8
    (b'{"steps": 3', "Expecting"),  # torn mid-write
    (b"", "Expecting value"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"3", "expected a JSON object, got int"),
    (b"null", "expected a JSON object, got NoneType"),
])
def test_read_json_object_refuses_anything_but_an_object_naming_the_file(tmp_path, content, reason):
    from gape._io import UnreadableJsonError, read_json_object

    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(UnreadableJsonError, match=reason) as err:
        read_json_object(path)
    assert str(err.value).startswith(f"{path} is unreadable (") and err.value.path == str(path)
    assert isinstance(err.value, ValueError)  # callers that know only ValueError still refuse it


def test_read_json_object_reads_an_object_and_tells_a_missing_file(tmp_path):
    from gape._io import read_json_object

    path = tmp_path / "state.json"
    assert read_json_object(path) is None
    path.write_text('{"a": [1, 2.5], "b": "\u00e9"}', encoding="utf-8")
    assert read_json_object(path) == {"a": [1, 2.5], "b": "\u00e9"}
    assert read_json_object(str(path)) == read_json_object(path)


def test_relative_path_names_no_folder_of_the_machine(tmp_path, monkeypatch):
    import os
    import sys

    from gape._io import relative_path, relative_paths

    run = tmp_path / "repo"
    (run / "gates").mkdir(parents=True)
    (run / "gates" / "g.safetensors").write_bytes(b"")
    lib = tmp_path / "site" / "pkg" / "tasks"
    lib.mkdir(parents=True)
    (lib / "t.yaml").write_text("x", encoding="utf-8")
    monkeypatch.chdir(run)
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path / "site")])
    assert relative_path(run / "gates" / "g.safetensors") == os.path.join("gates", "g.safetensors")
    assert relative_path("./gates/../gates/g.safetensors") == os.path.join("gates", "g.safetensors")  # one label per file
    assert relative_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id is left as it is
    assert relative_path(lib / "t.yaml") == os.path.join("pkg", "tasks", "t.yaml")  # a package's file: from its import root
    outside = tmp_path / "elsewhere" / "tok"
    assert relative_path(outside) == os.path.join("..", "elsewhere", "tok")
    data = {"a": [str(run / "gates" / "g.safetensors"), "/", str(tmp_path / "missing"), 3], "b": {"c": str(lib / "t.yaml")}}
    assert relative_paths(data) == {"a": [os.path.join("gates", "g.safetensors"), "/", str(tmp_path / "missing"), 3],
                                    "b": {"c": os.path.join("pkg", "tasks", "t.yaml")}}
