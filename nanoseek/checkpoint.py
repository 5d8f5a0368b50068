"""HF-layout checkpoint I/O: the only model format nanoseek reads or writes.

Layout (what the released DeepSeek checkpoints and transformers use):
    config.json
    model.safetensors                       or  model-0000i-of-0000n.safetensors + model.safetensors.index.json
    model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight      one tensor per expert
    model.layers.{num_hidden_layers + k}.*                          MTP module k (+ its copies of
                                                                    embed_tokens and shared_head.head)
FP8 checkpoints store `float8_e4m3fn` weights with `<name>_scale_inv` [ceil(out/128), ceil(in/128)]:
weight = fp8 · scale per 128×128 block (ragged edge blocks included). They are dequantised on load.
A scale may sit in another shard than its weight (shards are cut by size); the index says where.

Loading streams one tensor at a time into a model allocated once, so peak memory is the model plus
one tensor. Saving writes a temporary directory and renames it into place: a crash never leaves a
half-written checkpoint. safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import swap_into_place
from .model.args import ConfigError, ModelArgs
from .model.rope import inv_frequencies
from .model.transformer import Transformer
from .quant.fp8 import dequantize_blocks, quantize_blocks
from .quant.inference import is_fp8_resident, to_fp8_inference

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MODEL_FILES = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json)$")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn",) if hasattr(torch, n))


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as it is; the message names file and tensor."""


# --- names ---------------------------------------------------------------------------------
_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def hf_to_internal(name: str, args: ModelArgs) -> tuple[str, tuple | None] | None:
    """Map a checkpoint tensor name to (parameter name, slice into it) or None for a shared copy.

    The slice is (expert, row_start, row_end) for per-expert tensors fused into one parameter.
    Raises KeyError for names that belong to no part of the model.
    """
    if name == "lm_head.weight":
        return name, None
    if not name.startswith("model."):
        raise KeyError(name)
    rest = name[len("model."):]
    if rest in ("embed_tokens.weight", "norm.weight"):
        return rest, None
    m = re.match(r"^layers\.(\d+)\.(.*)$", rest)
    if not m:
        raise KeyError(name)
    layer, tail = int(m.group(1)), m.group(2)
    N = args.num_hidden_layers
    if layer >= N:  # an MTP module
        k = layer - N
        if k >= args.num_nextn_predict_layers:
            raise KeyError(name)
        if tail in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # copies of the shared embedding / head
        prefix = f"mtp.{k}."
    else:
        prefix = f"layers.{layer}."
    e = _EXPERT.match(f"layers.{layer}.{tail}")
    if e:
        expert, proj = int(e.group(2)), e.group(3)
        if expert >= args.n_routed_experts:
            raise KeyError(name)
        I = args.moe_intermediate_size
        if proj == "down_proj":
            return prefix + "mlp.experts.down_proj", (expert, 0, None)
        start = 0 if proj == "gate_proj" else I
        return prefix + "mlp.experts.gate_up_proj", (expert, start, start + I)
    return prefix + tail, None


def internal_to_hf(model: Transformer):
    """Yield (checkpoint name, tensor) for every tensor of the HF layout, experts split, MTP copies added."""
    args = model.args
    state = dict(model.state_dict())
    N, I = args.num_hidden_layers, args.moe_intermediate_size
    for name, t in state.items():
        if name.startswith("mtp."):
            k, tail = name[len("mtp."):].split(".", 1)
            prefix = f"model.layers.{N + int(k)}."
        elif name.startswith("layers."):
            i, tail = name[len("layers."):].split(".", 1)
            prefix = f"model.layers.{i}."
        elif name == "lm_head.weight":
            yield name, t
            continue
        else:
            yield "model." + name, t
            continue
        if tail == "mlp.experts.gate_up_proj":
            for e in range(t.shape[0]):
                yield f"{prefix}mlp.experts.{e}.gate_proj.weight", t[e, :I]
                yield f"{prefix}mlp.experts.{e}.up_proj.weight", t[e, I:]
        elif tail == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                yield f"{prefix}mlp.experts.{e}.down_proj.weight", t[e]
        else:
            yield prefix + tail, t
    for k in range(len(model.mtp)):
        yield f"model.layers.{N + k}.embed_tokens.weight", state["embed_tokens.weight"]
        yield f"model.layers.{N + k}.shared_head.head.weight", state["lm_head.weight"]


