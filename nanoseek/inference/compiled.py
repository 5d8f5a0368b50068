"""torch.compile for the engine's hot path, applied from outside the model: when it can work, where
its artefacts live, what it cost last time, and eager fallback when it fails.

    step = compile_fn(fn, "decode step", device)   # None (with one logged line) where it cannot work
    try: out = step(*args)
    except Exception as e:                           # a compile error: one line, then eager for good
        if not is_compile_error(e): raise
        fall_back(e, "decode step"); out = fn(*args)

Design choices:
* **Artefacts on disk, shared by processes.** Inductor caches compiled graphs (FX graph and
  AOTAutograd caches) under TORCHINDUCTOR_CACHE_DIR; unless that is set we point it at
  ~/.cache/nanoseek/inductor ($XDG_CACHE_HOME respected), not inductor's /tmp default that a
  reboot wipes. A second process still traces the Python code with Dynamo (~1-5 s per graph on the
  2-core dev machine) but compiles nothing: inductor and its C++ compiler are skipped.
* **Batch 1 ahead of time.** The calls a batch-1 decode makes are AOTInductor packages instead
  (aot.py): loaded without any tracing, so a warm start costs ~0.1 s rather than seconds.
* **Costs remembered.** `CompileRecord` keeps, per model shape / dtype / device / torch version,
  the seconds the last warm-up took (`compile_s`) in <cache dir>/nanoseek-compile.json. The
  engine's automatic mode uses it as the price of compiling: a known shape (warm cache) is cheap.
* **Never fail.** No C++ compiler on CPU, no Triton on a GPU, a backend torch.compile does not
  support, or an error while compiling: one line on the `nanoseek` logger (printed to stderr when
  logging is not configured) and the eager path runs instead.
* `specialize_float=True`: with dynamic shapes Dynamo would make the model's float constants
  symbolic and then restart its analysis to specialise one again, tracing every graph twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger("nanoseek")

# torch 2.13 warns about its own pytree code whenever inductor reloads a cached graph (the TreeSpec
# it pickled): a deprecation inside torch that the user can do nothing about, printed per load.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

# The engine never swaps the model's modules (weights change only in place), so Dynamo need not
# re-check every module attribute on each call: that halves the per-call guard cost, a visible
# share of a ~1 ms step. cpp_wrapper: the compiled graph's driver is C++ rather than generated
# Python, which measured ~25% off a tiny-preset decode step (1.29 -> 1.01 ms at prompt 4096).
OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True}


def cache_dir() -> Path:
    """Where inductor keeps compiled artefacts: TORCHINDUCTOR_CACHE_DIR, set to
    ~/.cache/nanoseek/inductor when unset (before the first compile, so inductor uses it).
    Importing torch._dynamo (model code can do that early) sets the variable to inductor's own
    /tmp default as a side effect: that value counts as unset (inductor reads the variable again
    at each use, so ours wins)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "nanoseek" / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot work for `device` here (None: it can)."""
    if device.type == "cpu":
        from torch._inductor import config

        names = [c for c in config.cpp.cxx if c]
        if not any(shutil.which(c) for c in names):
            return f"no C++ compiler found ({', '.join(names)}; set CXX)"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    return f"torch.compile does not support the {device.type} backend here"


def compile_fn(fn, what: str, device: torch.device):
    """torch.compile(fn) with the engine's options, or None (and one logged line) when compiling
    cannot work for `device`."""
    reason = unavailable(device)
    if reason:
        log.warning("nanoseek: running the %s eagerly: %s", what, reason)
        return None
    cache_dir()
    compiled = torch.compile(fn, dynamic=True, options=OPTIONS)
    return torch._dynamo.config.patch(specialize_float=True)(compiled)


def compile_mode(compile: bool | None) -> str:
    """The `compile=` flag of the engine and `nanoseek grpo` as a mode: True "on", False "off", None
    "auto" unless NANOSEEK_COMPILE=1 / 0 forces "on" / "off"."""
    if compile is None and os.environ.get("NANOSEEK_COMPILE") in ("0", "1"):
        compile = os.environ["NANOSEEK_COMPILE"] == "1"
    return {True: "on", False: "off", None: "auto"}[compile]


def is_compile_error(e: Exception) -> bool:
    """Did this exception come from compiling (Dynamo, inductor, the C++ compiler) rather than from
    running the model? Only those fall back to eager. A Ctrl-C that inductor wrapped while compiling
    is the user's, not a compile failure: it is raised again as KeyboardInterrupt."""
    from torch._dynamo import exc

    cause = e
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from e
        cause = cause.__cause__ or cause.__context__

    errors = (exc.BackendCompilerFailed, exc.Unsupported, exc.InternalTorchDynamoError)
    return isinstance(e, errors) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


