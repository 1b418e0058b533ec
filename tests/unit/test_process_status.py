"""ManagedProcess.status() is a frozen value; /v1/status renders it as it always has."""

from __future__ import annotations

import json

import attrs
import pytest
from twisted.internet.task import Clock

from gpumgr.config import ProcessConfig
from gpumgr.process import ManagedProcess, ProcessState, ProcessStatus
from gpumgr.status import process_document


def test_the_status_document_keeps_its_keys_and_types():
    status = ProcessStatus(ProcessState.FAILED, pid=None, started_at=None, exit_code=-9,
                           restarts=3, last_stderr=("CUDA error", ""))
    document = process_document(status)
    assert document == {"state": "failed", "pid": None, "started_at": None, "exit_code": -9,
                        "restarts": 3, "last_stderr": ["CUDA error", ""]}
    assert list(document) == ["state", "pid", "started_at", "exit_code", "restarts",
                              "last_stderr"]
    json.dumps(document)


def test_status_is_frozen_and_read_from_the_process():
    mp = ManagedProcess(Clock(), "whisper", ProcessConfig(command=("whisper-server",)),
                        probe=lambda: None, clock=Clock())
    status = mp.status()
    assert status == ProcessStatus(ProcessState.STOPPED, pid=None, started_at=None,
                                   exit_code=None, restarts=0, last_stderr=())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        status.restarts = 1
