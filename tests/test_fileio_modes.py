"""Atomic writes give outputs the permissions a plain write would (temp files are created 0600 / 0700)."""
import os
import stat

import pytest

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


def test_write_text_is_atomic_and_card_uses_it(tmp_path, monkeypatch):
    """write_text replaces a file whole or not at all; the toy model card goes through it."""
    import pure_fast.fileio as fileio
    from pure_fast.toy.card import write_card

    p = tmp_path / "notes.json"
    fileio.write_text(p, "first")
    assert p.read_text() == "first"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(OSError):
        fileio.write_text(p, "second")
    assert p.read_text() == "first" and sorted(x.name for x in tmp_path.iterdir()) == ["notes.json"]
    monkeypatch.undo()
    card = write_card(tmp_path, unet_params=123, extra={"note": "x"})
    assert card["unet_params"] == 123
    assert '"unet_params": 123' in (tmp_path / "model_card.json").read_text()
    assert (tmp_path / "MODEL_CARD.md").read_text().strip()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".tmp-")]
