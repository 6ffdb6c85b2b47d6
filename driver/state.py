"""Metadata records kept next to the data they describe, written atomically.

A record is a JSON object with a `schema` number. Writers go through a temporary file,
fsync and rename, then fsync the directory, so a crash leaves either the old or the new
record, never a torn one. Readers refuse a schema newer than they understand rather than
guess at it.
"""

import json
import os
from pathlib import Path

from .errors import FailedPrecondition

SCHEMA_VERSION = 1


def write_atomic(path: Path, record: dict) -> None:
    path = Path(path)
    body = json.dumps({"schema": SCHEMA_VERSION, **record}, indent=1, sort_keys=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read(path: Path) -> dict | None:
    """The record at `path`, or None if there is none."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    schema = record.get("schema")
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"{path} has metadata schema {schema!r}; this polyvol understands up to "
            f"{SCHEMA_VERSION}: upgrade polyvol on this host")
    return record


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
