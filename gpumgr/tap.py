"""`twistd gpumgr`: command-line options and makeService.

Kept apart from `service` (as the magic-wormhole mailbox server keeps its
`server_tap`): the demo builds on the service, and the options choose
between them, so neither imports the other.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from gpumgr.config import (
    SCHEDULER_MODES,
    Config,
    ConfigError,
    find_self_reference,
    listen_problem,
    load_config,
)
from gpumgr.logs import LOG_FORMATS, Redactor, twistd_logging_problem, with_twistd_logging
from gpumgr.service import GpumgrService
from gpumgr.states import SchedulerMode
from gpumgr.testing.demo import DEMO_MAX_GPUS, make_demo_service


class Options(usage.Options):
    synopsis = "[--config PATH | --demo] [--listen ENDPOINT]"
    longdesc = (
        "gpumgr fronts several GPU services behind one HTTP door: routing, "
        "streaming, health probes, a GPU lock and VRAM-driven eviction."
    )
    optParameters = [
        ["config", "c", None, "Path of the YAML config (see etc/consumers.yaml)."],
        ["listen", None, None, "Twisted server endpoint; overrides the config's listen."],
        ["mode", None, None, f"Scheduler mode; overrides scheduler.mode ({', '.join(SCHEDULER_MODES)})."],
        ["gpus", None, None, f"With --demo: how many simulated cards (1 to {DEMO_MAX_GPUS}; "
         "default 1)."],
        ["log-format", None, "text",
         f"Log lines as {' or '.join(LOG_FORMATS)} (json: one object a line, for journald/Loki)."],
    ]
    optFlags = [
        ["demo", None, "Run against built-in simulated consumers and a simulated GPU."],
    ]

    def postOptions(self) -> None:
        if self["demo"] and self["config"]:
            raise usage.UsageError("use either --config or --demo, not both")
        self["demo_gpus"] = _demo_gpus(self["gpus"], self["demo"])
        if not self["demo"]:
            if not self["config"]:
                raise usage.UsageError("--config PATH is required (or --demo to try it out)")
            try:
                config = with_mode(load_config(self["config"]), self["mode"])
            except ConfigError as e:
                raise usage.UsageError(f"config error: {e}") from None
            self["parsed_config"] = config
        elif self["mode"] is not None and self["mode"] not in SCHEDULER_MODES:
            raise usage.UsageError(
                f"--mode: must be one of {', '.join(SCHEDULER_MODES)}; got {self['mode']!r}")
        problem = twistd_logging_problem(_twistd_options(self), self["log-format"])
        if problem is not None:
            raise usage.UsageError(problem)
        token = None if self["demo"] else self["parsed_config"].admin_token
        self["redactor"] = Redactor([token])
        listen = self["listen"] or (None if self["demo"] else self["parsed_config"].listen)
        if listen is not None:
            _check_endpoint(listen, "--listen" if self["listen"] else "listen")
        if self["listen"] and not self["demo"]:
            config = self["parsed_config"]
            looping = find_self_reference(self["listen"], config.consumers)
            if looping is not None:
                raise usage.UsageError(
                    f"--listen {self['listen']}: {config.source}: consumers.{looping}.url "
                    "points at this listen address; gpumgr would proxy to itself")


def _demo_gpus(raw: str | None, demo: bool) -> int:
    """--gpus: only with --demo (a real box's cards come from nvidia-smi)."""
    if raw is None:
        return 1
    if not demo:
        raise usage.UsageError("--gpus is for --demo only: with a config, gpumgr reads the "
                               "cards from nvidia-smi (consumers.<name>.gpu places consumers)")
    if not raw.isdigit() or not 1 <= int(raw) <= DEMO_MAX_GPUS:
        raise usage.UsageError(f"--gpus: must be a whole number from 1 to {DEMO_MAX_GPUS}; "
                               f"got {raw!r}")
    return int(raw)


def with_mode(config: Config, mode: str | None) -> Config:
    """The config with scheduler.mode replaced by --mode, if given."""
    if mode is None:
        return config
    if mode not in SCHEDULER_MODES:
        raise usage.UsageError(f"--mode: must be one of {', '.join(SCHEDULER_MODES)}; got {mode!r}")
    return attrs.evolve(config, scheduler=attrs.evolve(config.scheduler, mode=SchedulerMode(mode)))


def _twistd_options(options: usage.Options) -> dict[str, Any]:
    """twistd's own options (-n, --logfile, ...) when run as `twistd gpumgr`."""
    parent = getattr(options, "parent", None)
    return dict(parent) if parent is not None else {}


def _check_endpoint(description: str, what: str) -> None:
    """Refuse an endpoint that cannot be built, before anything starts.

    Whether it can be bound (a busy port, a foreign address) shows only when
    listening; `service._ListenService` turns that into a one-line exit.
    """
    from twisted.internet import reactor

    problem = listen_problem(description)
    if problem is not None:
        raise usage.UsageError(f"{what}: {problem}")
    try:
        serverFromString(reactor, description)
    except Exception as e:  # any plugin's parser: a bad description, a missing key file
        raise usage.UsageError(f"{what}: invalid endpoint {description!r}: {e}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    redactor = options.get("redactor") or Redactor()
    if options["demo"]:
        service: IService = make_demo_service(reactor, options["listen"], options["mode"],
                                              options.get("demo_gpus", 1))
    else:
        mode = options["mode"]
        gpumgr = GpumgrService(reactor, options["parsed_config"], options["listen"],
                               overrides=lambda config: with_mode(config, mode),
                               install_signals=True)
        # A token a reload brings in is redacted from then on (old ones stay so).
        gpumgr.broker.config_listeners.append(lambda config: redactor.add(config.admin_token))
        service = gpumgr
    twistd = _twistd_options(options) or None
    return with_twistd_logging(service, twistd, options["log-format"], redactor)
