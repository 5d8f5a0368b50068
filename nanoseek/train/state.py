"""Training checkpoints: an HF model directory plus everything needed to resume exactly.

    OUT/checkpoints/
        step-000120/                 loadable by Transformer.from_pretrained and transformers
            config.json  model.safetensors  tokenizer.json  tokenizer_config.json ...
            trainer_state/
                tensors.safetensors  AdamW moments and step per parameter (by name), torch RNG
                state.json           step, tokens, schedule horizon, data-loader position,
                                     python/numpy RNG, non-finite counters, optimizer hyper-params
        step-000240/ ...
        latest                       the name of the newest complete checkpoint

The model weights (balancing biases `e_score_correction_bias` included) are only stored once, in
the HF files. Nothing is pickled: tensors go through safetensors, the rest through JSON (Python
floats round-trip exactly through `json`). A checkpoint is assembled in a temporary directory and
renamed into place, then `latest` is replaced atomically, and only then are old ones deleted:
a crash at any point leaves the previous checkpoint complete and pointed to.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nanoseek.model import Transformer

STATE_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `root/latest` points to, or None when there is none yet. A pointer to a missing
    or incomplete checkpoint is an error that names the newest intact one."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "trainer_state" / "state.json").is_file():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint; "
                         f"{_intact_hint(Path(root), path)}")
    return path


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The JSON trainer state of checkpoint `path` (ValueError naming the damage and an intact older one)."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state" / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path} is damaged ({path / 'trainer_state' / 'state.json'}: {e}); "
                         f"{_intact_hint(path.parent, path)}") from None
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: trainer state version {state.get('version')}, this code reads {STATE_VERSION}")
    return state


def _intact_hint(root: Path, damaged: Path) -> str:
    """Which older checkpoint can be resumed instead, and how."""
    for older in sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir() and p != damaged),
                        reverse=True):
        try:
            json.loads((older / "trainer_state" / "state.json").read_text()).items()
            load_file(str(older / "trainer_state" / "tensors.safetensors"))
        except Exception:  # noqa: BLE001 - any failure means "not intact"
            continue
        return (f"the newest intact checkpoint is {older}: resume from it with "
                f"`echo {older.name} > {root / 'latest'}` and --resume")
    return "no intact checkpoint is left in " + str(root)


def save_checkpoint(root: str | os.PathLike, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    state: dict, tokenizer_dir: str | os.PathLike | None = None, keep_last: int = 0,
                    extra_models: dict[str, Transformer] | None = None) -> Path:
    """Write `root/step-XXXXXX` atomically, point `root/latest` at it, keep the newest `keep_last`
    (0 keeps all). `state` is the JSON-able trainer state (step, tokens, loader, counters...).
    extra_models: more models of the run saved in HF layout in subdirectories, e.g. GRPO's
    {"reference": ref_model} -> step-XXXXXX/reference/ (in the same atomic write)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        model.save_pretrained(tmp)
        if tokenizer_dir is not None:  # a model directory may be passed: its weights must not overwrite ours
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file() and not (tmp / f.name).exists() and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
        _save_trainer_state(tmp / "trainer_state", model, optimizer, state)
        for name, extra in (extra_models or {}).items():
            extra.save_pretrained(tmp / name)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / "latest", final.name + "\n")
    if keep_last > 0:
        steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir())
        for old in steps[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str | os.PathLike, model: Transformer, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer and all RNGs from `path/trainer_state`; return the JSON trainer state.

    The model's weights come from the same directory via `Transformer.from_pretrained(path)`.
    """
    sdir = Path(path) / "trainer_state"
    state = read_trainer_state(path)
    try:
        tensors = load_file(str(sdir / "tensors.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"checkpoint {path} is damaged ({sdir / 'tensors.safetensors'}: {e}); "
                         f"{_intact_hint(Path(path).parent, Path(path))}") from None
    names = _param_names(model, optimizer)
    saved_groups = state["optimizer"]["param_groups"]
    if [g["params"] for g in saved_groups] != [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]:
        raise ValueError(f"{sdir}: the optimizer's parameter groups differ from this model's "
                         "(different config or weight-decay split?)")
    opt_state, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            keys = [k.rsplit("/", 1)[1] for k in tensors if k.startswith(f"optim/{name}/")]
            if keys:
                opt_state[index] = {k: tensors[f"optim/{name}/{k}"].to(p.device) for k in keys}
            index += 1
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + len(g["params"])))}
              for g, start in zip(saved_groups, _starts(saved_groups))]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})

    rng = state["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng/cuda/"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state


def _save_trainer_state(sdir: Path, model: Transformer, optimizer: torch.optim.Optimizer, state: dict) -> None:
    sdir.mkdir(parents=True)
    names = _param_names(model, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim/{names[id(p)]}/{key}"] = t.detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    save_file(tensors, str(sdir / "tensors.safetensors"))
    py = random.getstate()
    np_state = np.random.get_state()
    full = {
        **state,
        "version": STATE_VERSION,
        "optimizer": {"param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                        "params": [names[id(p)] for p in g["params"]]}
                                       for g in optimizer.param_groups]},
        "rng": {"python": [py[0], list(py[1]), py[2]],
                "numpy": [np_state[0], np_state[1].tolist(), *[v.item() if hasattr(v, "item") else v
                                                             for v in np_state[2:]]]},
    }
    _write_atomic(sdir / "state.json", json.dumps(full, indent=1))


def _param_names(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a tensor that is not a parameter of the model")
    return names


def _starts(groups: list[dict]) -> list[int]:
    starts, n = [], 0
    for g in groups:
        starts.append(n)
        n += len(g["params"])
    return starts


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
