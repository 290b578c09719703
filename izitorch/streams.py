"""The console's streams (stdout, stderr): what izitorch prints there never stops a run.

A reader may go away while a run trains (``izitorch run m.toml | head -1``) or a stream may
refuse bytes (stdout redirected to ``/dev/full``). The console is only a view of the run: the
run goes on with that stream silenced, as the Python docs advise for SIGPIPE ("Note on
SIGPIPE" in :mod:`signal`): its file descriptor is pointed at ``os.devnull``, so that neither a
later write nor the flush of its buffer at interpreter exit fails ("Exception ignored ...
BrokenPipeError").
"""

from __future__ import annotations

import os
from typing import TextIO


def say(text: str, stream: TextIO | None) -> bool:
    """Print ``text`` and a newline to ``stream`` and flush it; return False when the stream is
    gone (it is then silenced, see :func:`silence`). A ``None`` stream (Python's, when the
    process started with that descriptor closed) takes nothing and is not an error."""
    if stream is None:
        return True
    try:
        stream.write(text + "\n")
    except (OSError, ValueError):  # a closed pipe, a full device; ValueError: a closed file object
        silence(stream)
        return False
    return flush(stream)


def flush(stream: TextIO | None) -> bool:
    """Flush ``stream``; return False when it is gone (it is then silenced)."""
    if stream is None:
        return True
    try:
        stream.flush()
    except (OSError, ValueError):
        silence(stream)
        return False
    return True


def silence(stream: TextIO | None) -> None:
    """Point ``stream``'s file descriptor at ``os.devnull``: what it holds or is given from now
    on is dropped. A stream without a descriptor (a ``StringIO``, a test's capture) is left as
    it is: it cannot fail at exit."""
    try:
        fd = stream.fileno() if stream is not None else -1
    except (OSError, ValueError, AttributeError):
        return
    if fd < 0:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
