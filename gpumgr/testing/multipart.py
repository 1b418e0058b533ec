"""Reading multipart/form-data bodies, crudely but byte-exactly, with the standard library.

The simulated whisper server (`POST /inference`, `POST /load`) and ComfyUI
(`POST /upload/image`) need the fields of small form uploads; nothing here
streams. Standard library only: the whisper server process imports it.
"""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from typing import NamedTuple


class Field(NamedTuple):
    filename: str | None
    content_type: str | None
    data: bytes


def parse_multipart(content_type: str | bytes | None, body: bytes) -> dict[str, Field]:
    """The form's fields by name (the first of each); {} if the body is not multipart."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return {}
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        return {}
    fields: dict[str, Field] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or name in fields:
            continue
        data = part.get_payload(decode=True)
        fields[name] = Field(part.get_filename(), part.get_content_type(),
                             data if isinstance(data, bytes) else b"")
    return fields


def encode_multipart(fields: dict[str, bytes | tuple[str, bytes, str]],
                     boundary: str = "gpumgr-sim-boundary-7f3a") -> tuple[str, bytes]:
    """(Content-Type, body) for a form; a tuple value is (filename, data, content type).

    For tests and examples that need to send what real clients send.
    """
    out = bytearray()
    for name, value in fields.items():
        out += f"--{boundary}\r\n".encode()
        if isinstance(value, tuple):
            filename, data, ctype = value
            out += (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    f"Content-Type: {ctype}\r\n\r\n").encode()
        else:
            data = value
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)
