"""The run machinery every training stage shares (`train`, and the stages built on it): what makes
a run directory safe to use.

    a = resume_args(a, saved_args, explicit_flags(parser, argv), free=FREE)  # a resumed run's settings
    with claim_run_dir(out, "train"), Interrupts() as stop:        # one writer; Ctrl-C sets a flag
        loop = StepLoop("train", a, stop, checkpoint, ckpt_root, bar, step, resumed)
        with loop.running(rewind):                                 # a 2nd Ctrl-C: rewind() to the last step
            while ... and not stop.requested:
                forward + backward                                 # a 2nd Ctrl-C abandons it
                with stop.critical(): optimizer.step(); step += 1  # never half-applied
                if loop.after_step(step, bad, done): break         # streak, eval, save, --stop-at, minutes
        code = loop.finish(step)                                   # save the last step; 130 / 143 / 0 or None

* **One writer per run directory.** `claim_run_dir` takes an exclusive `flock` on `OUT/.lock`, which
  the OS drops when the process ends, however it ends: a second process on the same directory
  refuses with the first one's pid and command; a lock file left by a crashed run is noticed, said,
  and taken over.
* **Interrupts save.** SIGINT / SIGTERM set a flag that the loop reads between steps: the step in
  flight finishes, the stage writes a checkpoint of it and exits 130 / 143 with the command that
  continues the run. A second signal abandons the step in flight (its gradients are dropped and the
  data position rewound) but never an optimizer update or a checkpoint write (`Interrupts.critical`).
* **One end of step.** `StepLoop` is what every stage does between optimizer steps and after its
  loop, so the stages behave alike: --max-nonfinite bad steps in a row stop the run (RunError, the
  last good checkpoint named), evaluation and checkpoint cadences, --stop-at, --max-minutes, and the
  epilogue that saves the last completed step and prints the command that continues the run.
* **Resume keeps the run's settings.** Every setting comes from the saved run unless the command
  line gives it; a flag given explicitly that would change the numbers is an error naming it, and
  only the `free` flags (device, cadences, retention, time limits) may differ.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

from nanoseek.train.balance import update_bias
from nanoseek.train.state import latest_checkpoint


class RunError(ValueError):
    """A run directory or a resume request that cannot be honoured (one line for the user)."""


class Interrupted(Exception):
    """Raised by a stage after it saved an interrupted run; carries the exit code (130 / 143)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# --- one writer per run directory --------------------------------------------------------------------
@contextlib.contextmanager
def claim_run_dir(out: str | os.PathLike, stage: str):
    """Hold an exclusive lock on `out/.lock` for the life of the block (and so of the process).

    Raises RunError when another live process holds it. The file records who holds it (pid, host,
    command, start time) so the refusal can say so; it stays behind after exit, harmlessly: only the
    kernel's lock counts, and the kernel drops it when its holder dies."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a run directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot use --out {out}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{out} is in use by another run ({_holder(fd)}): one writer per run directory; "
                           f"wait for it to finish, stop it, or use another --out") from None
        previous = _holder(fd, raw=True)
        if previous.get("pid") and not previous.get("released"):
            print(f"note: {out}/.lock was left by an earlier run that did not exit cleanly (pid "
                  f"{previous['pid']}, {previous.get('command', '?')}); taking it over", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
              "command": " ".join(shlex.quote(x) for x in sys.argv)[:300],
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_lock(fd, me)
        try:
            yield out
        finally:
            _write_lock(fd, {**me, "released": True})
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(fd: int, raw: bool = False):
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        info = {}
    if raw:
        return info if isinstance(info, dict) else {}
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}: "
            f"{info.get('command', '?')}")


def _write_lock(fd: int, info: dict) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


# --- interrupts ---------------------------------------------------------------------------------------
class Interrupts:
    """SIGINT / SIGTERM handling for a training loop (a context manager that restores the old handlers).

    The first signal only sets `requested` ("SIGINT" / "SIGTERM"): the loop finishes its step, saves
    and exits with `exit_code`. A second signal raises KeyboardInterrupt at once, to abandon whatever
    is in flight (a step's forward/backward, an evaluation), except inside `critical()` (the
    optimizer update and the bookkeeping that commits a step, a checkpoint write): there it is held
    and raised when the block ends, so a step is either wholly applied or not at all."""

    def __init__(self):
        self.requested: str | None = None
        self._count = 0
        self._critical = 0
        self._held = False
        self._old = {}

    def __enter__(self) -> "Interrupts":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def exit_code(self) -> int:
        return 128 + (signal.SIGTERM if self.requested == "SIGTERM" else signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        self._count += 1
        self.requested = self.requested or signal.Signals(signum).name
        if self._count == 1:
            print(f"\n{self.requested}: finishing the current step, then saving a checkpoint "
                  f"(send it again to abandon the step)", file=sys.stderr, flush=True)
        elif self._critical:
            self._held = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """Work that must complete once started; a second signal inside waits for its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._held:
            self._held = False
            raise KeyboardInterrupt