def fall_back(e: Exception, what: str) -> None:
    """Log the one line that says compiling failed and the engine runs eagerly from now on."""
    text = str(e).strip()
    first = text.splitlines()[0][:200] if text else ""
    log.warning("nanoseek: compiling the %s failed (%s: %s); running it eagerly", what, type(e).__name__, first)


class CompileRecord:
    """Per model shape, what compiling cost last time: {key: {"compile_s": seconds}} in
    <cache dir>/nanoseek-compile.json, written atomically. `known` means the artefacts of that
    shape were compiled into this cache dir before (a warm cache)."""

    def __init__(self, model, tag: str = ""):
        args = model.args
        weight = model.embed_tokens.weight
        fields = json.dumps(args.to_config(), sort_keys=True, default=str)
        ident = f"{torch.__version__}|{weight.dtype}|{weight.device.type}|{tag}|{fields}"
        self.key = hashlib.sha256(ident.encode()).hexdigest()[:16]
        self.path = cache_dir() / "nanoseek-compile.json"

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def compile_s(self) -> float | None:
        entry = self._read().get(self.key)
        return float(entry["compile_s"]) if isinstance(entry, dict) and "compile_s" in entry else None

    def save(self, compile_s: float) -> None:
        data = self._read()
        data[self.key] = {"compile_s": round(compile_s, 3)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".nanoseek-compile.")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache dir costs only the record
            log.warning("nanoseek: could not record compile time in %s: %s", self.path, e)


