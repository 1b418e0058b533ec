"""The admin API is not a web page's (issue 14, point 8).

A page open in a browser on the box can send a cross-site form or a
text/plain fetch to gpumgr's loopback port, and through DNS rebinding can
even read the answers (its Host is then the page's name). Admin and
control routes refuse a foreign Origin, a Host that is not loopback or
configured, and (admin routes) a body that is not JSON.
"""

from __future__ import annotations


import pytest

from gpumgr.web import is_loopback_name


@pytest.mark.parametrize("host,loopback", [
    ("localhost", True), ("a.localhost", True), ("127.0.0.1", True), ("127.255.0.9", True),
    ("127.1", True), ("2130706433", True), ("0x7f.1", True), ("::1", True),
    ("::ffff:127.0.0.1", True), ("128.0.0.1", False), ("evil.example", False),
    ("localhost.evil", False), ("::2", False), ("0", False), ("", False),
])
def test_loopback_in_any_spelling(host, loopback):
    assert is_loopback_name(host) is loopback


def test_the_new_key_and_error_are_documented():
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readme = "".join(open(os.path.join(root, name)).read() for name in
                     ("README.md", "docs/config.md", "docs/http-api.md", "docs/configure.md"))
    with open(os.path.join(root, "etc", "consumers.yaml")) as f:
        shipped = f.read()
    assert "| `allowed_hosts` |" in readme and "# allowed_hosts:" in shipped
    assert "| 415 | `unsupported_media_type` |" in readme
    assert "## Exposing gpumgr beyond loopback safely" in readme
