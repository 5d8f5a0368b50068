"""Checkpoint conversion between FP8 and BF16/FP32, on CPU, one tensor at a time.

    fp8_to_bf16(src, dst, dtype=torch.bfloat16)   what DeepSeek's fp8_cast_bf16.py does, without CUDA
    to_fp8(src, dst)                               the released checkpoints' format from a BF16/FP32 one

Both keep the source's shard files (same names, same tensors per shard, each scale beside its
weight), rewrite the index, copy every other top-level file (tokenizer, generation config, ...) and
rewrite config.json (`quantization_config` dropped or written). Memory stays bounded by the
largest tensor, not the shard or the model: shards are read with plain reads (no mmap, whose
touched pages would count against the process) and written tensor by tensor behind a header
computed in advance, so one source tensor and its result are all that is ever resident.

Everything that can be checked from the files' headers is checked before anything is written: a
source without FP8 tensors (fp8-to-bf16) or already in FP8 (to-fp8), a missing or mis-shaped
`_scale_inv`, a scale without its weight, an existing destination. The output is assembled in a
temporary directory next to the destination and renamed into place at the end, so an error (a
non-finite weight found while quantising, a truncated shard, Ctrl-C) leaves nothing behind.

to-fp8 quantises exactly the tensors DeepSeek-V3 ships in FP8 (nanoseek.quant.fp8.V3_FP8_WEIGHTS)
into 128 x 128 blocks with fp32 `<name>_scale_inv`; all other tensors are copied as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .fp8 import E4M3, QUANTIZATION_CONFIG, WEIGHT_BLOCK, block_scale_shape, dequantize_blocks, quantize_blocks, \
    stored_in_fp8

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE = "_scale_inv"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ConvertError(ValueError):
    """A source or destination the conversion refuses; the message names the file and tensor."""


# --- safetensors, one tensor at a time --------------------------------------------------------------
class Shard:
    """A safetensors file's header, and its tensors read one at a time with plain file reads."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.start = 8 + n
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for name, e in header.items():
                dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
                if end - begin != _numel(shape) * dtype.itemsize or self.start + end > size:
                    raise ValueError(f"tensor {name!r}: offsets [{begin}, {end}) do not fit its shape or the file")
                self.entries[name] = (dtype, shape, begin, end)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(buf) != len(buf):
                raise ConvertError(f"{self.path}: tensor {name!r} is truncated")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


Spec = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_shard(path: Path, specs: list[Spec], desc: str) -> int:
    """Write a safetensors file whose tensors are produced one at a time by each spec's function.
    The header (names, dtypes, shapes, offsets) comes first, from the specs. Returns the data bytes."""
    header, offset = {}, 0
    for name, dtype, shape, _ in specs:
        size = _numel(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, dtype, shape, produce in tqdm(specs, desc=desc, unit="tensor", disable=None, leave=False):
            t = produce()
            assert t.dtype == dtype and tuple(t.shape) == shape, (name, t.dtype, t.shape)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())
    return offset


