"""User errors: a bad file, key or value that the person running mmstory can fix.

The ``mmstory`` console script prints these as one line (``error: <message>``) and exits non-zero;
anything else is a bug and keeps its traceback (``--debug`` shows the traceback for user errors too).
Raise ``UserError`` (or a subclass) with a message that names the file, key or value at fault.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user gave (a file, a config value, a command-line argument) is wrong; the message says
    which and why. A ValueError, so callers that caught ValueError before keep working."""


class ManifestError(ValueError):
    """A manifest or one of its shards is wrong; the message names the file and the problem. Defined here,
    not in mmstory/data/manifest.py, because the shard reader (mmstory/data/shards.py), which manifest.py
    builds on, raises it too."""


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a write that failed for want of disk space. Python raises OSError(ENOSPC); torch.save
    raises RuntimeError ("enforce fail at inline_container.cc ... unexpected pos" / "file write failed");
    safetensors raises SafetensorError ("... No space left on device (os error 28)")."""
    import errno

    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    text = str(e)
    return (isinstance(e, RuntimeError) and ("inline_container" in text or "write failed" in text)) or \
        (type(e).__name__ == "SafetensorError" and f"os error {errno.ENOSPC}" in text)
