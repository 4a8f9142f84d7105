"""files: weights-only loads with clear errors, atomic writes and saves, the advisory lock."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from icprune import files
from icprune.files import FileReadError, atomic_write, exclusive, load_torch_file, save_atomically

EXECUTED = []


class Payload:
    """Unpickling this would run code: icprune must never do it."""

    def __reduce__(self):
        return (EXECUTED.append, ("ran",))


def test_a_file_with_pickled_objects_is_refused_without_inviting_weights_only_false(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    with pytest.raises(ValueError, match=r"holds Python objects icprune does not load") as info:
        load_torch_file(path, "pruned model file")
    assert "weights_only" not in str(info.value) and "will likely succeed" not in str(info.value)
    assert "class getattr)" in str(info.value)  # names what it found
    assert info.value.unsafe
    assert EXECUTED == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot be read: the file is empty"),
        (b"garbage" * 10, "cannot be read: it is not a complete torch.save file"),
        (None, "cannot be read: it is not a complete torch.save file"),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_damaged_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "file.pt"
    if content is None:
        torch.save({"x": torch.ones(1000)}, path)
        content = path.read_bytes()[:500]
    path.write_bytes(content)
    with pytest.raises(FileReadError, match=rf"checkpoint '.*file.pt' {message}") as info:
        load_torch_file(path, "checkpoint")
    assert not info.value.unsafe and "\n" not in str(info.value)


def test_missing_files_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint '.*nothing.pt' does not exist"):
        load_torch_file(tmp_path / "nothing.pt", "checkpoint")
    with pytest.raises(ValueError, match="is a folder, not a file"):
        load_torch_file(tmp_path, "checkpoint")


def test_an_interrupted_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_atomically({"v": 1}, path)

    def dying(obj, handle):
        handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"v": 2}, path)
    monkeypatch.undo()
    assert load_torch_file(path, "file") == {"v": 1}
    assert os.listdir(tmp_path) == ["model.pt"]


@pytest.mark.skipif(files.fcntl is None, reason="no advisory locks on this platform")
def test_the_lock_refuses_a_second_writer_and_is_removed_after(tmp_path):
    path = tmp_path / "calibration.pt"
    with exclusive(path, "calibration checkpoint"):
        assert (tmp_path / "calibration.pt.lock").exists()
        with (
            pytest.raises(RuntimeError, match="another process is writing calibration checkpoint"),
            exclusive(path, "calibration checkpoint"),
        ):
            pass
    assert not (tmp_path / "calibration.pt.lock").exists()
    with exclusive(path, "calibration checkpoint"):  # free again
        pass


def test_tensors_load_also_mapped(tmp_path):
    torch.save({"x": torch.arange(3)}, tmp_path / "ok.pt")
    assert load_torch_file(tmp_path / "ok.pt")["x"].tolist() == [0, 1, 2]
    assert load_torch_file(tmp_path / "ok.pt", mmap=True)["x"].tolist() == [0, 1, 2]


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