# --- resuming: whose settings count ------------------------------------------------------------------
def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The `dest` names of the options the user actually typed (defaults do not count)."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:  # store_true / store_false / store_const
                kwargs.update(action="store_const", const=action.const)
            else:
                kwargs.update(nargs=action.nargs)
            quiet.add_argument(*action.option_strings, **kwargs)
    known, _ = quiet.parse_known_args(argv)
    return set(vars(known))


def resume_args(a: argparse.Namespace, saved: dict, explicit: set[str], free: set[str],
                per_launch: dict | None = None, paths: tuple[str, ...] = ()) -> argparse.Namespace:
    """The settings of a resumed run: the saved run's, except the `free` flags the user typed now.

    A typed flag outside `free` whose value differs from the saved one would change the numbers:
    RunError naming every such flag (values compared as the saved JSON holds them).
    per_launch: {flag: default} for settings of one invocation, not of the run (--stop-at, the
    parallel layout): the default unless typed now. paths: flags made Path again (JSON holds str)."""
    def norm(v):
        return str(v) if isinstance(v, Path) else v

    clash = [k for k in sorted(explicit - free) if k in saved and json.loads(json.dumps(norm(getattr(a, k))))
             != saved[k]]
    if clash:
        got = ", ".join(f"--{k.replace('_', '-')} {norm(getattr(a, k))} (saved: {saved[k]})" for k in clash)
        raise RunError(f"cannot resume with {got}: the run was made with the saved value(s) and changing them "
                       f"would change its numbers; drop the flag(s) to resume, or start a new run in another --out")
    merged = {**vars(a), **saved, **{k: getattr(a, k) for k in explicit & free}}
    merged.update({k: v for k, v in (per_launch or {}).items() if k not in explicit})
    merged.update({k: None if merged[k] is None else Path(merged[k]) for k in paths})
    return argparse.Namespace(**merged)


# --- one optimizer update --------------------------------------------------------------------------
def apply_update(optimizer, lr: float, finite: bool, model=None, counts=None, gamma: float = 0.0) -> None:
    """The update of a step whose gradients are accumulated: when `finite` (loss and gradient norm),
    set the learning rate, step the optimizer and move the MoE balancing bias by γ from the step's
    expert `counts` [L, E]; a non-finite step changes nothing (no update, no bias move). Gradients
    are cleared either way. Call it inside `Interrupts.critical()`, with the step's bookkeeping."""
    if finite:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if gamma > 0 and counts is not None and len(counts):
            update_bias(model, counts, gamma)
    optimizer.zero_grad(set_to_none=True)


