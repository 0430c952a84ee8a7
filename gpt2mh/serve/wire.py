"""Bytes in and out: the JSON body under its size limit, server-sent events."""
from __future__ import annotations

import json

from .schemas import ApiError, parse_body


async def read_body(request, service) -> dict:
    """The JSON object body; over --max-body-bytes (declared or streamed) is a 413."""
    limit = service.settings.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the body is larger than --max-body-bytes {limit}")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        service.metrics.rejected.labels("too_large").inc()
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            service.metrics.rejected.labels("too_large").inc()
            raise too_big
        chunks.append(chunk)
    try:
        return parse_body(b"".join(chunks))
    except ApiError:
        service.metrics.rejected.labels("bad_json").inc()
        raise


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

