"""Process groups and the parallel layout, in one place for training and (later) multi-device inference.

    torchrun --nproc-per-node 4 -m nanoseek train ... --dp-shard 2 --ep 2

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads
them, picks the backend (NCCL when the device is CUDA, gloo on CPU), pins one device per rank and
returns a `Dist`. Without torchrun it returns a one-rank `Dist` and starts no process group, so every
caller runs unchanged on one process.

The layout is a DeviceMesh with three named dimensions (DeepSeek-V3 trained with PP16 x EP64 x DP,
no tensor parallelism; see nanoseek/parallel/__init__.py):

    ("pp", "dp_shard", "ep")     pp x dp_shard x ep == world size

Expert parallelism borrows its ranks from data parallelism, as torchtitan does: every rank of a
pipeline stage reads different data, so the data-parallel group is the flattened ("dp_shard", "ep")
dimension ("dp", size dp_shard*ep). Dense weights are FSDP-sharded over "dp"; routed experts are
split over "ep" and FSDP-sharded over "dp_shard".

`check_layout` is plain arithmetic on the flags and the model config, done before any collective, so
a bad layout is the same clear error on every rank instead of a hang in the first all-to-all.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class LayoutError(ValueError):
    """Parallel flags that do not fit the world size or the model."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. rank/world_size are global; local_rank picks the GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


@dataclass(frozen=True)
class Layout:
    """Parallel degrees. dp = dp_shard * ep ranks read different data within a pipeline stage."""

    pp: int = 1
    dp_shard: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.dp_shard * self.ep

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_shard * self.ep

    def __str__(self) -> str:
        return f"pp={self.pp} x dp_shard={self.dp_shard} x ep={self.ep}"


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str = "auto") -> Dist:
    """Start the process group if torchrun launched us; pin this rank's device.

    device: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N" (under torchrun: the
    LOCAL_RANK-th GPU, whatever N).
    A single process (no WORLD_SIZE, or WORLD_SIZE=1) gets a Dist without a process group.
    """
    rank, world, local = torchrun_world()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world == 1:
        return Dist(device=dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)  # one GPU per rank, whatever index was asked for
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def shutdown() -> None:
    """Destroy the process group (if any): NCCL otherwise warns about leaked communicators."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def quiet_other_ranks(d: Dist) -> None:
    """Rank-0-only printing for a whole stage: other ranks' stdout goes to /dev/null (stderr stays,
    so every rank's errors are still seen)."""
    if not d.is_main:
        sys.stdout = open(os.devnull, "w")


def agree(values: list[float], d: Dist, op: str = "max") -> list[float]:
    """The same decision on every rank (stop, time up, a re-planned budget): max, min or sum over ranks."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
    return t.tolist()


def any_rank(flag: bool, d: Dist) -> bool:
    """The same branch on every rank, true when any rank's flag is (a signal, a time limit): one rank
    leaving a loop alone would leave the others waiting in a collective."""
    return agree([float(flag)], d)[0] > 0 if d.enabled else flag


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (every rank computes the same thing; one copy of the log is enough)."""
    if torchrun_world()[0] == 0:
        print(*args, **kwargs)


def check_layout(world_size: int, dp_shard: int | None, ep: int, pp: int, model_args=None,
                 micro_batch: int | None = None, batch_size: int | None = None) -> Layout:
    """Validate the flags against the world size and the model; dp_shard=None fills the rest.

    Raises LayoutError with one line naming the problem. Pure arithmetic: every rank raises the
    same error before any collective runs, so a bad launch exits instead of hanging.
    """
    for name, v in (("--ep", ep), ("--pp", pp)):
        if v < 1:
            raise LayoutError(f"{name} must be >= 1, got {v}")
    if dp_shard is None:
        if world_size % (ep * pp):
            raise LayoutError(f"world size {world_size} is not divisible by --ep {ep} x --pp {pp}")
        dp_shard = world_size // (ep * pp)
    if dp_shard < 1:
        raise LayoutError(f"--dp-shard must be >= 1, got {dp_shard}")
    layout = Layout(pp=pp, dp_shard=dp_shard, ep=ep)
    if layout.world_size != world_size:
        raise LayoutError(f"--dp-shard {dp_shard} x --ep {ep} x --pp {pp} = {layout.world_size} ranks, but the world "
                          f"size is {world_size} (torchrun --nproc-per-node x --nnodes)")
    if model_args is not None:
        E = model_args.n_routed_experts
        if ep > 1 and not any(model_args.is_moe_layer(i) for i in range(model_args.num_hidden_layers)):
            raise LayoutError(f"--ep {ep} needs MoE layers, and this model has none")
        if E % ep:
            raise LayoutError(f"--ep {ep} does not divide n_routed_experts {E}")
        groups = model_args.n_group
        if ep > 1 and groups > 1 and model_args.topk_method != "greedy" and groups % ep and ep % groups:
            raise LayoutError(f"--ep {ep} and n_group {groups}: one must divide the other, so that expert groups "
                              f"map onto whole ranks (device-limited routing)")
        if pp > model_args.num_hidden_layers:
            raise LayoutError(f"--pp {pp} stages need at least as many layers, the model has "
                              f"{model_args.num_hidden_layers}")
    if micro_batch is not None and batch_size is not None:
        if batch_size % (micro_batch * layout.dp):
            raise LayoutError(f"--batch-size {batch_size} must be a multiple of --micro-batch {micro_batch} x "
                              f"{layout.dp} data-parallel ranks (dp_shard x ep)")
    return layout


def build_mesh(layout: Layout, d: Dist):
    """DeviceMesh ("pp", "dp_shard", "ep") plus the flattened "dp" = ("dp_shard", "ep"); None for one rank."""
    if not d.enabled:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(d.device.type, (layout.pp, layout.dp_shard, layout.ep),
                            mesh_dim_names=("pp", "dp_shard", "ep"))
    mesh["dp_shard", "ep"]._flatten("dp")
    return mesh


def fail(prog: str, err: Exception) -> SystemExit:
    """The one-line error every rank prints (prefixed with its rank when there are several)."""
    rank, world, _ = torchrun_world()
    where = f"[rank {rank}] " if world > 1 else ""
    print(f"{where}{prog}: error: {err}", file=sys.stderr)
    return SystemExit(2)
