"""What localmoe keeps in its cache folder (`localmoe cache`): quantized experts per checkpoint and
setting, routing profiles, the bandwidth calibration and the demo checkpoint, listed with their sizes and
removed by name. All of it is localmoe's own and disposable: what is removed is built or measured again
when next needed. Checkpoints downloaded from the Hub live in the Hugging Face cache, untouched here.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from localmoe.demo import DEMO_FOLDER
from localmoe.errors import LocalMoEError
from localmoe.files import locked
from localmoe.paths import cache_dir
from localmoe.runtime.cpu_experts import CALIBRATION_FILE
from localmoe.runtime.memory import format_rate
from localmoe.runtime.profile import PROFILES, RoutingProfile
from localmoe.runtime.quantized_cache import QUANTIZED, recorded_settings


@dataclass(frozen=True)
class Entry:
    kind: str  # quantized experts, routing profile, calibration, demo
    path: Path  # the file or folder in the cache folder
    checkpoint: str  # the model it belongs to, where it belongs to one
    detail: str  # the quantization settings, the tokens a profile has seen, the bandwidths measured
    size: int  # bytes on disk

    @property
    def name(self) -> str:
        """How `localmoe cache rm` names it: its path in the cache folder."""
        return self.path.relative_to(cache_dir()).as_posix()


def entries() -> list[Entry]:
    """Everything localmoe keeps, by kind, then checkpoint."""
    folder = cache_dir()
    found = [_quantized(path) for path in _kept(folder / QUANTIZED) if path.is_dir()]
    found += [_profile(path) for path in _kept(folder / PROFILES) if path.suffix == ".json"]
    found += _calibration(folder / CALIBRATION_FILE)
    if (folder / DEMO_FOLDER).is_dir():
        found.append(Entry("demo", folder / DEMO_FOLDER, DEMO_FOLDER, "random weights", _size(folder / DEMO_FOLDER)))
    return found


def remove(names: list[str]) -> list[Entry]:
    """Remove the entries `names` name: by their name in the listing, or all of a checkpoint's by its name;
    each under the lock that runs writing it take. Nothing is removed where a name matches nothing."""
    every = entries()
    chosen: dict[Path, Entry] = {}
    for entry in (entry for name in names for entry in _named(every, name)):
        chosen.setdefault(entry.path, entry)  # the calibration is one file of several rows: its first has the size
    for entry in chosen.values():
        with locked(entry.path):
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink(missing_ok=True)
    return list(chosen.values())


def _named(every: list[Entry], name: str) -> list[Entry]:
    name = name.rstrip("/")
    matched = [entry for entry in every if name == entry.name or (entry.checkpoint and name == entry.checkpoint)]
    if not matched:
        raise LocalMoEError(
            f"localmoe's cache holds nothing named {name!r}: give a name or a checkpoint as `localmoe cache` lists "
            "them (nothing was removed)"
        )
    return matched


def _kept(folder: Path) -> list[Path]:
    """What a folder of the cache holds, without the lock files and unfinished temporary files beside it."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.suffix not in (".lock", ".tmp"))


def _checkpoint(label: str) -> str:
    """The checkpoint whose `file_label` starts a file name: a Hub repo id's '/' is kept as '--'."""
    return label.rsplit("-", 1)[0].replace("--", "/")


def _quantized(path: Path) -> Entry:
    settings = recorded_settings(path) or "settings not recorded"
    return Entry("quantized experts", path, _checkpoint(path.name), settings, _size(path))


def _profile(path: Path) -> Entry:
    try:
        tokens = sum(RoutingProfile.load(path).tokens.values())
        detail = f"{tokens} tokens seen"
    except LocalMoEError:
        detail = "damaged: replaced by a new one at the next run"
    return Entry("routing profile", path, _checkpoint(path.stem), detail, _size(path))


def _calibration(path: Path) -> list[Entry]:
    """One row per machine, device, dtype and expert size measured."""
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError):
        return [Entry("calibration", path, "", "damaged: measured again", _size(path))] if path.exists() else []
    rows = []
    for key, rates in measured.items() if isinstance(measured, dict) else []:
        try:
            detail = f"{key}: copy {format_rate(rates['copy'])}, CPU {format_rate(rates['cpu'])}"
        except (TypeError, KeyError):
            detail = f"{key}: damaged, measured again"
        rows.append(Entry("calibration", path, "", detail, _size(path) if not rows else 0))
    return rows


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
