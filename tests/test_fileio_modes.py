"""Atomic writes give outputs the permissions a plain write would (temp files are created 0600 / 0700)."""
import os
import stat

from pure_fast.fileio import atomic_dir, atomic_path


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_new_file_and_folder_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        f = tmp_path / "out.bin"
        with atomic_path(str(f)) as tmp:
            open(tmp, "wb").write(b"x")
        assert _mode(f) == 0o644
        d = tmp_path / "folder"
        with atomic_dir(str(d)) as tmp:
            open(os.path.join(tmp, "a"), "w").write("a")
        assert _mode(d) == 0o755
    finally:
        os.umask(old)


def test_replacing_a_file_keeps_its_mode(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"old")
    os.chmod(f, 0o640)
    with atomic_path(str(f)) as tmp:
        open(tmp, "wb").write(b"new")
    assert f.read_bytes() == b"new" and _mode(f) == 0o640
