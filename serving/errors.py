"""Client errors with an HTTP status more specific than kserve's 400 for `InvalidInput`.

They subclass `InvalidInput`, so gRPC still answers INVALID_ARGUMENT with the message and any
handler that knows only kserve's errors still gives a 400; `serving.kserve_compat` registers a
handler per class for the REST status.
"""
from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput


class PayloadTooLarge(InvalidInput):
    """A body or an image over the configured limit (HTTP 413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedMedia(InvalidInput):
    """DICOM whose encoding (transfer syntax / codec) no installed decoder reads (HTTP 415)."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


async def status_error_handler(_request, exc: InvalidInput) -> JSONResponse:
    return JSONResponse(status_code=int(getattr(exc, "status", HTTPStatus.BAD_REQUEST)), content={"error": str(exc)})
