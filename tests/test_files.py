"""files: weights-only loads with clear errors, atomic saves, the advisory lock."""

from __future__ import annotations

import os

import pytest
import torch

from icprune import files
from icprune.files import exclusive, load_torch_file, save_atomically

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
    assert "(getattr)" in str(info.value)  # names what it found (list.append, via getattr)
    assert EXECUTED == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot be read: it is empty or truncated"),
        (b"garbage" * 10, "cannot be read: it is not a torch file"),
        (None, "cannot be read: it is truncated or damaged"),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_damaged_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "file.pt"
    if content is None:
        torch.save({"x": torch.ones(1000)}, path)
        content = path.read_bytes()[:500]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"checkpoint '.*file.pt' {message}"):
        load_torch_file(path, "checkpoint")


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
