"""Request ids: the one value that names a proxied request everywhere.

A client may send its own `X-Gpumgr-Request-Id` (1 to 64 characters of
letters, digits and `._:-`, starting with a letter or a digit); otherwise
gpumgr makes one. It is parsed once, here, into a `RequestId` that the job
carries (`Timing.request_id`) and that logs, `GET /v1/requests/<id>`, the
scheduler's queue and the response header all use.
"""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Callable

import attrs

from gpumgr.errors import BadRequestId

#: The header that carries the id, both ways.
REQUEST_ID_HEADER = b"X-Gpumgr-Request-Id"
#: The per-request secret that lets the same client cancel it (only on its own response).
CANCEL_TOKEN_HEADER = b"X-Gpumgr-Cancel-Token"
MAX_REQUEST_ID_CHARS = 64
_SAFE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,%d}\Z" % (MAX_REQUEST_ID_CHARS - 1))


def new_request_id() -> str:
    return uuid.uuid4().hex


def new_cancel_token() -> str:
    return secrets.token_urlsafe(24)


@attrs.frozen
class RequestId:
    text: str = attrs.field()
    #: The client sent it (rather than gpumgr making it).
    from_client: bool = False

    @text.validator
    def _check(self, _attribute: object, value: str) -> None:
        if _SAFE.match(value) is None:
            raise BadRequestId(
                f"{REQUEST_ID_HEADER.decode()} must be 1 to {MAX_REQUEST_ID_CHARS} characters "
                "of letters, digits and '._:-', starting with a letter or a digit")

    @classmethod
    def from_header(cls, values: list[bytes] | None,
                    new: Callable[[], str] = new_request_id) -> RequestId:
        """The client's id from its header values (one, valid), or a new one."""
        if not values:
            return cls(new())
        if len(values) > 1:
            raise BadRequestId(f"send one {REQUEST_ID_HEADER.decode()} header, not {len(values)}")
        try:
            text = values[0].decode("ascii")
        except UnicodeDecodeError:
            text = "\x00"  # refused below, with the same message
        return cls(text, from_client=True)

    def __str__(self) -> str:
        return self.text
