"""Quantized experts kept on disk, so that only the first start with given settings pays for quantizing.

One folder per checkpoint and settings under localmoe's cache folder, one file per MoE layer holding
its experts' byte rows, and a manifest with each file's size and CRC-32. A file whose size or checksum
does not match is rebuilt from the checkpoint, with a one-line notice, and never used as it is. The
checkpoint itself is only read.
"""

import hashlib
import json
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from localmoe.checkpoint import Checkpoint
from localmoe.files import locked, write_atomic
from localmoe.paths import cache_dir

FORMAT = 1  # bump when the row layout changes: old folders are then simply not found
QUANTIZED = "quantized"  # the folder of localmoe's cache folder that holds them


def cache_folder(ckpt: Checkpoint, settings: str) -> Path:
    """Where a checkpoint's experts quantized with `settings` live: keyed by the checkpoint's identity
    (its Hub snapshot folder, or its files' names, sizes and times) and the settings."""
    files = sorted(p for p in ckpt.path.iterdir() if p.suffix in (".json", ".safetensors"))
    identity = [str(ckpt.path.resolve())] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    key = hashlib.sha256("\n".join([str(FORMAT), settings, *identity]).encode()).hexdigest()[:24]
    return cache_dir() / QUANTIZED / f"{ckpt.file_label}-{key}"


class QuantizedLayers:
    """The quantized rows of each MoE layer, [experts, bytes per expert] uint8: read into RAM, or mapped
    from the file (`mapped`, when RAM is short), after checking them; built and written where missing.

    Runs that meet on the folder build each layer once: a layer missing from the manifest is built under
    the folder's lock, after reading the manifest again (the other run may have built it meanwhile). The
    folder is localmoe's own and disposable: whatever in it is damaged is rebuilt, with a notice.
    """

    def __init__(self, folder: Path, settings: str = ""):
        self.folder, self.settings = folder, settings  # the settings are recorded for `localmoe cache`
        self.manifest_path = folder / "manifest.json"
        self.layers = self._read_manifest()
        self.built = 0  # layers quantized by this run
        self.waited = False  # for another run's lock

    def complete(self, layers) -> bool:
        """Whether the manifest lists every one of `layers` (they may still fail their checks)."""
        return all(str(layer) in self.layers for layer in layers)

    def rows(self, layer: int, shape: tuple[int, int], allocate, build: Callable[[torch.Tensor], None], mapped: bool):
        """Layer `layer`'s rows from the cache, or from `build` (which fills rows [E, bytes]) and then saved.
        `allocate(shape)` gives the memory for rows read or built in RAM."""
        path = self.folder / f"layer-{layer}.bin"
        if (rows := self._kept(layer, path, shape, allocate, mapped)) is not None:
            return rows
        with locked(self.folder, self._waiting):
            self.layers = self._read_manifest()
            if (rows := self._kept(layer, path, shape, allocate, mapped)) is not None:
                return rows
            if str(layer) in self.layers:
                _notice(f"the quantized experts of layer {layer} in {self.folder} are damaged: rebuilding")
            rows = allocate(shape)
            build(rows)
            saved = self._save(path, rows, layer)
        return _map(path, shape) if mapped and saved else rows

    def _waiting(self, message: str) -> None:
        """Say once, not once per layer, that another run is building what this one needs."""
        if not self.waited:
            print(message, file=sys.stderr)
        self.waited = True

    def _kept(self, layer: int, path: Path, shape: tuple[int, int], allocate, mapped: bool) -> torch.Tensor | None:
        """The layer's rows as kept, where the manifest lists them and their size and checksum match."""
        entry = self.layers.get(str(layer))
        nbytes = shape[0] * shape[1]
        try:
            if entry is None or not path.is_file() or path.stat().st_size != nbytes or entry.get("bytes") != nbytes:
                return None
            rows = _map(path, shape) if mapped else _read(path, allocate(shape))
        except (OSError, RuntimeError):  # replaced or removed meanwhile, or unreadable
            return None
        return rows if _crc(rows) == entry.get("crc32") else None

    def _read_manifest(self) -> dict[str, dict]:
        """The manifest's entry per layer; none where there is no manifest yet or it is damaged."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            data = None
        layers = data.get("layers") if isinstance(data, dict) else None
        if not (isinstance(layers, dict) and all(isinstance(entry, dict) for entry in layers.values())):
            _notice(f"the manifest of the quantized experts in {self.folder} is damaged: rebuilding them")
            return {}
        return layers

    def _save(self, path: Path, rows: torch.Tensor, layer: int) -> bool:
        """The file first, the manifest entry after it; False where they could not be kept."""
        self.built += 1
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(path, rows.numpy().data)
            self.layers[str(layer)] = {"bytes": path.stat().st_size, "crc32": _crc(rows)}
            manifest = {"settings": self.settings, "layers": self.layers}
            write_atomic(self.manifest_path, json.dumps(manifest, indent=1))
        except OSError as error:
            _notice(f"could not keep the quantized experts in {self.folder} ({error})")
            return False
        return True


def recorded_settings(folder: Path) -> str | None:
    """The settings a folder's manifest records (None: not recorded, or no manifest)."""
    try:
        settings = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, str) else None


def _notice(message: str) -> None:
    print(f"localmoe: {message}", file=sys.stderr)


def _crc(rows: torch.Tensor) -> int:
    return zlib.crc32(rows.numpy().data)


def _read(path: Path, rows: torch.Tensor) -> torch.Tensor:
    with path.open("rb") as f:
        f.readinto(rows.numpy().data)
    return rows


def _map(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """The file mapped privately: writes to the tensor would never reach it."""
    return torch.from_file(str(path), shared=False, size=shape[0] * shape[1], dtype=torch.uint8).view(shape)
