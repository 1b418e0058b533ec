"""The `http` driver: everything comes from the config's routes."""

from __future__ import annotations

from gpumgr.drivers.base import BaseDriver


class HttpDriver(BaseDriver):
    """Health is required in the config; load and unload are the configured
    calls; POST, PUT, PATCH and DELETE through pass-through are GPU work."""

    name = "http"
