"""Ahead-of-time compiled decode steps (AOTInductor packages), so that a warm start loads in ~0.1 s.

torch.compile's disk cache (compiled.py) spares a second process inductor and the C++ compiler,
but Dynamo still traces the Python code again: ~3.5 s for the tiny preset's graphs on an idle
2-core machine, more than a whole short generation takes. So the batch-1 hot path (a one-shot
`generate`, one chat) is also exported with torch.export and compiled by AOTInductor into a package
on disk, <cache dir>/aoti/<name>-<key>.pt2 (key: model config, dtype, device, torch version), which
a later process loads without tracing or compiling anything (tiny preset: ~65 ms to load, ~3 ms to
bind the weights; loading needs no C++ compiler).

* Weights are not in the package: the loaded graph reads the model's own parameters
  (`load_constants(..., user_managed=True)`), so one package serves every checkpoint of a shape and
  sees in-place weight updates.
* The cache length is a dynamic dimension, so one package serves every max_seq_len.
* Batch 1 only: export specialises the batch dimension (an op guards size != 1); larger batches
  keep torch.compile's dynamic-batch graph.
* Never fail: a package that cannot be built (export or compile error) or loaded (corrupt file,
  different weights' names) costs one logged line, and the caller uses torch.compile instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("nanoseek")


class Flat(nn.Module):
    """`fn(*tensors)` as a module over flat tensor arguments, for torch.export; `model` is
    registered so that its parameters become the graph's (named) constants."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *tensors):
        return self.fn(*tensors)


class Package:
    """One AOTInductor package of `module` (a `Flat`) at `path`. `dynamic`: per flat argument, the
    dims that vary ({dim: name}); dims sharing a name vary together; `minimum` {name: size}: the
    smallest size a dim may take (default 2), for code that branches on a size (the MoE gathers
    experts for a few tokens and runs its grouped GEMM past them: export needs the branch fixed).

    `load()` -> a callable over the flat tensors, or None (one logged line) if the file is missing
    or cannot be used; `build(example)` exports and compiles it (written atomically), then loads it.
    """

    def __init__(self, module: Flat, path: Path, dynamic: list[dict[int, str]], what: str,
                 minimum: dict[str, int] | None = None, instead: str = "using torch.compile"):
        self.module, self.path, self.dynamic, self.what = module, Path(path), dynamic, what
        self.minimum = minimum or {}
        self.instead = instead  # what the caller does without the package, for the one logged line

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def _constants(self) -> dict[str, torch.Tensor]:
        return {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}

    def load(self):
        """The loaded package as a callable, or None (with one logged line when the file is bad)."""
        if not self.exists:
            return None
        try:
            # The C++ loader itself, not torch._inductor.aoti_load_package: importing inductor takes
            # longer than loading, and its wrapper re-parses the call's pytree spec at every call.
            loader = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, -1)
            own = self._constants()
            names = loader.get_constant_fqns()
            missing = [n for n in names if n not in own]
            if missing:
                raise ValueError(f"the package wants weights this model lacks ({missing[0]}, ...)")
            # (constants, use_inactive, check_full_update, user_managed): the model's own tensors
            loader.load_constants({n: own[n] for n in names}, False, True, True)
        except Exception as e:  # a corrupt or mismatched file: rebuilt, or torch.compile instead
            log.warning("nanoseek: cannot use the compiled %s package %s (%s: %s)", self.what, self.path,
                        type(e).__name__, str(e).strip().splitlines()[0][:200] if str(e).strip() else "")
            return None
        return lambda *tensors: tuple(loader.run(list(tensors)))

    def build(self, example: tuple[torch.Tensor, ...]):
        """Export `module` at `example` (tensors like the real call's), compile it to the package
        file and load it. None (one logged line) if that fails."""
        from torch.export import Dim

        t0 = time.perf_counter()
        dims: dict[str, Dim] = {}
        shapes = tuple({d: dims.setdefault(name, Dim(name, min=self.minimum.get(name, 2), max=1 << 24)) for d, name in spec.items()} or None
                       for spec in self.dynamic)
        tmp = None
        try:
            with torch.inference_mode(False), torch.no_grad():
                args = tuple(t.clone() for t in example)
                program = torch.export.export(self.module, args, dynamic_shapes={"tensors": shapes}, strict=False)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".pt2")
            os.close(fd)
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp, inductor_configs={"aot_inductor.package_constants_in_so": False})
            os.replace(tmp, self.path)
            tmp = None
        except Exception as e:
            log.warning("nanoseek: could not compile the %s ahead of time (%s: %s); %s", self.what,
                        type(e).__name__, str(e).strip().splitlines()[0][:200] if str(e).strip() else "", self.instead)
            return None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
        log.info("nanoseek: compiled the %s ahead of time in %.1f s (%s)", self.what, time.perf_counter() - t0,
                 self.path)
        return self.load()
