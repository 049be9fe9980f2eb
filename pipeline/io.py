"""Small file helpers shared by the layers."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """Write atomically, so a killed stage never leaves half a metrics file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def sha256(data: bytes | Path | Any, *, length: int | None = None) -> str:
    """The one sha256 helper: of a file (a Path), of bytes, or of any JSON-able value (sorted
    keys, so equal settings give equal digests); `length` truncates the hex digest."""
    if isinstance(data, Path):
        data = data.read_bytes()
    elif not isinstance(data, (bytes, bytearray)):
        data = json.dumps(data, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(data).hexdigest()
    return digest[:length] if length else digest


def source_sha256() -> str:
    """The pipeline package's own code (every .py file, by path and content): results kept across
    runs in a persisted folder are reused only by the code that made them."""
    package = Path(__file__).parent
    return sha256({str(f.relative_to(package)): sha256(f) for f in sorted(package.rglob("*.py"))})
