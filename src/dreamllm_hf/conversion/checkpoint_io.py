"""Reading the release's pickles safely and writing safetensors shards without a second copy of the model.

Reading: `torch.load(weights_only=True, mmap=True)`. A pickle that would build anything but tensors (that is, run code)
is refused; the tensors stay in the file's page cache, mapped into this process, and are read on demand.

Writing: every shard is streamed tensor by tensor (in chunks, cast on the fly when a dtype is asked for) straight
from the mapped file into the safetensors file. Nothing holds a whole shard, let alone a whole model, in memory.
Pages of the mapped input are handed back to the kernel (`madvise(MADV_DONTNEED)`) once written, so the resident
memory does not grow to the size of the input either; this is done only for ranges that `/proc/self/maps` shows to
be private mappings of the input file, where dropping a page just means it is re-read from the file if touched again.
"""

import ctypes
import json
import logging
import mmap
import os
import pickle
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from .original_layout import OriginalCheckpointError


logger = logging.getLogger(__name__)

# safetensors dtype names (https://github.com/huggingface/safetensors, format description).
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
CHUNK_BYTES = 64 * 2**20  # what one write (and one cast) handles at most
_MADV_DONTNEED = 4


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A release `.bin`, read as tensors only (memory-mapped). A pickle that would run code is refused."""
    path = Path(path)
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap can only be used" not in str(error):
                raise
            # A pre-1.6 (non-zip) pickle cannot be mapped: read it into memory instead, still tensors only.
            logger.warning(
                "%s is in torch's legacy (non-zip) format: it is read into memory, not memory-mapped.", path
            )
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = str(error).splitlines()
        reason = next(
            (line.strip() for line in lines if "Unsupported" in line or "WeightsUnpickler" in line), lines[0]
        )
        raise OriginalCheckpointError(
            f"Refusing to load {path}: it is not a plain tensor pickle, and loading it could run code "
            f"(torch.load(weights_only=True) said: {reason}). The DreamLLM release holds only tensors; this file may "
            "have been tampered with. Do not load it with weights_only=False; get a clean copy of the release."
        ) from error
    if not isinstance(state_dict, dict):
        raise OriginalCheckpointError(f"{path} holds a {type(state_dict).__name__}, not a state dict.")
    not_tensors = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise OriginalCheckpointError(
            f"{path} is not a flat state dict: {', '.join(map(str, not_tensors[:5]))} hold no tensor."
        )
    return state_dict


class PageReleaser:
    """Gives the pages of memory-mapped input files back to the kernel once their tensors are written.

    Only ranges inside private file mappings of the registered files (as listed in `/proc/self/maps`) are released:
    their content is re-read from the file if touched again, so releasing never changes a value. Elsewhere (other
    operating systems, files read into memory) it does nothing.
    """

    def __init__(self):
        self._regions: list[tuple[int, int]] = []
        self._madvise = None
        self._page = mmap.PAGESIZE
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                libc.madvise.restype = ctypes.c_int
                self._madvise = libc.madvise
            except (OSError, AttributeError):
                self._madvise = None

    def register(self, path: str | os.PathLike) -> None:
        """Records where `path` is mapped (call after loading it)."""
        if self._madvise is None:
            return
        target = os.path.realpath(path)
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) < 6 or fields[5].rstrip("\n") != target or not fields[1].endswith("p"):
                        continue
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    self._regions.append((start, end))
        except OSError:
            return

    def release(self, tensor: torch.Tensor) -> None:
        if self._madvise is None or not self._regions or tensor.device.type != "cpu":
            return
        begin = tensor.data_ptr()
        end = begin + tensor.numel() * tensor.element_size()
        if not any(start <= begin and end <= stop for start, stop in self._regions):
            return
        begin = -(-begin // self._page) * self._page  # whole pages inside the tensor only
        end = end // self._page * self._page
        if end > begin:
            self._madvise(begin, end - begin, _MADV_DONTNEED)


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def target_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` for floating-point tensors when given, else the stored dtype."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


@dataclass
class ShardPlan:
    """Which tensors go to which file of one component (a transformers or diffusers weights folder)."""

    filename_to_tensors: dict[str, list[str]]
    tensor_to_filename: dict[str, str]
    total_size: int
    index_name: str | None  # None when there is a single file

    @property
    def num_shards(self) -> int:
        return len(self.filename_to_tensors)


def plan_shards(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, filename_pattern: str, max_shard_size: int | str
) -> ShardPlan:
    """Splits by the size the tensors will have once written (in the target dtype), with huggingface_hub's splitter.

    The splitter sees meta tensors only, so it never touches the data. Keys keep their order (the order of the input
    files), which keeps the reads sequential.
    """
    sizes = {
        key: torch.empty(tuple(t.shape), dtype=target_dtype(t, dtype), device="meta") for key, t in tensors.items()
    }
    split = split_torch_state_dict_into_shards(sizes, filename_pattern=filename_pattern, max_shard_size=max_shard_size)
    index_name = filename_pattern.format(suffix="") + ".index.json" if split.is_sharded else None
    return ShardPlan(
        filename_to_tensors=dict(split.filename_to_tensors),
        tensor_to_filename=dict(split.tensor_to_filename),
        total_size=split.metadata["total_size"],
        index_name=index_name,
    )


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    releaser: PageReleaser | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> int:
    """Writes one safetensors file from (possibly memory-mapped) tensors, chunk by chunk; returns its data size.

    Floating-point tensors are cast to `dtype` chunk by chunk. The file follows the safetensors format: an 8-byte
    little-endian header length, the JSON header (padded with spaces to a multiple of 8), then the tensors' bytes,
    laid out from the widest dtype to the narrowest so that every tensor is aligned to its element size.
    """
    if sys.byteorder != "little":
        raise RuntimeError(
            "safetensors files are little-endian; writing them on a big-endian machine is not supported."
        )
    order = sorted(tensors, key=lambda key: -target_dtype(tensors[key], dtype).itemsize)  # stable: input order kept
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for key in order:
        tensor = tensors[key]
        out_dtype = target_dtype(tensor, dtype)
        if out_dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {out_dtype} has no safetensors name.")
        size = tensor.numel() * out_dtype.itemsize
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[out_dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for key in order:
            _write_tensor(file, tensors[key], target_dtype(tensors[key], dtype), releaser, on_bytes, chunk_bytes)
            if on_tensor is not None:
                on_tensor(key)
        file.flush()
        os.fsync(file.fileno())
    return offset


def _write_tensor(file, tensor, out_dtype, releaser, on_bytes, chunk_bytes) -> None:
    source = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = source.reshape(-1)
    step = max(1, chunk_bytes // max(source.element_size(), out_dtype.itemsize))
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step]
        out = piece.to(out_dtype) if piece.dtype != out_dtype else piece
        file.write(out.view(torch.uint8).numpy().data)
        if releaser is not None:
            releaser.release(piece)
        if on_bytes is not None:
            on_bytes(out.numel() * out.element_size())
        del out


def write_component_weights(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    plan: ShardPlan,
    *,
    dtype: torch.dtype | None,
    index_metadata: dict | None = None,
    releaser: PageReleaser | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    on_shard: Callable[[str], None] | None = None,
) -> list[str]:
    """Writes the shards of `plan` (and their index when there are several) into `folder`; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, keys in plan.filename_to_tensors.items():
        if on_shard is not None:
            on_shard(filename)
        write_safetensors(
            folder / filename,
            {key: tensors[key] for key in keys},
            dtype=dtype,
            metadata={"format": "pt"},
            releaser=releaser,
            on_bytes=on_bytes,
            on_tensor=on_tensor,
        )
        written.append(filename)
    if plan.index_name is not None:
        index = {
            "metadata": {**(index_metadata or {}), "total_size": plan.total_size},
            "weight_map": plan.tensor_to_filename,
        }
        (folder / plan.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(plan.index_name)
    return written


def iter_safetensors(folder: Path) -> Iterable[Path]:
    """The safetensors files of a component folder, in name order."""
    return sorted(folder.glob("*.safetensors"))
