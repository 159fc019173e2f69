"""A Hugging Face checkpoint on local disk: its config files and lazy, zero-copy access to its tensors.

A checkpoint comes from a local folder or a Hub repo id. Only `.safetensors` weights are read; pickled
`.bin`/`.pt` files are refused, never loaded. Nothing under the checkpoint folder is ever written.
"""

import contextlib
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

from localmoe.errors import LocalMoEError, setting
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


# What a weight may be stored as: floating point, or block-scaled FP8 (decoded with its scales)
WEIGHT_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn})
INTEGER_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


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
    download fails here with the shard's name rather than halfway through loading. A checkpoint opened
    from its shards' `headers` alone (a Hub repo whose shards are not downloaded) knows every tensor's
    name, dtype and shape, which is all a plan needs, and reads no weight.
    """

    def __init__(self, path: Path, name: str | None = None, headers: dict[str, "ShardHeader"] | None = None):
        self.path = path
        self.name = name or path.name  # for people: a Hub repo id, or the folder's name
        self.part = ""  # the part of the model a view shows, for messages (see `part_view`)
        self._prefixes: tuple[tuple[str, str], ...] = ()  # a view's (name prefix, stored prefix) pairs
        self._aliases: dict[str, str] = {}  # a view's other names for tensors: alias -> name (see `with_aliases`)
        self.weights_here = headers is None
        self.config = _read_json(checkpoint_file(path, "config.json"), required=True)
        self.generation_config = _read_json(checkpoint_file(path, "generation_config.json"), required=False)
        self.quantization = quantization_for(_with_modelopt_config(self.config, path), path)
        index = _read_index(path, shards_here=self.weights_here)
        if index is None:
            single = checkpoint_file(path, SINGLE_FILE)
            if headers is None and not single.is_file():
                raise LocalMoEError(_no_weights_message(path))
            handle = headers[SINGLE_FILE] if headers else _open_shard(single)
            self._files = {SINGLE_FILE: handle}
            self._shard_of = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            self._shard_of = index
            shards = sorted(set(index.values()))
            self._files = {shard: headers[shard] if headers else _open_shard(path / shard) for shard in shards}
            self._check_index_matches_shards()

    @classmethod
    def open(cls, source: str | Path, revision: str | None = None, weights: bool = True) -> "Checkpoint":
        """Open a local folder, or a Hub repo id through the Hugging Face cache (downloading if needed).
        Without `weights`, a Hub repo's shards are not downloaded where they are not already: only their
        headers are read, by HTTP range requests (see `Checkpoint`)."""
        path = Path(source).expanduser()
        if path.is_dir():
            if revision is not None:
                raise LocalMoEError(f"{source} is a local folder: {setting('revision')} picks a revision of a Hub repo")
            return cls(path)
        repo_id = _repo_id(str(source), path)
        with _hub_errors(repo_id, revision):
            folder = _download_metadata(repo_id, revision)
            shards = _shards_to_fetch(folder)
            if weights or all((folder / shard).is_file() for shard in shards):
                _download_shards(repo_id, revision, shards)
                return cls(folder, repo_id)
            return cls(folder, repo_id, _remote_headers(repo_id, folder.name))

    @property
    def file_label(self) -> str:
        """`name` as the start of a file name in localmoe's cache folder: a repo id's owner and name joined
        by '--', as the Hugging Face cache writes them."""
        return self.name.replace("/", "--")

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

    def with_aliases(self, prefixes: list[tuple[str, str]], config: dict | None = None) -> "Checkpoint":
        """This checkpoint with every tensor under each prefix of `prefixes` (pairs (alias prefix, prefix))
        also seen under the alias prefix (a release's multi-token-prediction layers under DeepSeek-V3's
        names), and `config` (where given) as its config. One tensor may have several aliases."""
        view = copy.copy(self)
        view.config = self.config if config is None else config
        view._shard_of, view._aliases = dict(self._shard_of), dict(self._aliases)
        for alias, prefix in prefixes:
            for name in self.tensor_names:
                if name.startswith(prefix):
                    view._aliases[alias + name[len(prefix) :]] = name
                    view._shard_of[alias + name[len(prefix) :]] = self._shard_of[name]
        return view

    def stored_name(self, name: str) -> str:
        """The name under which tensor `name` is stored (other than `name` in a view only)."""
        name = self._aliases.get(name, name)
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

    def check_tensor(self, name: str, shape: tuple[int, ...], dtypes: frozenset[torch.dtype] = WEIGHT_DTYPES) -> None:
        """Refuse a checkpoint that lacks `name`, stores it in another shape than the config implies, or
        in a dtype outside `dtypes` (by default those of weights): bytes read as another type than they
        were written in would be used as weights, silently wrong."""
        stored = self.stored_name(name)
        if name not in self:
            raise LocalMoEError(
                f"{self.path} lacks tensor {stored}: the checkpoint is incomplete or its index is damaged; "
                "download it again"
            )
        info = self.info(name)
        if info.shape != shape:
            raise LocalMoEError(
                f"tensor {stored} in {self.path} has shape {list(info.shape)} but config.json implies {list(shape)}: "
                "the config and the weights do not belong together"
            )
        if info.dtype not in dtypes:
            expected = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))
            raise LocalMoEError(
                f"tensor {stored} in {self.path} is stored as {str(info.dtype).removeprefix('torch.')}, where the "
                f"model reads one of {expected}: the checkpoint is damaged or not in the layout its config names"
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

    def check_weight(self, name: str, shape: tuple[int, ...], dtypes: frozenset[torch.dtype] = WEIGHT_DTYPES) -> None:
        """`check_tensor` for a weight, which a quantized checkpoint may store in another form: then every
        part it is stored in is checked against the others and against `shape`."""
        fmt = self._format(name)
        if fmt is None:
            self.check_tensor(name, shape, dtypes)
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
            raise self.unscaled_fp8(name)
        return tensor

    def unscaled_fp8(self, name: str) -> LocalMoEError:
        """An FP8 weight stored without the scale its quantization config names (a half-downloaded release)."""
        return LocalMoEError(
            f"{self.path}: tensor {self.stored_name(name)} is FP8 without a block scale "
            f"({self.stored_name(name)}_scale_inv) or an fp8 quantization_config: localmoe cannot decode it"
        )

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


def _repo_id(source: str, path: Path) -> str:
    """`source` as a Hub repo id, where it is no local folder; refused in one line where it is neither."""
    if path.exists():
        raise LocalMoEError(f"{source} is a file: give the folder that holds config.json, or a Hub repo id")
    if not REPO_ID.fullmatch(source):
        raise LocalMoEError(f"no such folder: {source} (give a checkpoint folder or a Hub repo id like owner/name)")
    return source


def _download_metadata(repo_id: str, revision: str | None) -> Path:
    """The repo's snapshot folder in the Hugging Face cache, with its configs, tokenizer and weight index.

    `HF_HUB_OFFLINE=1` and an unreachable Hub both fall back to the cache, so a repo that is already
    downloaded opens with no network.
    """
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=METADATA_PATTERNS))


def _download_shards(repo_id: str, revision: str | None, shards: list[str]) -> None:
    """Only the shards the index names: a repo that also ships `consolidated.safetensors` or `.bin` copies
    does not cost a second download of the whole model."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, revision=revision, allow_patterns=shards)


