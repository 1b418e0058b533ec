"""Only a regular file is read as config, and never in a way that blocks (issue 14.10).

A FIFO as the config path froze the whole daemon for 30 s on reload: the
open() waited for a writer on the reactor's thread. Each test that could
block on today's code has a rescuer thread that plays the writer after a
while, so a regression fails on its message instead of hanging the suite.
"""

from __future__ import annotations

import os
import threading
import time

import pytest_twisted

from tests.helpers import file_broker

#: How long the rescuer waits before it unblocks a reader that should never have blocked.
RESCUE_AFTER_S = 3.0


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