# --- FP8 -------------------------------------------------------------------------------------
# The block format's quantise/dequantise live with the rest of the FP8 vocabulary (nanoseek/quant/fp8.py);
# these are their names here: dequantize_fp8(fp8 [out, in], scale_inv [ceil(out/128), ceil(in/128)])
# -> float32 [out, in] (ValueError for a scale of the wrong shape), quantize_fp8(w) -> (fp8, scale_inv).
dequantize_fp8 = dequantize_blocks
quantize_fp8 = quantize_blocks


# --- load ------------------------------------------------------------------------------------
def resolve_model_dir(path) -> Path:
    """The model directory a user means by `path`; CheckpointError (one line) when there is none.

    Accepts a checkpoint / model directory (has config.json), the `latest` pointer file of a
    training run, a run's `checkpoints/` directory or the run directory itself (both resolve to
    the checkpoint `latest` names).
    """
    path = Path(path)
    hint = ("pass a model directory (with config.json), a training run directory or its "
            "checkpoints/ directory")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory; {hint}")
    if path.is_file() and (path.parent / "config.json").is_file():
        return path.parent  # a file inside a model directory (config.json, a shard...)
    if path.is_file():
        if path.stat().st_size > 4096:
            raise CheckpointError(f"{path}: a file, not a model directory or a checkpoint pointer; {hint}")
        pointer = path
    elif (path / "config.json").is_file():
        return path
    elif (path / "latest").is_file():
        pointer = path / "latest"
    elif (path / "checkpoints" / "latest").is_file():
        pointer = path / "checkpoints" / "latest"
    else:
        if (path / "checkpoints").is_dir():
            where = "its checkpoints/ has no 'latest' checkpoint yet"
        elif path.name == "checkpoints":
            where = "no 'latest' checkpoint here yet"
        else:
            where = "no config.json there"
        raise CheckpointError(f"{path}: not a model directory ({where}); {hint}")
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot read it as a checkpoint pointer ({e}); {hint}") from None
    target = pointer.parent / name
    if not name or "/" in name or "\\" in name or not (target / "config.json").is_file():
        raise CheckpointError(f"{pointer}: names {name[:80]!r}, which is not a model directory "
                              f"(no config.json in {target}); {hint}")
    return target