class ShardHeader:
    """A shard's header, fetched without its weights: what safetensors' file handle tells of it (names,
    dtypes, shapes), under the same calls; reading a tensor from it is refused."""

    def __init__(self, repo_id: str, shard: str, tensors: dict[str, tuple[str, list[int]]]):
        self._where, self._tensors = f"{repo_id}/{shard}", tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_slice(self, name: str) -> "_TensorHeader":
        return _TensorHeader(*self._tensors[name])

    def get_tensor(self, name: str):
        raise LocalMoEError(f"{self._where} is not downloaded (its header was read to plan): load the model to read it")


@dataclass(frozen=True)
class _TensorHeader:
    dtype: str
    shape: list[int]

    def get_dtype(self) -> str:
        return self.dtype

    def get_shape(self) -> list[int]:
        return self.shape


def _remote_headers(repo_id: str, commit: str) -> dict[str, ShardHeader]:
    """Every shard's header, read from the Hub by HTTP range requests (huggingface_hub fetches the first
    100 kB of each shard, and the rest of a longer header): megabytes for a model of hundreds of GB."""
    from huggingface_hub import get_safetensors_metadata

    metadata = get_safetensors_metadata(repo_id, revision=commit)
    return {
        shard: ShardHeader(repo_id, shard, {name: (t.dtype, t.shape) for name, t in info.tensors.items()})
        for shard, info in metadata.files_metadata.items()
    }


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None):
    """What the Hub says, as one line saying what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        SafetensorsParsingError,
    )

    try:
        yield
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
    except (NotASafetensorsRepoError, SafetensorsParsingError) as error:
        raise LocalMoEError(f"{repo_id}: {_first_line(error)}: localmoe reads safetensors checkpoints only") from None
    except HfHubHTTPError as error:
        raise LocalMoEError(f"the Hub refused the download of {repo_id}: {_first_line(error)}") from None
    except OfflineModeIsEnabled:
        raise LocalMoEError(
            f"the shards of {repo_id} are not downloaded and HF_HUB_OFFLINE is set: reading their headers needs "
            f"the Hub; unset it, or download the checkpoint first (`hf download {repo_id}`)"
        ) from None
    except LocalMoEError:
        raise
    except Exception as error:
        # the HTTP client's own errors (connection refused, timeout): huggingface_hub does not wrap them, and
        # its client changed between releases (httpx, httpx2), so they are told by their module
        if not type(error).__module__.startswith(("httpx", "httpcore")):
            raise
        raise LocalMoEError(
            f"the Hub cannot be reached for {repo_id} ({_first_line(error)}): check the network"
        ) from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


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
        data = json.loads(path.read_text(encoding="utf-8"), object_hook=_special_float)
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
    modelopt_file = checkpoint_file(path, "hf_quant_config.json")
    if config.get("quantization_config") or not modelopt_file.is_file():
        return config
    modelopt = _read_json(modelopt_file, required=True)
    return {**config, "quantization_config": {"quant_method": "modelopt", **modelopt}}


def _special_float(value: dict):
    """transformers 5 writes floats JSON cannot spell as {"__float__": "Infinity"} (Mamba's time step limit)."""
    if set(value) == {"__float__"}:
        return float(value["__float__"])
    return value


def checkpoint_file(folder: Path, name: str) -> Path:
    """`folder / name`, refused in one line where the name or a symlink on the way leads outside the
    checkpoint folder: localmoe reads nothing else. In a Hugging Face cache snapshot, files are symlinks
    into the repo's `blobs/` folder, which counts as inside."""
    path = folder / name
    if not _inside(folder, path):
        raise LocalMoEError(
            f"{folder}: {name} leads outside the checkpoint folder (to {path.resolve()}); localmoe reads only the "
            "files in the folder: put the file itself there"
        )
    return path


def _inside(folder: Path, path: Path) -> bool:
    real, roots = path.resolve(), [folder.resolve()]
    if roots[0].parent.name == "snapshots" and (blobs := roots[0].parent.parent / "blobs").is_dir():
        roots.append(blobs.resolve())
    return any(real.is_relative_to(root) for root in roots)


def _read_index(path: Path, shards_here: bool = True) -> dict[str, str] | None:
    """Tensor name -> shard file name from the index, or None for a single-file checkpoint; each shard it
    names checked to be in the folder (`shards_here`)."""
    index = checkpoint_file(path, INDEX_FILE)
    if index.is_file():
        weight_map = _read_json(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LocalMoEError(f"{index} has no weight_map: the index is damaged; download it again")
        if not all(isinstance(shard, str) and shard for shard in weight_map.values()):
            raise LocalMoEError(f"{index} maps a tensor to something other than a file name: the index is damaged")
        for shard in sorted(set(weight_map.values())):
            checkpoint_file(path, shard)
        absent = sorted({shard for shard in weight_map.values() if shards_here and not (path / shard).is_file()})
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
    inside = [shard for shard in folder.glob("*.safetensors") if _inside(folder, shard)]
    shards = sorted(inside, key=lambda p: p.stat().st_size, reverse=True)
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
