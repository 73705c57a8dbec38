"""Messages the C codecs (OpenJPEG, libjpeg, GDCM) print straight to stderr.

They name no file, so on their own an operator cannot tell which image they are about. Decoding
runs with the process's stderr captured; what was printed comes back as lines, and the caller logs
them with the image's pseudonym.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

MAX_LINES = 20
MAX_LINE_CHARS = 200


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Capture file descriptor 2 (C libraries write there, not to sys.stderr) for the block.

    The list it yields is filled when the block ends, with the non-empty lines printed in it.
    """
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr (e.g. closed): nothing to capture
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read(MAX_LINES * (MAX_LINE_CHARS + 1) * 4).decode("utf-8", "replace")
            lines.extend(line.strip()[:MAX_LINE_CHARS] for line in text.splitlines() if line.strip())
            del lines[MAX_LINES:]
