"""A Hugging Face checkpoint on local disk: its config files and lazy, zero-copy access to its tensors.

A checkpoint comes from a local folder or a Hub repo id. Only `.safetensors` weights are read; pickled
`.bin`/`.pt` files are refused, never loaded. Nothing under the checkpoint folder is ever written.
"""

import copy
import json
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from localmoe.errors import LocalMoEError
from localmoe.quantization import quantization_for

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What the first download pass fetches: configs, tokenizer and chat-template files, the weight index.
# Weights come in a second pass restricted to the shards the index names, so a repo that also ships
# `consolidated.safetensors` or `.bin` copies does not cost a second download of the whole model.
METADATA_PATTERNS = ["*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # power-of-two scales (DeepSeek-V4's ue8m0)
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


class Checkpoint:
    """A validated checkpoint folder: config, generation config, and every tensor by name.

    Opening checks that every shard the index names is present and complete, so a half-finished
    download fails here with the shard's name rather than halfway through loading.
    """

    def __init__(self, path: Path):
        self.path = path
        self.part = ""  # the part of the model a view shows, for messages (see `part_view`)
        self._prefixes: tuple[tuple[str, str], ...] = ()  # a view's (name prefix, stored prefix) pairs
        self.config = _read_json(path / "config.json", required=True)
        self.generation_config = _read_json(path / "generation_config.json", required=False)
        self.quantization = quantization_for(_with_modelopt_config(self.config, path), path)
        index = _read_index(path)
        if index is None:
            if not (path / SINGLE_FILE).is_file():
                raise LocalMoEError(_no_weights_message(path))
            handle = _open_shard(path / SINGLE_FILE)
            self._files = {SINGLE_FILE: handle}
            self._shard_of = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            self._shard_of = index
            self._files = {shard: _open_shard(path / shard) for shard in sorted(set(index.values()))}
            self._check_index_matches_shards()

    @classmethod
    def open(cls, source: str | Path, revision: str | None = None) -> "Checkpoint":
        """Open a local folder, or a Hub repo id through the Hugging Face cache (downloading if needed)."""
        return cls(resolve_snapshot(str(source), revision))

    @property
    def tensor_names(self) -> list[str]:
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def part_view(self, part: str, config: dict, prefixes: tuple[tuple[str, str], ...]) -> "Checkpoint":
        """This checkpoint as one `part` of its model (a multimodal model's language model): `config`
        as its config, and only the tensors whose names start with a stored prefix of `prefixes`
        (pairs of (view prefix, stored prefix)), under their view names."""
        view = copy.copy(self)
        view.part, view.config, view._prefixes = part, config, prefixes
        view.quantization = quantization_for(_with_modelopt_config(config, self.path), self.path)
        view._shard_of = {}
        for name, shard in self._shard_of.items():
            new = next((ours + name[len(disk) :] for ours, disk in prefixes if name.startswith(disk)), None)
            if new is not None:
                view._shard_of[new] = shard
        return view

    def stored_name(self, name: str) -> str:
        """The name under which tensor `name` is stored (other than `name` in a part view only)."""
        ours, disk = next(((o, d) for o, d in self._prefixes if name.startswith(o)), ("", ""))
        return disk + name[len(ours) :]

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype from the shard header, without reading the tensor."""
        view = self._files[self._shard_of[name]].get_slice(self.stored_name(name))
        dtype = DTYPES.get(view.get_dtype())
        if dtype is None:
            raise LocalMoEError(
                f"tensor {self.stored_name(name)} in {self.path} has dtype {view.get_dtype()}, which localmoe "
                "cannot read"
            )
        return TensorInfo(tuple(view.get_shape()), dtype)

    def check_tensor(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a checkpoint that lacks `name` or stores it in another shape than the config implies."""
        stored = self.stored_name(name)
        if name not in self:
            raise LocalMoEError(
                f"{self.path} lacks tensor {stored}: the checkpoint is incomplete or its index is damaged; "
                "download it again"
            )
        actual = self.info(name).shape
        if actual != shape:
            raise LocalMoEError(
                f"tensor {stored} in {self.path} has shape {list(actual)} but config.json implies {list(shape)}: "
                "the config and the weights do not belong together"
            )

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor, memory-mapped from its shard: no copy is made until the caller converts it.

        The mapping is private, so writing to the result never reaches the file.
        """
        try:
            return self._files[self._shard_of[name]].get_tensor(self.stored_name(name))
        except KeyError:
            raise LocalMoEError(
                f"{self.path} has no tensor {self.stored_name(name)}: the checkpoint is incomplete"
            ) from None

    def has_weight(self, name: str) -> bool:
        """Whether the checkpoint holds weight `name` (`<module>.weight`), plain or quantized."""
        return name in self or self._format(name) is not None

    def check_weight(self, name: str, shape: tuple[int, ...]) -> None:
        """`check_tensor` for a weight, which a quantized checkpoint may store in another form: then every
        part it is stored in is checked against the others and against `shape`."""
        fmt = self._format(name)
        if fmt is None:
            self.check_tensor(name, shape)
            return
        stored = fmt.shape(self, name.removesuffix(".weight"))
        if stored != shape:
            raise LocalMoEError(
                f"{self.stored_name(name)} in {self.path} is quantized with shape {list(stored)} but config.json "
                f"implies {list(shape)}: the config and the weights do not belong together"
            )

    def stored_form(self, name: str):
        """The form the kernels read weight `name` in, as stored (a QuantSpec or StoredFormat), or None for
        a plain floating-point weight."""
        fmt = self._format(name)
        return None if fmt is None else fmt.spec(self, name.removesuffix(".weight"))

    def stored(self, name: str):
        """Weight `name` as stored, a stack of one matrix in its `stored_form` (kernels/quantized.py)."""
        return self._format(name).read(self, name.removesuffix(".weight"))

    def weight(self, name: str) -> torch.Tensor:
        """The tensor as a weight: `tensor(name)`, or for a quantized weight its float32 decoding."""
        if (fmt := self._format(name)) is not None:
            return fmt.read(self, name.removesuffix(".weight"))[0]
        tensor = self.tensor(name)
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise LocalMoEError(
                f"{self.path}: tensor {self.stored_name(name)} is FP8 without a block scale "
                f"({self.stored_name(name)}_scale_inv) or an fp8 quantization_config: localmoe cannot decode it"
            )
        return tensor

    def _format(self, name: str):
        """The quantization format that stores weight `name`, or None where it is plain."""
        if not name.endswith(".weight"):
            return None
        return self.quantization.format_of(self, name.removesuffix(".weight"))

    def _check_index_matches_shards(self) -> None:
        listed = defaultdict(set)
        for name, shard in self._shard_of.items():
            listed[shard].add(name)
        for shard, names in listed.items():
            missing = names - set(self._files[shard].keys())
            if missing:
                raise LocalMoEError(
                    f"{shard} in {self.path} lacks {len(missing)} tensor(s) its index lists (e.g. {min(missing)}): "
                    "the shard and the index come from different revisions; download the checkpoint again"
                )


def resolve_snapshot(source: str, revision: str | None = None) -> Path:
    """A local folder as is, or a Hub repo id resolved to its snapshot folder in the Hugging Face cache.

    `HF_HUB_OFFLINE=1` and an unreachable Hub both fall back to the cache, so a repo that is already
    downloaded opens with no network.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LocalMoEError(f"{source} is a file: give the folder that holds config.json, or a Hub repo id")
    if not REPO_ID.fullmatch(source):
        raise LocalMoEError(f"no such folder: {source} (give a checkpoint folder or a Hub repo id like owner/name)")
    return _download(source, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_PATTERNS))
        snapshot_download(repo_id, revision=revision, allow_patterns=_shards_to_fetch(folder))
        return folder
    except GatedRepoError:
        raise LocalMoEError(
            f"{repo_id} is gated: accept its terms on huggingface.co, then log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise LocalMoEError(
            f"{repo_id} is neither a local folder nor a Hub repo you can access: check the name, or log in "
            "with `hf auth login` for a private repo"
        ) from None
    except RevisionNotFoundError:
        raise LocalMoEError(f"{repo_id} has no revision {revision!r} on the Hub") from None
    except IncompleteSnapshotError:
        raise LocalMoEError(
            f"the cached copy of {repo_id} is incomplete and the Hub cannot be reached: finish the download "
            f"where there is network (`hf download {repo_id}`)"
        ) from None
    except LocalEntryNotFoundError:
        raise LocalMoEError(
            f"{repo_id} is not a local folder and not in the Hugging Face cache, and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE or no network): download it first (`hf download {repo_id}`) or give a folder"
        ) from None
    except HFValidationError:
        raise LocalMoEError(f"no such folder, and not a valid Hub repo id: {repo_id}") from None
    except HfHubHTTPError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LocalMoEError(f"the Hub refused the download of {repo_id}: {first_line}") from None


