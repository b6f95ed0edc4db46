"""A folder source reads only regular files inside it (issue 14, item 5): a FIFO named like an image
would block the job forever, a device (or a symlink to /dev/zero) never ends, a link out of the folder
reads what the folder does not hold. Each fails its own key with a reason; the other keys are read."""

from __future__ import annotations

import os
import threading

import pytest

from astrea.data import open_source
from astrea.data.base import DataError
from tests.data.builders import jpeg


def _samples_within(src, seconds: float = 60.0) -> dict:
    """Read every sample in a thread: a blocking read fails the test instead of hanging the suite."""
    out: dict = {}

    def read():
        out.update({s.key: s for sh in src.shards() for s in sh})

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "reading the folder blocked"
    return out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_device_and_links_out_of_the_folder_fail_their_key(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "good.jpg").write_bytes(jpeg())
    os.mkfifo(d / "pipe.jpg")
    os.mkfifo(d / "good.txt")  # a FIFO as the caption sidecar must not block either
    os.symlink("/dev/zero", d / "zero.jpg")
    os.symlink(d / "pipe.jpg", d / "to_pipe.png")  # inside the folder, but not a regular file
    src = open_source(str(d), format="folder")
    by_key = _samples_within(src)
    assert by_key["good"].ok and by_key["good"].caption is None
    assert by_key["pipe"].error == "not a regular file: 'pipe.jpg' is a FIFO"
    assert by_key["to_pipe"].error == "not a regular file: 'to_pipe.png' is a FIFO"
    assert by_key["zero"].error.startswith("outside the source: 'zero.jpg'")


def test_character_device_inside_the_folder_fails_its_key(tmp_path):
    import stat

    d = tmp_path / "imgs"
    d.mkdir()
    (d / "good.jpg").write_bytes(jpeg())
    try:
        os.mknod(d / "dev.jpg", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    by_key = _samples_within(open_source(str(d), format="folder"))
    assert by_key["good"].ok and by_key["dev"].error == "not a regular file: 'dev.jpg' is a character device"


def test_only_captions_is_not_an_image_dataset(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("a caption")
    (d / "b.txt").write_text("another")
    with pytest.raises(DataError, match="no image files"):
        open_source(str(d), format="folder").shards()


def test_size_limit_is_enforced_while_reading_not_only_from_stat(tmp_path, monkeypatch):
    """A file whose size the filesystem under-reports (or that grows while read) stops at the limit: the
    read never returns more than max_image_bytes, whatever fstat said."""
    from astrea.data import folder

    d = tmp_path / "imgs"
    d.mkdir()
    (d / "big.jpg").write_bytes(b"\xff" * 5000)
    real_fstat = os.fstat

    def lying_fstat(fd):
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 10,
                               st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr(folder.os, "fstat", lying_fstat)
    data, reason = folder.read_file(d / "big.jpg", "big.jpg", 1000, root=d)
    assert data is None and reason.startswith("file too large: 'big.jpg' grew past the limit"), reason
