"""dit_jax.outputs: output paths checked before the work."""

import pytest

from dit_jax.outputs import check_output


def test_a_writable_path_is_left_as_it_was(tmp_path):
    new = check_output("--out", tmp_path / "sub" / "a.png", suffix=".png")
    assert new.parent.is_dir() and not new.exists()  # the folder is made, the probe removed
    old = tmp_path / "b.json"
    old.write_text("kept")
    check_output("--json", old)
    assert old.read_text() == "kept"


@pytest.mark.parametrize("name, suffix, message", [
    ("a.jpg", ".png", "give a file name ending in .png"),
    ("folder", None, "is a folder"),
    ("file/x.md", None, "cannot write it"),
])
def test_paths_that_cannot_be_written_are_named(tmp_path, name, suffix, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=message):
        check_output("--out", tmp_path / name, suffix=suffix)
