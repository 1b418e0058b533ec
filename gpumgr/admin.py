"""The operator's actions on one consumer: POST /v1/consumers/<name>/<action>,
run through the scheduler like any job (a load or an unload holds the GPU)."""

from __future__ import annotations

import enum
from typing import Any

from twisted.internet import defer

from gpumgr.admission import Admission
from gpumgr.config import Config
from gpumgr.errors import NotSupported, UnknownConsumer
from gpumgr.registry import Registry
from gpumgr.renders import RenderTracker
from gpumgr.scheduler import Scheduler


class AdminAction(enum.Enum):
    LOAD = "load"
    UNLOAD = "unload"


def run_admin(config: Config, scheduler: Scheduler, admission: Admission,
              render_tracker: RenderTracker, registry: Registry, evicting: bool,
              name: str, action: AdminAction) -> defer.Deferred[dict[str, Any]]:
    """Load or unload `name`; fires with the answer of the admin route."""
    c = config.consumers.get(name)
    if c is None:
        return defer.fail(UnknownConsumer(f"no consumer named {name!r}"))
    if action is AdminAction.LOAD and not c.can_load:
        return defer.fail(NotSupported(f"{name} has no way to load (no load route or "
                                       "process)", consumer=name))
    if action is AdminAction.UNLOAD and not c.can_unload:
        return defer.fail(NotSupported(f"{name} has no way to unload (no unload route, "
                                       "native unload or process)", consumer=name))
    if action is AdminAction.LOAD:
        d = scheduler.run(name, lambda: admission.load(name, "admin", evicting), control=True)
    else:
        # A render of `name` stuck with no evidence that it stopped gives
        # the GPU back to this unload: the operator's way out.
        render_tracker.request_release(name)
        d = scheduler.run(name, lambda: admission.admin_unload(name), control=True)

        def unload_done(result: object) -> object:
            render_tracker.release_done(name)
            return result

        d.addBoth(unload_done)

    def answer(_: object) -> dict[str, Any]:
        state = registry[name]
        return {"consumer": name, "action": action.value, "loaded": state.loaded,
                "gpu_resident_mib": state.gpu_resident_mib}

    return d.addCallback(answer)
