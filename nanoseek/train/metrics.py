"""Throughput accounting and the per-step JSONL log.

MFU = achieved model FLOP/s / peak FLOP/s. Model FLOPs per token follow the PaLM convention
(appendix B), adapted to MLA and MoE:

    6 · (active matmul parameters)  +  6 · L · H · (qk_head_dim + v_head_dim) · T

* active parameters: every weight matrix a token goes through (embedding lookups excluded, routed
  experts counted num_experts_per_tok / n_routed_experts, the MTP modules included and the shared
  output head counted once per prediction depth, since training runs them all);
* attention: QKᵀ and PV at full context T (the convention ignores the causal half), for the main
  layers and the MTP layers.

The peak is *measured* in the same process (the best of many square matmuls in the training dtype
on the training device), not read from a datasheet: on a shared CPU that is the only honest ceiling.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from nanoseek.model import Transformer


def flops_per_token(model: Transformer, seq_len: int, mtp: bool = True) -> float:
    """Training FLOPs (forward + backward) per token for sequences of `seq_len` tokens."""
    a = model.args
    matmul = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name == "embed_tokens.weight" or (not mtp and name.startswith("mtp.")):
            continue
        n = p.numel()
        if ".experts." in name:
            n = n * a.num_experts_per_tok // a.n_routed_experts
        matmul += n
    depths = len(model.mtp) if mtp else 0
    matmul += depths * model.lm_head.weight.numel()  # the shared head runs once more per MTP depth
    layers = a.num_hidden_layers + depths
    attention = 6 * layers * a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) * seq_len
    return 6 * matmul + attention


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                       seconds: float = 1.0) -> float:
    """Best FLOP/s of an n×n×n matmul over ~`seconds` (after one warm-up).

    n defaults to 1024 on CPU (~10 ms a try: many tries, so a machine shared with other jobs
    still shows its ceiling in one of them) and 8192 on GPU (big enough to saturate it)."""
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        c = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        del c
    return 2 * n**3 / best


class JsonlLog:
    """Append-only JSONL, one record per line, flushed each write (a crash loses at most one line).

    `truncate_after(step)` drops records past a step: a resumed run rewrites what it repeats.
    enabled=False writes nothing (under torchrun, ranks other than 0: rank 0 logs the global values).
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [json.dumps(r) for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics log. A line that is not a JSON object (a process killed mid-write
    leaves a torn last line) is skipped: the log is a record of the run, not its state."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
