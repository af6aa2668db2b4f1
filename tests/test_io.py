"""ertacache.io: outputs are atomic, exclusive, cleaned after a kill, umask-respecting; --force replaces only ours."""

from __future__ import annotations

import os
import stat

import pytest

from ertacache.errors import UserError
from ertacache.io import (atomic_directory, atomic_write_bytes, copy_tree_no_links, output_lock,
                          remove_stale_siblings)


def ours(path):
    return (path / "marker.json").is_file()


def write_folder(target, force=False, **kw):
    with atomic_directory(target, force=force, what="test folder", recognise=ours, **kw) as tmp:
        (tmp / "marker.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "data.bin").write_bytes(b"1234")
    return target


def test_force_replaces_only_a_folder_the_tool_wrote(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    with pytest.raises(UserError, match="is a file, not a test folder; --force replaces only"):
        write_folder(plain, force=True)
    assert plain.read_text() == "keep me"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="is a folder but not a test folder"):
        write_folder(other, force=True)
    assert (other / "cat.jpg").read_bytes() == b"x"
    link = tmp_path / "link"
    link.symlink_to(other)
    with pytest.raises(UserError, match="symbolic link"):
        write_folder(link, force=True)
    mine = write_folder(tmp_path / "mine")
    with pytest.raises(UserError, match="already exists; pass --force"):
        write_folder(mine)
    write_folder(mine, force=True)
    assert (mine / "sub" / "data.bin").read_bytes() == b"1234"


def test_a_second_writer_of_the_same_out_is_refused_while_the_first_writes(tmp_path):
    target = tmp_path / "out"
    with output_lock(target):
        with pytest.raises(UserError, match="another run is writing"):
            write_folder(target)
    assert not target.exists()
    write_folder(target)  # the lock is released with its holder
    assert not (tmp_path / ".out.lock").exists()


def test_two_writers_cannot_both_succeed(tmp_path):
    """Both passed their early checks before either wrote; the second to finish is refused, not silently last."""
    target = tmp_path / "out"
    with atomic_directory(target, what="test folder", recognise=ours) as tmp:
        (tmp / "marker.json").write_text("{}")
        with pytest.raises(UserError, match="another run is writing"):
            write_folder(target)
    with pytest.raises(UserError, match="already exists"):
        write_folder(target)


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path):
    target = tmp_path / "out"
    (tmp_path / ".out.tmp-abc123").mkdir()
    (tmp_path / ".out.tmp-abc123" / "half.onnx").write_bytes(b"half")
    (tmp_path / ".out.old-zzz").mkdir()
    (tmp_path / ".other.tmp-1").mkdir()  # another output's: left alone
    logged = []
    write_folder(target, log=logged.append)
    assert not (tmp_path / ".out.tmp-abc123").exists() and not (tmp_path / ".out.old-zzz").exists()
    assert (tmp_path / ".other.tmp-1").exists()
    assert len(logged) == 2 and all("left behind by a run that was killed" in line for line in logged)
    assert remove_stale_siblings(target) == []


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                        (0o002, 0o775, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        target = write_folder(tmp_path / "out")
        atomic_write_bytes(tmp_path / "video.gif", b"GIF89a")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == dir_mode
    assert stat.S_IMODE((target / "sub").stat().st_mode) == dir_mode
    assert stat.S_IMODE((target / "sub" / "data.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "video.gif").stat().st_mode) == file_mode


def test_single_file_without_overwrite_is_exclusive(tmp_path):
    path = tmp_path / "v.gif"
    atomic_write_bytes(path, b"one", overwrite=False)
    with pytest.raises(UserError, match="already exists; pass --force"):
        atomic_write_bytes(path, b"two", overwrite=False)
    assert path.read_bytes() == b"one"
    assert [p.name for p in tmp_path.iterdir()] == ["v.gif"]  # no temporary file left
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"


def test_copies_never_follow_links_out_of_the_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    (src / "secret").symlink_to("/etc/hostname")
    with pytest.raises(UserError, match="secret is a symbolic link"):
        copy_tree_no_links(src, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    (src / "secret").unlink()
    (src / ".hidden").write_text("h")
    copy_tree_no_links(src, tmp_path / "dest", ignore_hidden=True)
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["a.txt"]


def test_a_full_disk_is_a_user_error_and_leaves_nothing(tmp_path):
    import errno

    with pytest.raises(UserError, match=r"cannot write the test folder .*: disk full .*nothing was left half-written"):
        with atomic_directory(tmp_path / "out", what="test folder") as tmp:
            (tmp / "part").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):  # other OS errors are not disguised
        with atomic_directory(tmp_path / "out", what="test folder"):
            open(tmp_path / "nope" / "x")


def test_a_killed_single_file_write_is_cleaned_by_the_next(tmp_path):
    stale = tmp_path / ".v.gif.tmp-abc"
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))  # long ago: a killed run's
    fresh = tmp_path / ".v.gif.tmp-now"
    fresh.write_bytes(b"in progress")  # a writer at work right now: left alone
    atomic_write_bytes(tmp_path / "v.gif", b"GIF89a")
    assert not stale.exists() and fresh.exists()


def test_safetensors_problem_names_missing_truncated_and_foreign_files(tmp_path):
    import struct

    import torch
    from safetensors.torch import save_file

    from ertacache.io import safetensors_problem

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(10.0), "b": torch.ones(3, 4)}, str(good))
    assert safetensors_problem(good) is None
    data = good.read_bytes()
    cases = {
        "cut.safetensors": (data[:-1], "is truncated"),  # one byte short of the data
        "headless.safetensors": (data[:20], "its header alone says"),  # cut inside the header
        "stub.safetensors": (b"\x01\x02", "not even a safetensors header"),
        "longer.safetensors": (data + b"\x00" * 7, "is corrupt"),
        "foreign.safetensors": (struct.pack("<Q", 5) + b"hello" + b"\x00" * 16, "not a readable safetensors"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        problem = safetensors_problem(path)
        assert problem is not None and match in problem and str(path) in problem, (name, problem)
    assert "is missing" in safetensors_problem(tmp_path / "absent.safetensors")
