"""The per-cell result cache that lets an interrupted arena run resume.

A *cell* is one measurement: (kind, mechanism, its options, its parameters, the
machine). Its key is the canonical JSON of those fields; the file name is a hash of the
key, and the key is stored next to the result so a hash collision or a stale file is
detected rather than trusted. Files are written atomically (temporary file + rename),
so a run killed mid-write leaves either the old cell or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

import attnkit

#: Bump when the meaning of a stored cell changes; older cells are then re-measured.
CELL_VERSION = 1


def machine_fingerprint(device: str) -> dict[str, Any]:
    """What makes a timing comparable: device, processor, thread count, library versions."""
    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "attnkit": attnkit.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def cell_key(kind: str, mechanism: str, options: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The identity of one cell. ``params`` must be JSON-serializable."""
    return {
        "version": CELL_VERSION,
        "kind": kind,
        "mechanism": mechanism,
        "options": options,
        "params": params,
    }


def _digest(key: dict[str, Any]) -> str:
    canonical = json.dumps(key, sort_keys=True, default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class CellCache:
    """Cells stored as JSON files under ``root/cells/<kind>/<mechanism>/``.

    Args:
        root: the arena output directory.
        enabled: when False, nothing is read (every cell is measured again) but results
            are still written, so a later run can resume from them.
    """

    def __init__(self, root: Path, *, enabled: bool = True) -> None:
        self.root = Path(root) / "cells"
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def _path(self, key: dict[str, Any]) -> Path:
        return self.root / key["kind"] / key["mechanism"] / f"{_digest(key)}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result for ``key``, or None (missing, unreadable, or another key)."""
        if not self.enabled:
            self.misses += 1
            return None
        path = self._path(key)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        if json.dumps(stored.get("key"), sort_keys=True, default=repr) != json.dumps(key, sort_keys=True, default=repr):
            self.misses += 1
            return None
        self.hits += 1
        result: dict[str, Any] = stored["result"]
        return result

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        """Store ``result`` for ``key`` atomically."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": key, "result": result}, indent=1, default=repr)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def all_results(self, kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Every stored ``(key, result)`` of ``kind`` (for the advisor's reuse of arena runs)."""
        found = []
        for path in sorted((self.root / kind).glob("*/*.json")):
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if stored.get("key", {}).get("version") == CELL_VERSION:
                found.append((stored["key"], stored["result"]))
        return found