# --- the two conversions ------------------------------------------------------------------------------
def fp8_to_bf16(src, dst, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantise every FP8 weight of `src` (fp8 · scale_inv per block) to `dtype` into `dst`.

    Other tensors are copied unchanged, except that dtype=float32 also upcasts BF16/FP16 ones
    (lossless), so the whole model is fp32. Scales are dropped; config loses quantization_config.
    """
    src, dst = Path(src), Path(dst)
    shards, where, config = _open_source(src, dst)
    block = _block_size(src, config)
    plans, n_fp8 = [], 0
    for shard in shards:
        specs: list[Spec] = []
        for name in sorted(shard.entries):
            t_dtype, shape = shard.dtype(name), shard.shape(name)
            if name.endswith(SCALE):
                if name[: -len(SCALE)] not in where:
                    raise ConvertError(f"{shard.path}: {name} has no matching weight tensor")
                continue
            if t_dtype == E4M3:
                n_fp8 += 1
                scale = where.get(name + SCALE)
                if scale is None:
                    raise ConvertError(f"{shard.path}: FP8 tensor {name!r} has no {name}{SCALE} (in any shard)")
                if len(shape) != 2 or scale.shape(name + SCALE) != block_scale_shape(shape, block):
                    raise ConvertError(f"{scale.path}: {name}{SCALE} has shape {scale.shape(name + SCALE)}; weight "
                                       f"{shape} in {block[0]}x{block[1]} blocks needs {block_scale_shape(shape, block)}")
                specs.append((name, dtype, shape, _dequantizer(shard, scale, name, block, dtype)))
            elif dtype == torch.float32 and t_dtype in (torch.bfloat16, torch.float16):
                specs.append((name, dtype, shape, lambda s=shard, n=name: s.read(n).float()))
            else:
                specs.append((name, t_dtype, shape, lambda s=shard, n=name: s.read(n)))
        plans.append((shard.path.name, specs))
    if not n_fp8:
        raise ConvertError(f"{src}: no float8_e4m3fn tensors, nothing to dequantise (already BF16/FP32?)")
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write(src, dst, plans, config, indexed=(src / INDEX_NAME).exists())


def to_fp8(src, dst, pow2_scales: bool = False) -> None:
    """Quantise the tensors DeepSeek-V3 stores in FP8 to E4M3 + fp32 `_scale_inv` per 128x128 block.

    pow2_scales: UE8M0 power-of-two scales (DeepSeek-V3.1's `scale_fmt: ue8m0`).
    """
    src, dst = Path(src), Path(dst)
    shards, where, config = _open_source(src, dst)
    plans, n_fp8 = [], 0
    for shard in shards:
        specs: list[Spec] = []
        for name in sorted(shard.entries):
            t_dtype, shape = shard.dtype(name), shard.shape(name)
            if t_dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or name.endswith(SCALE):
                raise ConvertError(f"{shard.path}: {name!r} is already FP8 (or its scale); to-fp8 wants a "
                                   "BF16/FP32 checkpoint (convert fp8-to-bf16 first to re-quantise)")
            if not stored_in_fp8(name):
                specs.append((name, t_dtype, shape, lambda s=shard, n=name: s.read(n)))
                continue
            if len(shape) != 2 or not t_dtype.is_floating_point:
                raise ConvertError(f"{shard.path}: {name!r} is {DTYPE_NAMES[t_dtype]} {list(shape)}, not a 2-D "
                                   "floating-point weight")
            n_fp8 += 1
            quantized = _quantizer(shard, name, pow2_scales)
            specs.append((name, E4M3, shape, lambda q=quantized: q()[0]))
            specs.append((name + SCALE, torch.float32, block_scale_shape(shape), lambda q=quantized: q()[1]))
        plans.append((shard.path.name, specs))
    if not n_fp8:
        raise ConvertError(f"{src}: no tensor that DeepSeek-V3 stores in FP8 (model.layers.N.self_attn.*_proj, "
                           "mlp.*_proj, experts); is this a DeepSeek-V2/V3 checkpoint?")
    config["quantization_config"] = dict(QUANTIZATION_CONFIG, **({"scale_fmt": "ue8m0"} if pow2_scales else {}))
    _write(src, dst, plans, config, indexed=(src / INDEX_NAME).exists())


def _dequantizer(shard: Shard, scale: Shard, name: str, block, dtype) -> Callable[[], torch.Tensor]:
    return lambda: dequantize_blocks(shard.read(name), scale.read(name + SCALE), block, dtype)


def _quantizer(shard: Shard, name: str, pow2: bool) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Quantise `name` once when its weight is written; hand its scale over for the next spec."""
    cache: list = []

    def get():
        if not cache:
            w = shard.read(name)
            if not (torch.isfinite(w.amax()) and torch.isfinite(w.amin())):  # max/min propagate NaN
                raise ConvertError(f"{shard.path}: {name!r} holds inf or NaN values; refusing to quantise it")
            cache.extend(quantize_blocks(w, WEIGHT_BLOCK, pow2))
            return cache[0], cache[1]
        q, s = cache
        cache.clear()  # the scale comes right after its weight: free both afterwards
        return q, s

    return get


# --- source, destination ----------------------------------------------------------------------------
def _open_source(src: Path, dst: Path) -> tuple[list[Shard], dict[str, Shard], dict]:
    """Check src and dst, read every shard's header: (shards, tensor name -> shard, config)."""
    if not src.is_dir() or not (src / "config.json").is_file():
        raise ConvertError(f"{src}: not a model directory (no config.json)")
    if dst.exists():
        raise ConvertError(f"{dst}: already exists; choose a new destination (nothing is overwritten)")
    try:
        config = json.loads((src / "config.json").read_text())
        assert isinstance(config, dict)
    except (OSError, ValueError, AssertionError) as e:
        raise ConvertError(f"{src / 'config.json'}: not a JSON object ({e})") from None
    if (src / INDEX_NAME).exists():
        try:
            files = sorted(set(json.loads((src / INDEX_NAME).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConvertError(f"{src / INDEX_NAME}: not a valid safetensors index ({e!r})") from None
        for f in files:
            if "/" in f or not (src / f).is_file():
                raise ConvertError(f"{src / INDEX_NAME}: lists shard {f!r}, which is missing from {src}")
    elif (src / SINGLE_NAME).is_file():
        files = [SINGLE_NAME]
    else:
        raise ConvertError(f"{src}: no {SINGLE_NAME} or {INDEX_NAME}")
    shards = [Shard(src / f) for f in files]
    where: dict[str, Shard] = {}
    for shard in shards:
        for name in shard.entries:
            if name in where:
                raise ConvertError(f"{shard.path}: tensor {name!r} also in {where[name].path.name}")
            where[name] = shard
    return shards, where, config


def _block_size(src: Path, config: dict) -> tuple[int, int]:
    block = (config.get("quantization_config") or {}).get("weight_block_size", list(WEIGHT_BLOCK))
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConvertError(f"{src / 'config.json'}: quantization_config.weight_block_size {block!r} is not two "
                           "positive integers")
    return tuple(block)


def _write(src: Path, dst: Path, plans: list[tuple[str, list[Spec]]], config: dict, indexed: bool) -> None:
    """Write every shard, the index, config and the other files into a temporary directory, then
    rename it to dst. Removes the temporary directory on any failure."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        weight_map, total = {}, 0
        for i, (fname, specs) in enumerate(plans, start=1):
            total += write_shard(tmp / fname, specs, desc=f"{fname} ({i}/{len(plans)})")
            weight_map.update({name: fname for name, *_ in specs})
        if indexed:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards = {fname for fname, _ in plans} | {INDEX_NAME, "config.json"}
        for item in src.iterdir():  # tokenizer, generation config, chat template, ...
            if item.is_file() and item.name not in shards and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        if dst.exists():
            raise ConvertError(f"{dst}: appeared while converting; the result is not moved onto it")
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
