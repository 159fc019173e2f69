"""Quantized experts kept on disk, so that only the first start with given settings pays for quantizing.

One folder per checkpoint and settings under localmoe's cache folder, one file per MoE layer holding
its experts' byte rows, and a manifest with each file's size and CRC-32. A file whose size or checksum
does not match is rebuilt from the checkpoint, with a one-line notice, and never used as it is. The
checkpoint itself is only read.
"""

import hashlib
import json
import os
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from localmoe.checkpoint import Checkpoint
from localmoe.paths import cache_dir

FORMAT = 1  # bump when the row layout changes: old folders are then simply not found


def cache_folder(ckpt: Checkpoint, settings: str) -> Path:
    """Where a checkpoint's experts quantized with `settings` live: keyed by the checkpoint's identity
    (its Hub snapshot folder, or its files' names, sizes and times) and the settings."""
    files = sorted(p for p in ckpt.path.iterdir() if p.suffix in (".json", ".safetensors"))
    identity = [str(ckpt.path.resolve())] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    key = hashlib.sha256("\n".join([str(FORMAT), settings, *identity]).encode()).hexdigest()[:24]
    return cache_dir() / "quantized" / f"{ckpt.file_label}-{key}"


class QuantizedLayers:
    """The quantized rows of each MoE layer, [experts, bytes per expert] uint8: read into RAM, or mapped
    from the file (`mapped`, when RAM is short), after checking them; built and written where missing."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest_path = folder / "manifest.json"
        try:
            self.manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            self.manifest = {}
        self.layers: dict[str, dict] = self.manifest.setdefault("layers", {})
        self.built = 0  # layers quantized by this run

    def complete(self, layers) -> bool:
        """Whether the manifest lists every one of `layers` (they may still fail their checks)."""
        return all(str(layer) in self.layers for layer in layers)

    def rows(self, layer: int, shape: tuple[int, int], allocate, build: Callable[[torch.Tensor], None], mapped: bool):
        """Layer `layer`'s rows from the cache, or from `build` (which fills rows [E, bytes]) and then saved.
        `allocate(shape)` gives the memory for rows read or built in RAM."""
        path = self.folder / f"layer-{layer}.bin"
        nbytes = shape[0] * shape[1]
        entry = self.layers.get(str(layer))
        if entry is not None and path.is_file():
            if path.stat().st_size == nbytes == entry.get("bytes"):
                rows = _map(path, shape) if mapped else _read(path, allocate(shape))
                if _crc(rows) == entry.get("crc32"):
                    return rows
            print(
                f"localmoe: the quantized experts of layer {layer} in {self.folder} are damaged: rebuilding",
                file=sys.stderr,
            )
        rows = allocate(shape)
        build(rows)
        self._save(path, rows, layer)
        return _map(path, shape) if mapped else rows

    def _save(self, path: Path, rows: torch.Tensor, layer: int) -> None:
        """The file first (under a temporary name, then renamed), the manifest entry after it."""
        self.built += 1
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            with partial.open("wb") as f:
                f.write(rows.numpy().data)
            partial.replace(path)
            self.layers[str(layer)] = {"bytes": path.stat().st_size, "crc32": _crc(rows)}
            partial_manifest = self.manifest_path.with_suffix(f".{os.getpid()}.tmp")
            partial_manifest.write_text(json.dumps(self.manifest, indent=1))
            partial_manifest.replace(self.manifest_path)
        except OSError as error:
            print(f"localmoe: could not keep the quantized experts in {self.folder} ({error})", file=sys.stderr)


def _crc(rows: torch.Tensor) -> int:
    return zlib.crc32(rows.numpy().data)


def _read(path: Path, rows: torch.Tensor) -> torch.Tensor:
    with path.open("rb") as f:
        f.readinto(rows.numpy().data)
    return rows


def _map(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """The file mapped privately: writes to the tensor would never reach it."""
    return torch.from_file(str(path), shared=False, size=shape[0] * shape[1], dtype=torch.uint8).view(shape)
