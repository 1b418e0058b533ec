"""Reading a config file without ever blocking on it."""

from __future__ import annotations

import os
import stat

from gpumgr import yaml_strict
from gpumgr.config.section import ConfigError


def read_config_file(path: str) -> bytes:
    """The bytes of a config file, read only if it is a regular file.

    Opened non-blocking and checked with fstat before any read: a FIFO, a
    terminal or a device as the config path would otherwise block the
    caller (the reactor, on a reload) until someone writes to it, or never
    end (/dev/zero). Reading at most one byte past the size limit is enough
    for yaml_strict to refuse an oversized file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | \
        getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(path, "", f"is not a regular file ({_file_kind(mode)}); "
                              "gpumgr reads its config only from a regular file")
        chunks, size = [], 0
        while size <= yaml_strict.MAX_CONFIG_BYTES:
            chunk = os.read(fd, yaml_strict.MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"

