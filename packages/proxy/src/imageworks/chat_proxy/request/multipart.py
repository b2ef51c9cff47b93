"""The one field the proxy reads in a multipart form (audio uploads): ``model``.

The body has been read within the body limit (``bodies.read_limited``); this finds the
``model`` part by its boundary without decoding the file parts, and the served id replaces its
value in place, so the upload goes on byte for byte otherwise.
"""

from __future__ import annotations

import re

from imageworks.chat_proxy.errors import InvalidRequest

_BOUNDARY = re.compile(r'boundary="?([^";,]{1,200})"?', re.I)
_MODEL_PART = re.compile(rb'content-disposition:[^\r\n]*\bname="?model"?(?:[;\s]|$)', re.I | re.M)


def boundary(content_type: str | None) -> bytes:
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequest("this endpoint takes multipart/form-data (a file and its fields)")
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise InvalidRequest("the multipart content-type has no boundary")
    return match.group(1).encode("latin-1")


def model_field(content_type: str | None, raw: bytes) -> tuple[str, int, int]:
    """The form's ``model`` value and where it lies in ``raw`` (start, end)."""
    delimiter = b"--" + boundary(content_type)
    position = raw.find(delimiter)
    while position >= 0:
        head_start = position + len(delimiter)
        head_end = raw.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            break
        following = raw.find(b"\r\n" + delimiter, head_end + 4)
        if following < 0:
            break
        if _MODEL_PART.search(raw, head_start, head_end):
            value = raw[head_end + 4 : following]
            try:
                model = value.decode().strip()
            except UnicodeDecodeError:
                model = ""
            if not model or len(model) > 256:
                break
            return model, head_end + 4, following
        position = following + 2
    raise InvalidRequest("the form has no 'model' field", param="model")


def with_model(raw: bytes, start: int, end: int, model: str) -> bytes:
    return raw[:start] + model.encode() + raw[end:]
