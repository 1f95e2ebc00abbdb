"""Atomic writes: all or nothing, and the mode any new file gets under the umask."""

import os
import stat

import pytest

from c2srepro._cache import atomic_path, write_json_atomic


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_json_atomic(tmp_path / "result.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a table")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_the_old_one_whole(tmp_path):
    from c2srepro._cache import atomic_directory

    target = tmp_path / "layers"
    target.mkdir()
    (target / "layer_03").mkdir()  # a stale layer from an earlier, larger run
    old = os.umask(0o022)
    try:
        with atomic_directory(target) as staging:
            (staging / "layer_00").mkdir()
            assert (target / "layer_03").exists()  # readers still see the old directory meanwhile
    finally:
        os.umask(old)
    assert sorted(p.name for p in target.iterdir()) == ["layer_00"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "half").mkdir()
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers"]
    assert sorted(p.name for p in target.iterdir()) == ["layer_00"]


def test_json_is_written_strictly(tmp_path):
    target = tmp_path / "model.json"
    with pytest.raises(ValueError, match=r"model.json: heldout_accuracy, layers\[1\].fvu is NaN or infinite"):
        write_json_atomic(target, {"heldout_accuracy": float("nan"), "layers": [{"fvu": 0.1}, {"fvu": float("inf")}]})
    assert not target.exists()
    write_json_atomic(target, {"heldout_accuracy": None})
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"heldout_accuracy":null}'