# What compiling costs when this shape has never been compiled here (no record): the tiny preset's
# decode graphs for batch 1 and batch > 1 took 25-45 s on the 2-core dev machine.
COLD_COMPILE_S = 30.0


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompiledSteps:
    """The engine's hot path (decode/verify forward, MTP draft step), compiled or eager.

    mode: "on" (compile now), "off" (eager only) or "auto": run eagerly and compile once the eager
    decode time spent reaches the price of compiling (the recorded warm-up time of this shape, or
    COLD_COMPILE_S) — the ski-rental rule, which never costs more than twice the better of the two
    choices made in hindsight, and compiles almost at once when the disk cache is warm.
    `call(name, *args)` runs the compiled function (or the eager one), falling back to eager for
    good, with one logged line, if compiling raises.

    packages: {name: (aot.Package, flat)} where flat(*args) gives the call's flat tensors when an
    AOTInductor package serves it (batch 1), else None. Compiled calls it serves load the package
    (building it the first time); when every package is on disk already (a warm start: loading
    costs ~0.1 s, less than a few eager steps) the automatic mode compiles from the first step.
    package_only: names that run compiled only as a package (the prefill: torch.compile would trace
    a graph per prompt length), eagerly otherwise; not needed for a warm start, and built only
    once compiling is fully on (never by the warm start's partial mode, which only loads them).
    """

    def __init__(self, eager: dict, model, mode: str, device: torch.device, packages: dict | None = None,
                 package_only: tuple[str, ...] = ()):
        assert mode in ("on", "off", "auto"), mode
        self.eager, self.mode, self.device = eager, mode, device
        self.compiled: dict | None = None
        self.record = CompileRecord(model) if mode != "off" else None
        self.packages = packages or {}
        self.package_only = set(package_only)
        self.loaded: dict = {}  # name -> the loaded package, or None where it could not be had
        self.eager_s = 0.0  # eager decode seconds so far (auto mode's rent)
        self.compile_s = 0.0  # seconds spent in calls that compiled a graph (or built / loaded a package)
        self.just_compiled = False  # a call compiled a graph since the engine reset this (no timing sample)
        # A warm start compiles at once, but only the calls a package serves (batch 1) until
        # compiling the rest pays: torch.compile still traces for seconds, even from a warm cache.
        # (compiled = {}: no torch.compile wrappers yet, which would import Dynamo and inductor.)
        self.partial = False
        if mode == "on":
            self.enable()
        elif mode == "auto" and self.warm:
            self.compiled, self.partial = {}, True

    @property
    def warm(self) -> bool:
        """Every AOTInductor package is on disk (there is at least one)."""
        needed = [package for name, (package, _) in self.packages.items() if name not in self.package_only]
        return bool(needed) and all(package.exists for package in needed)

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def covers(self, rows: int) -> bool:
        """Does a decode step over `rows` requests run compiled (where its graph fits)?"""
        return self.compiled is not None and (rows == 1 or not self.partial)

    @property
    def price(self) -> float:
        known = self.record.compile_s if self.record else None
        return COLD_COMPILE_S if known is None else known

    def after_eager_step(self, seconds: float) -> bool:
        """Count an eager decode step; in auto mode compile once the rent reaches the price.
        Returns True when compiling was switched on now."""
        self.eager_s += seconds
        if self.mode == "auto" and (self.compiled is None or self.partial) and self.eager_s >= self.price:
            return self.enable()
        return False

    def enable(self) -> bool:
        """Compile from now on (lazily, at each new shape). False (and one logged line) if it cannot work."""
        self.partial = False
        if not self.compiled and self.mode != "off":
            fns = {name: compile_fn(fn, name, self.device) for name, fn in self.eager.items()
                   if name not in self.package_only}
            if any(f is None for f in fns.values()):
                self.compiled, self.mode = None, "off"
                return False
            self.compiled = fns
        return self.compiled is not None

    def call(self, name: str, use_compiled: bool, *args, **kwargs):
        """eager[name] or compiled[name](*args, **kwargs); a compile error falls back to eager for good."""
        if not use_compiled or self.compiled is None:
            return self.eager[name](*args, **kwargs)
        if name in self.packages:
            flat = self.packages[name][1](*args, **kwargs)
            if flat is not None and self.partial and name in self.package_only and not self.packages[name][0].exists:
                flat = None  # a warm start loads, but builds nothing until compiling pays
            run = None if flat is None else self._package(name, flat)
            if run is not None:
                try:
                    return run(*flat)
                except Exception as e:  # e.g. a package built for other shapes: torch.compile from now on
                    text = str(e).strip()
                    log.warning("nanoseek: the compiled %s package failed (%s: %s); %s", name, type(e).__name__,
                                text.splitlines()[0][:200] if text else "",
                                "running it eagerly" if name in self.package_only else "using torch.compile for it")
                    self.loaded[name] = None
        if self.partial or name in self.package_only:  # a warm start: what no package serves stays eager
            return self.eager[name](*args, **kwargs)      # until compiling pays; package-only steps always
        graphs, t0 = compiled_graphs(), time.perf_counter()
        try:
            out = self.compiled[name](*args, **kwargs)
        except Exception as e:
            if not is_compile_error(e):
                raise
            fall_back(e, name)
            self.compiled, self.mode = None, "off"
            return self.eager[name](*args, **kwargs)
        if compiled_graphs() != graphs:  # this call compiled a graph: its time is the price of compiling
            self.just_compiled = True
            self.compile_s += time.perf_counter() - t0
            self.record.save(self.compile_s)
        return out

    def _package(self, name: str, flat: tuple):
        """The loaded AOTInductor package for `name`: loaded from disk, or built from `flat` the first
        time; None (torch.compile then) where neither works. Its seconds count as compiling."""
        if name not in self.loaded:
            package, _ = self.packages[name]
            t0 = time.perf_counter()
            run = package.load()
            built = run is None
            if built:
                run = package.build(flat)
            self.loaded[name] = run
            self.just_compiled = True
            self.compile_s += time.perf_counter() - t0
            if built:  # the price of compiling; loading is not (a warm start compiles at once anyway)
                self.record.save(self.compile_s)
        return self.loaded[name]
