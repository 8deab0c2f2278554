"""Atomic writes (imagegpt.files), used by every JSON the library writes."""

import pytest

from imagegpt.files import write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "palette.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # fails inside the write
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["palette.json"]
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
