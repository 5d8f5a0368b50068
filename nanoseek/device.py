"""One meaning for every stage's --device flag: auto | cpu | cuda | cuda:N | mps.

    from nanoseek.device import resolve_device, DeviceError
    try:
        device = resolve_device(a.device)   # torch.device
    except DeviceError as e:                # one line that starts with the value: "cuda: no CUDA GPU..."
        parser.error(f"--device {e}")

"auto" picks CUDA when a GPU is visible, then Apple's MPS, then the CPU. An explicit device that
this machine does not have is an error, never a silent fall-back to the CPU: a run that was meant
for a GPU and quietly trains on the CPU wastes hours before anyone notices.
"""

from __future__ import annotations

import re

import torch

CHOICES = "auto | cpu | cuda | cuda:N | mps"


class DeviceError(ValueError):
    """A --device value that is not a device name, or names a device this machine does not have."""


def resolve_device(flag: str | torch.device | None = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device; DeviceError (one line) otherwise."""
    if isinstance(flag, torch.device):
        flag = str(flag)
    name = "auto" if flag is None else str(flag).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m:
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise DeviceError(f"{flag}: {why}; use cpu (or auto)")
        if m.group(1) is not None:
            index, count = int(m.group(1)), torch.cuda.device_count()
            if index >= count:
                raise DeviceError(f"{flag}: this machine has {count} CUDA device(s) "
                                  f"(cuda:0..cuda:{count - 1})")
            return torch.device("cuda", index)
        return torch.device("cuda")
    if name == "mps":
        if not _mps_available():
            raise DeviceError(f"{flag}: Apple MPS is not available here; use cpu (or auto)")
        return torch.device("mps")
    raise DeviceError(f"{flag!r} is not a device; expected one of {CHOICES}")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