def _shard_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The checkpoint's files, and the index's tensor name -> file map (None for a single file)."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{index}: lists shard {f!r}, which is missing from {path}")
        return [path / f for f in files], {name: path / f for name, f in weight_map.items()}
    if (path / SINGLE_NAME).exists():
        return [path / SINGLE_NAME], None
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _read_other_shard(file: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None


def read_layout(path: Path, head: str = "lm") -> tuple[ModelArgs, list[Path], dict[str, Path] | None]:
    """A model directory's config and files: (args, shard files, the index's name -> file map or None).

    args has num_nextn_predict_layers=0 when the config names MTP modules the files do not hold
    (transformers drops them when it saves; such a checkpoint is still a whole model)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json (not an HF-layout model directory)")
    args = ModelArgs.from_json(path / "config.json")
    files, weight_map = _shard_files(path)
    if args.num_nextn_predict_layers and not _has_layer(files, args.num_hidden_layers):
        if head != "score":  # (a reward model never has them)
            warnings.warn(f"{path}: config has num_nextn_predict_layers={args.num_nextn_predict_layers} but "
                          "the checkpoint holds no MTP tensors; loading without MTP modules")
        args = args.replace(num_nextn_predict_layers=0)
    return args, files, weight_map


def default_dtype(args: ModelArgs, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are very slow there), the checkpoint's torch_dtype elsewhere."""
    return torch.float32 if device.type == "cpu" else getattr(torch, args.torch_dtype, torch.bfloat16)


def weight_block(args: ModelArgs) -> tuple[int, int]:
    """The FP8 block shape of the checkpoint's `_scale_inv` tensors ([128, 128] for DeepSeek-V3)."""
    return tuple((args.quantization_config or {}).get("weight_block_size", (128, 128)))


def load(path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         head: str = "lm") -> Transformer:
    """Load an HF-layout directory into a Transformer.

    head="score": a sequence-classification checkpoint (transformers' DeepseekV3ForSequenceClassification,
    nanoseek.rl.reward_model): lm_head.weight is optional (zeros when absent) and `score.weight` is left
    for the caller to read.

    dtype None: float32 on CPU (bf16 matmuls are very slow there), the checkpoint's torch_dtype
    elsewhere. FP8 weights are dequantised, except with dtype="fp8": then the layers DeepSeek-V3
    stores in FP8 stay FP8 + block scales in memory (quantised on load if the checkpoint is not FP8;
    nanoseek/quant/inference.py) and the rest loads in the default dtype. Raises CheckpointError / ConfigError naming the file
    and tensor for a missing, unexpected, mis-shaped or unreadable tensor.
    """
    path = Path(path)
    args, files, weight_map = read_layout(path, head)
    device = torch.device(device)
    fp8_resident = dtype == "fp8"
    if dtype is None or fp8_resident:
        dtype = default_dtype(args, device)
    block = weight_block(args)

    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    expected = {name for name, _ in internal_to_hf(model)}
    if head == "score":
        expected.discard("lm_head.weight")
    fp8_slots = to_fp8_inference(model, dtype, block) if fp8_resident else {}
    model = model.to_empty(device=device)
    for module in model.modules():  # the balancing bias stays fp32 whatever the compute dtype
        if getattr(module, "e_score_correction_bias", None) is not None:
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    params = dict(model.state_dict(keep_vars=True))
    if head == "score":
        with torch.no_grad():
            model.lm_head.weight.zero_()
    seen: set[str] = set()
    known = params.keys() | fp8_slots.keys()

    for file in files:
        with open_shard(file) as f:
            keys = set(f.keys())
            names = keys | set(weight_map or ())  # this shard's tensors and, through the index, the others'
            for name in sorted(keys):
                if head == "score" and name == "score.weight":
                    continue
                target = route(file, name, names, args, known)
                if target == "scale":
                    continue
                try:
                    t = f.get_tensor(name)
                    scale = f.get_tensor(name + "_scale_inv") if name + "_scale_inv" in keys else None
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
                if t.dtype in FP8_DTYPES:
                    if scale is None and name + "_scale_inv" in (weight_map or {}):
                        # Real checkpoints are sharded by size: a scale can sit in another shard than
                        # its weight (DeepSeek's fp8_cast_bf16.py looks scales up in the index too).
                        scale = _read_other_shard(weight_map[name + "_scale_inv"], name + "_scale_inv")
                    if scale is None:
                        raise CheckpointError(f"{file}: FP8 tensor {name!r} has no {name}_scale_inv")
                    if target is None or target[0] not in fp8_slots:
                        try:
                            t = dequantize_fp8(t, scale, block)
                        except ValueError as e:
                            raise CheckpointError(f"{file}: {name}: {e}") from None
                if name in seen:
                    raise CheckpointError(f"{file}: tensor {name!r} appears in more than one shard")
                seen.add(name)
                if target is not None and target[0] in fp8_slots:  # FP8-resident: kept as stored
                    try:
                        fp8_slots[target[0]].load(target[1], t, scale)
                    except ValueError as e:
                        raise CheckpointError(f"{file}: {name}: {e}") from None
                    continue
                if target is None:
                    shared = "embed_tokens.weight" if name.endswith("embed_tokens.weight") else "lm_head.weight"
                    _check_shape(file, name, t.shape, params[shared].shape)
                    continue
                pname, sl = target
                p = params[pname]
                with torch.no_grad():
                    if sl is None:
                        _check_shape(file, name, t.shape, p.shape)
                        p.copy_(t.to(p.dtype))
                    else:
                        expert, start, stop = sl
                        dst = p[expert, start:stop] if stop is not None else p[expert]
                        _check_shape(file, name, t.shape, dst.shape)
                        dst.copy_(t.to(p.dtype))
    check_complete(path, expected, seen)
    model.inv_freq.copy_(inv_frequencies(args)[0])  # non-persistent buffer: not in the file
    return model.eval()


def check_complete(path: Path, expected: set[str], seen: set[str]) -> None:
    """CheckpointError naming (the first five of) the expected tensors that no file held."""
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} tensor(s): {shown}")


