"""Safetensors IO for the Hugging Face interop in `model.hf`: a lazy reader of a `transformers`
checkpoint's shards (`HFWeights`) and a streaming writer (`SafetensorsStream`, `write_hf_shards`)
that never holds more than the tensor it is given.
"""

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


# ----------------------------------------------------------------------------------------------
# Reading Hugging Face safetensors shards lazily


class HFWeights:
    """Tensors of a HF model directory, read one at a time from its safetensors shards.

    Uses `model.safetensors.index.json` when present, else a single `model.safetensors`.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / HF_INDEX
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise ValueError(
                    f"{index}: expected a 'weight_map' object of tensor name -> shard file, as "
                    "save_pretrained writes it; the index is damaged: download it again"
                )
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise ValueError(
                    f"{index} lists shard(s) {missing[:3]} that are not in {self.dir}: the "
                    "download is incomplete; fetch the missing model-*.safetensors files"
                )
        elif (self.dir / HF_SINGLE).exists():
            with _safe_open(self.dir / HF_SINGLE) as f:
                weight_map = {k: HF_SINGLE for k in f.keys()}
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {bins}: re-save them with safetensors)" if bins else ""
            raise FileNotFoundError(f"{self.dir}: neither {HF_INDEX} nor {HF_SINGLE}{hint}")
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _path(self, name: str) -> Path:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self.dir / self.weight_map[name]

    def _header(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype code) of `name`, from its shard's header (read once)."""
        path = self._path(name)
        if path.name not in self._headers:
            with _safe_open(path) as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                self._headers[path.name] = {
                    k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()
                }
        found = self._headers[path.name].get(name)
        if found is None:
            raise ValueError(
                f"{path}: no tensor {name!r}, though {HF_INDEX} places it there: the index and "
                "the shards do not match; download them again"
            )
        return found

    def get(self, name: str) -> torch.Tensor:
        # Each read opens and closes its shard: a handle kept open keeps every page read through
        # its memory map in this process's RSS, which for a 70B import climbs to the model's
        # 140 GB (file-backed, but counted against RSS-based job limits).
        self._header(name)
        with _safe_open(self._path(name)) as f:
            return f.get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        code = self._header(name)[1]
        found = {v: k for k, v in _ST_DTYPE.items()}.get(code)
        if found is None:
            raise ValueError(f"{self.dir}: {name} has dtype {code}; expected F32, BF16 or F16")
        return found

    def shape(self, name: str) -> tuple[int, ...]:
        return self._header(name)[0]


def _safe_open(path: Path):
    """safe_open with an error that names the file (safetensors' own does not)."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt: "
            "download or write it again"
        ) from None


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or ValueError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# Streaming safetensors writer


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving split of tensors into shards of at most max_shard_bytes (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


class SafetensorsStream:
    """Writes one safetensors file tensor by tensor.

    The header (names, dtype, shapes, byte offsets) follows from the shapes alone, so it is
    written first and each tensor's bytes are appended as it arrives: the writer never holds more
    than the tensor it is given (a 70B import does not need the model in memory).
    """

    def __init__(
        self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, metadata: dict
    ):
        if dtype not in _ST_DTYPE:
            raise ValueError(f"unsupported dtype {dtype}; expected one of {list(_ST_DTYPE)}")
        self.path, self.dtype = Path(path), dtype
        self.order = list(shapes.items())
        itemsize = torch.empty((), dtype=dtype).element_size()
        header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
        offset = 0
        for name, shape in self.order:
            nbytes = math.prod(shape) * itemsize
            header[name] = {
                "dtype": _ST_DTYPE[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._next >= len(self.order):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        want, shape = self.order[self._next]
        if name != want or tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{self.path}: expected {want} {tuple(shape)} next, got {name} {tuple(t.shape)}"
            )
        flat = t.detach().to("cpu", self.dtype).contiguous().reshape(-1)
        if self.dtype == torch.float16 and t.dtype != torch.float16:
            # fp16 tops out at 65504: a larger bf16/fp32 value would be written as inf.
            overflow = flat.isinf() & t.detach().reshape(-1).cpu().isfinite()
            if overflow.any():
                big = t.detach().abs().max().item()
                raise ValueError(
                    f"{name} holds values up to {big:.4g}, past float16's 65504: they would be "
                    "written as inf; convert with --dtype bf16 or fp32 instead"
                )
        self._f.write(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            missing = [n for n, _ in self.order[self._next :]]
            self._f.close()
            raise ValueError(f"{self.path}: {len(missing)} tensors never written: {missing[:4]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def write_hf_shards(
    out_dir: Path,
    tensors: Iterator[tuple[str, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> dict:
    """Stream `tensors` (in the order of `shapes`) into model-0000X-of-0000Y.safetensors files and
    write model.safetensors.index.json. Returns the index."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {n: math.prod(s) * itemsize for n, s in shapes.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    tensors = iter(tensors)
    for fname, members in zip(names, shards):
        stream = SafetensorsStream(
            out_dir / fname, {n: shapes[n] for n in members}, dtype, {"format": "pt"}
        )
        for name in members:
            got, t = next(tensors)
            stream.write(got, t)
            weight_map[name] = fname
        stream.close()
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out_dir / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index
