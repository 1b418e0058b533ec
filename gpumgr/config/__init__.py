"""The config: parsed once into frozen values; every error names file and key path.

The rest of gpumgr never touches raw YAML. `load_config(path)` either returns a
`Config` or raises `ConfigError("file: key.path: what is wrong")`.

- `schema`: the frozen values (Config, ConsumerConfig, LimitsConfig, ...).
- `parse`: YAML text to a Config, the top-level keys and the checks across them.
- `consumers`: the `consumers:` section, completed with `driver_defaults`.
- `section`: reading one mapping (typed values, unknown keys, ConfigError).
- `files`: reading the file without blocking on a FIFO or a device.
- `endpoints`: listen endpoints, and consumer URLs that loop back to them.
- `process_names`: the `gpu_process` pattern, matched in linear time.
- `balancer`: the `balancer:` section (readiness, the box's name).

The package imports nothing else of gpumgr but `yaml_strict`, `errors` and
`target`: `gpumgr.drivers` imports it, never the other way round.
"""

from gpumgr.config.balancer import BalancerConfig
from gpumgr.config.driver_defaults import DRIVER_DEFAULTS, DriverDefaults
from gpumgr.config.endpoints import (
    DEFAULT_LISTEN,
    ListenAddress,
    find_self_reference,
    listen_address,
    listen_problem,
    url_reaches_listener,
)
from gpumgr.config.files import read_config_file
from gpumgr.config.parse import (
    admin_token_problem,
    load_config,
    parse_config,
    parse_config_text,
)
from gpumgr.config.process_names import ProcessNameMatcher, parse_process_pattern
from gpumgr.config.schema import (
    AUDIO_ROUTE,
    AUTO,
    HTTP_METHODS,
    KINDS,
    ROUTE_KEYS,
    SCHEDULER_MODES,
    Config,
    ConsumerConfig,
    GpuConfig,
    GpuPlacement,
    HealthConfig,
    RequestsConfig,
    HttpCall,
    LimitsConfig,
    ProcessConfig,
    ScheduledRoute,
    SchedulerConfig,
)
from gpumgr.config.section import ConfigError

__all__ = [
    "AUDIO_ROUTE",
    "AUTO",
    "BalancerConfig",
    "Config",
    "ConfigError",
    "ConsumerConfig",
    "DEFAULT_LISTEN",
    "DRIVER_DEFAULTS",
    "DriverDefaults",
    "GpuConfig",
    "GpuPlacement",
    "HTTP_METHODS",
    "HealthConfig",
    "RequestsConfig",
    "HttpCall",
    "KINDS",
    "LimitsConfig",
    "ListenAddress",
    "ProcessConfig",
    "ProcessNameMatcher",
    "ROUTE_KEYS",
    "SCHEDULER_MODES",
    "ScheduledRoute",
    "SchedulerConfig",
    "admin_token_problem",
    "find_self_reference",
    "listen_address",
    "listen_problem",
    "load_config",
    "parse_config",
    "parse_config_text",
    "parse_process_pattern",
    "read_config_file",
    "url_reaches_listener",
]
