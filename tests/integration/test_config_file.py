"""A reload from a FIFO is refused at once, through a real broker (issue 14.10).

The reader itself, and why a FIFO froze the daemon, are tested in
tests/unit/test_config_file.py; the rescuer thread here plays the writer after
a while, so a regression fails on its message instead of hanging the suite.
"""

from __future__ import annotations

import os
import threading
import time

import pytest_twisted

from tests.config_support import RESCUE_AFTER_S
from tests.helpers import file_broker


@pytest_twisted.ensureDeferred
async def test_a_reload_from_a_fifo_is_refused_at_once(world, start_broker, tmp_path):
    path = tmp_path / "gpumgr.yaml"
    service, _ = await file_broker(world, start_broker, path)
    path.unlink()
    os.mkfifo(path)
    rescued = threading.Event()

    def rescue() -> None:
        deadline = time.monotonic() + RESCUE_AFTER_S + 5
        time.sleep(RESCUE_AFTER_S)
        while time.monotonic() < deadline and not rescued.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:
                time.sleep(0.05)

    rescuer = threading.Thread(target=rescue, daemon=True)
    rescuer.start()
    try:
        result = service.broker.reload()
    finally:
        rescued.set()
        rescuer.join()
    assert result.reloaded is False
    assert result.error == (f"{path}: is not a regular file (a FIFO); gpumgr reads its "
                               "config only from a regular file")
    assert service.status()["broker"]["reload_failures"] == 1
