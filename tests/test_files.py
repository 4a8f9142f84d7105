"""Torch files read with weights_only=True and clear errors; files written atomically."""

import errno

import pytest
import torch

from icprune.files import FileReadError, atomic_write, load_weights_only


def test_load_weights_only_reads_tensors_and_names_what_it_refuses(tmp_path):
    torch.save({"x": torch.arange(3)}, tmp_path / "ok.pt")
    assert load_weights_only(tmp_path / "ok.pt")["x"].tolist() == [0, 1, 2]
    assert load_weights_only(tmp_path / "ok.pt", mmap=True)["x"].tolist() == [0, 1, 2]
    torch.save(torch.nn.Linear(1, 1), tmp_path / "module.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    whole = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    expected = {
        "module.pt": ("object of class torch.nn.modules.linear.Linear", True),
        "empty.pt": ("the file is empty", False),
        "text.pt": ("not a complete torch.save file", False),
        "cut.pt": ("not a complete torch.save file", False),
    }
    for name, (message, unsafe) in expected.items():
        with pytest.raises(FileReadError, match=message) as bad:
            load_weights_only(tmp_path / name)
        text = str(bad.value)
        assert text.startswith(f"cannot read {str(tmp_path / name)!r} with torch.load(")
        assert "weights_only=False" not in text and "\n" not in text
        assert bad.value.unsafe is unsafe


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    with atomic_write(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.txt.")
        tmp.write_text("first")
    assert path.read_text() == "first"
    with pytest.raises(OSError, match="No space"), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "first" and len(list(tmp_path.iterdir())) == 1


def test_atomic_write_without_replace_refuses_a_file_that_appeared(tmp_path):
    path = tmp_path / "s.json"
    with pytest.raises(FileExistsError), atomic_write(path, replace=False) as tmp:
        tmp.write_text("mine")
        path.write_text("theirs")  # another run finished first
    assert path.read_text() == "theirs" and len(list(tmp_path.iterdir())) == 1
    path.unlink()
    with atomic_write(path, replace=False) as tmp:
        tmp.write_text("mine")
    assert path.read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
