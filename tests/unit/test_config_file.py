"""Only a regular file is read as config, and never in a way that blocks (issue 14.10).

A FIFO as the config path froze the whole daemon for 30 s on reload: the
open() waited for a writer on the reactor's thread. Each test that could
block on today's code has a rescuer thread that plays the writer after a
while, so a regression fails on its message instead of hanging the suite.
"""

from __future__ import annotations

import errno
import io
import os
import threading
import time

import pytest

from gpumgr import cli
from gpumgr.config import ConfigError, load_config, read_config_file
from tests.config_support import RESCUE_AFTER_S


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "gpumgr.yaml"
    os.mkfifo(path)
    stop = threading.Event()

    def rescue() -> None:
        """If someone is blocked reading the FIFO, be its writer: it then reads EOF."""
        if stop.wait(RESCUE_AFTER_S):
            return
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                    return
                time.sleep(0.05)
                continue
            os.close(fd)
            return

    rescuer = threading.Thread(target=rescue, daemon=True)
    rescuer.start()
    yield path
    stop.set()
    rescuer.join()


def test_a_fifo_is_refused_without_reading_it(fifo):
    with pytest.raises(ConfigError) as e:
        load_config(str(fifo))
    assert e.value.file == str(fifo) and e.value.key_path == ""
    assert e.value.problem == ("is not a regular file (a FIFO); gpumgr reads its config only "
                               "from a regular file")


def test_check_config_refuses_a_fifo(fifo):
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["check-config", str(fifo)], stdout=out, stderr=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == (f"config error: {fifo}: is not a regular file (a FIFO); gpumgr "
                              "reads its config only from a regular file\n")


@pytest.mark.parametrize("path,kind", [("/dev/zero", "a character device"),
                                       ("/dev/null", "a character device")])
def test_devices_are_refused(path, kind):
    with pytest.raises(ConfigError) as e:
        read_config_file(path)
    assert f"is not a regular file ({kind})" in e.value.problem


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path))
    assert "is not a regular file (a directory)" in e.value.problem


def test_a_regular_file_is_read_whole_up_to_the_limit(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"x" * 300_000)
    assert read_config_file(str(path)) == b"x" * 300_000
    path.write_bytes(b"y" * (3 * 1024 * 1024))
    assert len(read_config_file(str(path))) == 1024 * 1024 + 1  # enough to refuse it


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "nope.yaml"))
    assert e.value.problem == "cannot read: No such file or directory"