def open_shard(file: Path):
    """safe_open(file) (memory-mapped), or CheckpointError naming the file."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None


def route(file: Path, name: str, names: set[str], args: ModelArgs, known) -> tuple | str | None:
    """Where checkpoint tensor `name` (in `file`) goes: hf_to_internal's answer, or "scale" for a
    `_scale_inv` (read with its weight). names: the tensors of this file and, through the index, of
    the others; known: the internal names the model holds. CheckpointError for a scale without its
    weight or a tensor that belongs to no part of this model."""
    if name.endswith("_scale_inv"):
        if name[: -len("_scale_inv")] not in names:
            raise CheckpointError(f"{file}: {name} has no matching weight tensor")
        return "scale"
    try:
        target = hf_to_internal(name, args)
        if target is not None and target[0] not in known:
            raise KeyError(name)
    except KeyError:
        raise CheckpointError(f"{file}: unexpected tensor {name!r} (not part of this "
                              f"{args.model_type} config)") from None
    return target


def _has_layer(files: list[Path], layer: int) -> bool:
    prefix = f"model.layers.{layer}."
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if any(k.startswith(prefix) for k in f.keys()):
                    return True
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
    return False


def _check_shape(file: Path, name: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(got)}, the config needs {tuple(want)}")


# --- save ------------------------------------------------------------------------------------
def save(model: Transformer, path, max_shard_size: int = 2 << 30, score: torch.Tensor | None = None,
         config_extra: dict | None = None) -> None:
    """Write `model` to `path` in the HF layout, atomically.

    Shards at `max_shard_size` bytes (index written when there is more than one shard). Files in an
    existing `path` that are not model files (tokenizer, generation config, ...) are kept.
    score: a sequence-classification head [num_labels, hidden] written as `score.weight` in place of
    lm_head.weight; config_extra: keys merged into config.json (architectures, id2label, ...).
    """
    path = Path(path)
    if is_fp8_resident(model):
        raise CheckpointError("an FP8-resident model (dtype='fp8') is for inference and cannot be saved; "
                              "load it with the default dtype, or use `nanoseek convert`")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        tensors = internal_to_hf(model)
        if score is not None:
            tensors = [(n, t) for n, t in tensors if n != "lm_head.weight"] + [("score.weight", score)]
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][name] = t.detach().to("cpu").contiguous().clone()
            size += nbytes
        weight_map, total = {}, 0
        n = len(shards)
        for i, shard in enumerate(shards, start=1):
            fname = SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        config = model.args.to_config()
        config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        config.pop("quantization_config", None)  # we write dequantised weights
        config.update(config_extra or {})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if path.exists():
            for item in path.iterdir():
                if not MODEL_FILES.match(item.name) and not (tmp / item.name).exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        _fsync_dir(tmp)
        swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(d: Path) -> None:
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


__all__ = ["CheckpointError", "ConfigError", "load", "save", "resolve_model_dir", "dequantize_fp8", "quantize_fp8"]