# --- the end of every step, and of the loop --------------------------------------------------------------
class StepLoop:
    """Between optimizer steps and after the loop, the same for every training stage.

    `a` supplies the flags (`out`, `max_nonfinite`, and when the stage has them `eval_every`,
    `save_every`, `stop_at`, `max_minutes`); `checkpoint()` saves the current step (the stage's
    closure); `bar` is the progress bar; `step` the step the loop starts at, `resumed` whether that
    step is already saved. Under torchrun, `together(flag) -> bool` makes every decision the same on
    all ranks (true when any rank's flag is), so no rank leaves the loop alone; `t_start` is when
    --max-minutes started counting.

    After the loop, `interrupted` is "--stop-at" or the signal's name (None: the loop ran out or hit
    --max-minutes) and `stop_reason` says how the run ended."""

    def __init__(self, stage: str, a: argparse.Namespace, stop: Interrupts, checkpoint, ckpt_root: Path, bar,
                 step: int, resumed: bool, together=None, t_start: float | None = None):
        self.stage, self.a, self.stop, self.checkpoint = stage, a, stop, checkpoint
        self.ckpt_root, self.bar = ckpt_root, bar
        self.together = together or (lambda flag: flag)
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.last_saved = step if resumed else None  # a resumed run's first step is on disk already
        self.bad_streak = 0
        self.interrupted: str | None = None
        self.stop_reason = "done"

    @contextlib.contextmanager
    def running(self, rewind=None):
        """Wrap the loop: a second signal (KeyboardInterrupt) abandons the step in flight; `rewind()`
        drops its gradients and puts the data position back to the last completed step."""
        try:
            yield self
        except KeyboardInterrupt:
            if rewind is not None:
                rewind()

    def after_step(self, step: int, bad: bool, done: bool, evaluate=None, lr: float | None = None) -> bool:
        """The bookkeeping after step `step` (just committed; `bad`: it was skipped as non-finite; `done`:
        the budget is spent). Returns True when the loop must end here. In order: --max-nonfinite bad
        steps in a row raise RunError (nothing saved: the last good checkpoint stays the newest); a
        signal ends the loop; `evaluate()` every --eval-every steps and a checkpoint every
        --save-every; --stop-at; --max-minutes (a normal end: final evaluation and report follow)."""
        a = self.a
        self.bad_streak = self.bad_streak + 1 if bad else 0
        if self.bad_streak >= a.max_nonfinite:
            self.bar.close()
            raise RunError(f"{self.bad_streak} non-finite steps in a row at step {step}"
                           f"{f' (lr {lr:.2e})' if lr is not None else ''}; stopping. The last good checkpoint "
                           f"is {latest_checkpoint(self.ckpt_root)}")
        if self.together(self.stop.requested is not None):
            self.stop.requested = self.stop.requested or "SIGTERM"  # another rank got the signal
            return True
        if evaluate is not None and getattr(a, "eval_every", 0) and step % a.eval_every == 0 and not done:
            evaluate()
        if getattr(a, "save_every", 0) and step % a.save_every == 0:
            self.last_saved = step
            self.checkpoint()
        if getattr(a, "stop_at", None) is not None and step >= a.stop_at and not done:
            self.interrupted = "--stop-at"
            return True
        minutes = getattr(a, "max_minutes", None)
        if minutes is not None and self.together(time.perf_counter() - self.t_start > minutes * 60):
            self.stop_reason = f"stopped at step {step}: --max-minutes {minutes} reached"
            return True
        return False

    def finish(self, step: int) -> int | None:
        """After the loop: save the last completed step unless it is saved; for a run stopped early
        (a signal, --stop-at) print the command that continues it and return the exit code (130 / 143;
        0 for --stop-at); None when the run is complete."""
        self.bar.close()
        self.interrupted = self.stop.requested or self.interrupted
        if self.last_saved != step:
            self.checkpoint()
        if not self.interrupted:
            return None
        signal_ = self.interrupted != "--stop-at"
        print(f"{'interrupted (' + self.interrupted + ')' if signal_ else 'stopped (--stop-at)'} at step {step}: "
              f"checkpoint {latest_checkpoint(self.ckpt_root)}; continue with: nanoseek {self.stage} --out "
              f"{self.a.out} --resume", file=sys.stderr if signal_ else sys.stdout)
        return self.stop.exit_code if signal_ else 0
