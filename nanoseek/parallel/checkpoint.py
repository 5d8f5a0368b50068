"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), resumable at another layout.

    step-000120/
        config.json          the model config (ModelArgs.to_config)
        dcp/                 .metadata + one __R_0.distcp file per rank: each rank writes only its
                             own shards of weights and AdamW moments (no gather on rank 0)
        trainer_state/state.json   step, tokens, data-loader position, RNG, ... (rank 0, JSON)

Keys are the model's own parameter names (`layers.3.mlp.experts.gate_up_proj`,
`state.layers.3...exp_avg`), whatever the layout: FSDP shards and EP slices are DTensors that DCP
knows how to cut, and pipeline stages keep the model's names. So a checkpoint written by N ranks
loads into M ranks with another (pp, dp_shard, ep): DCP reads each rank's new shards out of the old
files. Loading into one process needs no process group at all, which is also how `export_hf` turns
a sharded checkpoint into the ordinary HF layout (safetensors) for inference and transformers.

What changes across layouts: weights and moments are copied exactly (bitwise); the losses after a
resume at another world size match to fp32 rounding (reductions run in another order).

DCP's `.metadata` is a pickle; `_SafeReader` unpickles it with an allow-list (the checkpoint
metadata classes, torch.Size and dtypes), so a hostile file cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from nanoseek.model import ModelArgs, Transformer
from nanoseek.train.state import STATE_VERSION, STEP_DIR, _write_atomic, checkpoint_name


class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's metadata holds: its dataclasses, torch.Size, dtypes, layouts, paths, containers."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") or (module in ("collections", "builtins") and name in (
                "OrderedDict", "dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool")):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in (("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")):
            return super().find_class(module, name)
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            raise pickle.UnpicklingError("tensors are not allowed in checkpoint metadata")
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self):
        path = Path(self.path) / ".metadata"
        try:
            md = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
            raise ValueError(f"{path}: not a readable sharded checkpoint ({e})") from None
        if getattr(md, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        if md.planner_data is None:
            md.planner_data = {}
        return md


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer, args: ModelArgs, state: dict,
                 tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a checkpoint directory from every rank (all must call); atomic (renamed into place by rank 0).

    model: this rank's parallelized model (or pipeline `module`); state: JSON-able trainer state;
    tokenizer_dir: files copied beside the weights (so the directory is a servable model once exported)."""
    final = Path(path)
    tmp = final.parent / f".{final.name}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp")
    if _rank() == 0:
        (tmp / "config.json").write_text(json.dumps(args.to_config(), indent=2) + "\n")
        (tmp / "trainer_state").mkdir()
        (tmp / "trainer_state" / "state.json").write_text(json.dumps({**state, "version": STATE_VERSION}, indent=1))
        for f in Path(tokenizer_dir).iterdir() if tokenizer_dir is not None else ():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def save_run_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer, args: ModelArgs,
                        state: dict, tokenizer_dir: str | os.PathLike | None = None, keep_last: int = 0) -> Path:
    """`nanoseek train`'s checkpoint under torchrun: root/step-XXXXXX (sharded), tokenizer files beside
    it, `root/latest` pointed at it, older ones pruned to `keep_last` (0 keeps all), as
    nanoseek.train.state.save_checkpoint does for one process. All ranks call."""
    root = Path(root)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    final = save_sharded(root / checkpoint_name(step), model, optimizer, args, state, tokenizer_dir)
    if _rank() == 0:
        _write_atomic(root / "latest", final.name + "\n")
        if keep_last > 0:
            steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir())
            for old in steps[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def is_sharded(path: str | os.PathLike) -> bool:
    return (Path(path) / "dcp" / ".metadata").is_file()


def _reader(path: Path) -> _SafeReader:
    """A reader whose metadata has been checked here, so a bad file is a ValueError on every rank
    (inside dcp.load it would surface as a CheckpointException from the coordinator)."""
    if not is_sharded(path):
        raise ValueError(f"{path} is not a sharded checkpoint (no dcp/.metadata)")
    reader = _SafeReader(path / "dcp")
    reader.read_metadata()
    return reader


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer=None) -> dict:
    """Load weights (and optimizer moments) into this rank's parallelized model, whatever layout wrote
    them; returns the JSON trainer state. All ranks must call."""
    path = Path(path)
    reader = _reader(path)
    no_dist = not dist.is_initialized()
    with warnings.catch_warnings():  # one process loading is intended: DCP need not say so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load(reader, model, optimizer, no_dist)
    state_file = path / "trainer_state" / "state.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def _load(reader, model, optimizer, no_dist: bool) -> None:
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        sd = {"model": get_model_state_dict(model)}
        dcp.load(sd, storage_reader=reader, no_dist=no_dist)
        set_model_state_dict(model, sd["model"])
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, storage_reader=reader, no_dist=no_dist)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def full_optimizer_state(path: str | os.PathLike, model: torch.nn.Module, optimizer) -> dict:
    """A one-process (HF-layout) checkpoint's optimizer moments as full tensors by parameter name, for a
    run resumed under torchrun: `model` is the plain model before `parallelize` and `optimizer` one
    built over it like the run's; `set_optimizer_state_dict(..., full_state_dict=True)` then shards
    the result into the parallel optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from nanoseek.train.state import load_trainer_state

    load_trainer_state(path, model, optimizer)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_run_state(path: str | os.PathLike, model: torch.nn.Module, optimizer, moments_loaded: bool = False) -> dict:
    """Resume a training run from checkpoint `path` into this rank's model and optimizer; returns the
    trainer state. Sharded: any layout (all ranks call). One-process (HF layout): weights and moments
    read by `load_trainer_state`, or, under torchrun, the weights came with the model and the moments
    through `full_optimizer_state` (moments_loaded=True): then only the state is read."""
    from nanoseek.train.state import load_trainer_state, read_trainer_state

    if is_sharded(path):
        return load_sharded(path, model, optimizer)
    return read_trainer_state(path) if moments_loaded else load_trainer_state(path, model, optimizer)


def export_hf(path: str | os.PathLike, out: str | os.PathLike) -> Transformer:
    """A sharded checkpoint -> an HF-layout directory (config + safetensors), in this one process.

    Reads every shard (no process group needed: call it on rank 0 only); returns the loaded model."""
    path = Path(path)
    reader = _reader(path)
    args = ModelArgs.from_json(path / "config.json")
    model = Transformer(args)
    sd = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, storage_reader=reader, no_dist=True)
    model.load_state_dict(sd["model"])
    model.save_pretrained(out)
    return model