def _shards_to_fetch(folder: Path) -> list[str]:
    index = folder / INDEX_FILE
    if index.is_file():
        return sorted(set(_read_json(index, required=True).get("weight_map", {}).values()))
    return [SINGLE_FILE]


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise LocalMoEError(f"{path.parent} has no {path.name}: it is not a Hugging Face model folder")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LocalMoEError(
            f"{path} is not valid JSON ({error}): the file is damaged or was not fully downloaded"
        ) from None
    if not isinstance(data, dict):
        raise LocalMoEError(f"{path} does not hold a JSON object: the file is damaged")
    return data


def _with_modelopt_config(config: dict, path: Path) -> dict:
    """The config, with the quantization ModelOpt's hf_quant_config.json describes where config.json has
    none (ModelOpt's releases before it wrote quantization_config into config.json, early 2025)."""
    if config.get("quantization_config") or not (path / "hf_quant_config.json").is_file():
        return config
    modelopt = _read_json(path / "hf_quant_config.json", required=True)
    return {**config, "quantization_config": {"quant_method": "modelopt", **modelopt}}


def _read_index(path: Path) -> dict[str, str] | None:
    """Tensor name -> shard file name from the index, or None for a single-file checkpoint."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LocalMoEError(f"{index} has no weight_map: the index is damaged; download it again")
        absent = sorted({shard for shard in weight_map.values() if not (path / shard).is_file()})
        if absent:
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            raise LocalMoEError(
                f"{path} lacks shard {absent[0]}{more} that its index names: the download is incomplete; "
                "download the checkpoint again"
            )
        return dict(weight_map)
    return None


def _no_weights_message(path: Path) -> str:
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        return (
            f"{path} holds only pickled PyTorch weights ({pickles[0]}); localmoe reads .safetensors only and never "
            "unpickles checkpoint files: use a repo or revision that ships safetensors"
        )
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return (
            f"{path} has {others[0]} but no {SINGLE_FILE} or {INDEX_FILE}: it is not in the Hugging Face "
            "transformers layout"
        )
    return f"{path} has no model weights ({SINGLE_FILE} or {INDEX_FILE}): the download is incomplete"


def _open_shard(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LocalMoEError(f"{path} is damaged or truncated ({reason}): download the checkpoint again") from None


def read_bandwidth(folder: Path, nbytes: int = 256 * 2**20) -> float:
    """Bytes per second reading a checkpoint's shards from disk: their pages are first dropped from the
    page cache (posix_fadvise, which leaves the files as they are) so that the reads reach the disk;
    then up to `nbytes` are read. Where the cache cannot be dropped the figure may be the cache's."""
    shards = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size, reverse=True)
    done, start = 0, time.perf_counter()
    for shard in shards:
        with shard.open("rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while done < nbytes and (chunk := f.read(min(16 * 2**20, nbytes - done))):
                done += len(chunk)
        if done >= nbytes:
            break
    return done / max(time.perf_counter() - start, 1e-9)
