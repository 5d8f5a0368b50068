"""`parallelize`: turn a plain `Transformer` (or a pipeline stage of one) into a data/expert-parallel one.

Applied after construction, from outside the model (torchtitan's `parallelize_deepseekv3` habit), in
this order:

    1. expert parallelism: each MoE's `experts` becomes an `ExpertParallel` over mesh["ep"];
    2. activation checkpointing per block (composable `checkpoint`: parameter names unchanged);
    3. torch.compile of attention and dense / shared-expert FFNs (the all-to-all and the routed
       experts stay eager: the dispatch needs host-side split sizes);
    4. FSDP2 `fully_shard`: routed experts over mesh["dp_shard"] (they are already split over "ep"),
       then every block and the root over mesh["dp"] = ("dp_shard", "ep"). On GPU the mixed-precision
       policy computes in bf16 and reduces gradients in fp32; fp32 master weights stay sharded.

Gradient scaling. Each rank's loss is the mean over its own tokens, and FSDP averages gradients over
the ranks it reduces over. Dense weights see all `dp` ranks, so their average is the global mean. An
expert's gradient already sums the contributions of every EP rank's tokens (the backward of the
all-to-all brings them home) and FSDP averages it over "dp_shard" only, so `ExpertParallel` scales
it by 1/ep in its backward: the result is again the mean over the global batch. (torchtitan sets
FSDP's gradient divide factor instead; that needs NCCL's PREMUL_SUM, which gloo lacks.)

The balancing statistics are global too: `global_counts` all-reduces the per-expert loads over all
ranks before the bias update and MaxVio, so every rank moves its biases by the same amount.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nanoseek.model.layers import MLP
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Block

from .expert import ExpertParallel, rank_limit


def blocks_of(model: nn.Module) -> list[Block]:
    """The transformer blocks (main layers and MTP modules) of a model or a pipeline stage."""
    return [m for m in model.modules() if isinstance(m, Block)]


def parallelize(model: nn.Module, mesh=None, *, bf16: bool = False, activation_checkpoint: bool = False,
                compile: bool = False) -> nn.Module:
    """Apply EP, activation checkpointing, compile and FSDP2 in place; returns `model`.

    model: a Transformer or a pipeline stage module (nanoseek/parallel/pipeline.py);
    mesh: the DeviceMesh from `build_mesh` (None: one process, only checkpointing and compile apply);
    bf16: FSDP mixed precision (bf16 compute, fp32 gradient reduction), for GPUs.
    """
    blocks = blocks_of(model)
    ep = mesh["ep"].size() if mesh is not None else 1
    dp = mesh["dp"].size() if mesh is not None else 1
    if ep > 1:
        for block in blocks:
            if isinstance(block.mlp, MoE):
                block.mlp.experts = ExpertParallel(block.mlp.experts, mesh["ep"])
    if activation_checkpoint:
        from torch.distributed._composable import checkpoint

        for block in blocks:
            checkpoint(block)
    if compile:
        for module in model.modules():
            if isinstance(module, (MLA, MLP)):
                module.compile()
    if mesh is None or (dp == 1 and not bf16):  # (a pipeline without data parallelism still gets FSDP's bf16 policy)
        return model

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks:
        if ep > 1 and isinstance(block.mlp, MoE):
            fully_shard(block.mlp.experts, mesh=mesh["dp_shard"], mp_policy=mp)
        if hasattr(block, "shared_head"):  # an MTP module's norm is called outside the block's forward
            fully_shard(block.shared_head.norm, mesh=mesh["dp"], mp_policy=mp)
        fully_shard(block, mesh=mesh["dp"], mp_policy=mp)
    fully_shard(model, mesh=mesh["dp"], mp_policy=mp)
    if hasattr(model, "run"):
        register_fsdp_forward_method(model, "run")  # training calls model.run(...), not model(...)
    return model


def device_limit(model: nn.Module, mesh) -> int:
    """M for this model and layout (see nanoseek/parallel/expert.py); 1 without EP."""
    if mesh is None or mesh["ep"].size() == 1:
        return 1
    return rank_limit(model.args, mesh["ep"].size())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for any layout: returns the global norm before clipping.

    Under FSDP, EP and PP every gradient element lives on exactly one rank (shards partition the
    tensors, stages partition the model), so the squared norm is one all-reduce of local sums over
    the whole world. (torch's own clip refuses DTensors on different meshes: experts and dense
    weights are sharded differently.)
    """
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sq += g.float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm.item()


def global_counts(counts: torch.Tensor) -> torch.Tensor:
    """Per-expert loads [L, E] summed over every rank (rows of layers a rank does not hold are zero)."""
    if dist.is_initialized():
        counts = counts.clone()
        dist.all_reduce(counts)
    return counts


def a2a_rows(model: nn.Module) -> int:
    """Token rows this rank has sent to other EP ranks so far (dispatch), summed over MoE layers."""
    return sum(m.rows_sent for m in model.modules() if isinstance(m, ExpertParallel))


def max_ranks_reached(model: nn.Module) -> int:
    """The most EP ranks any token reached in the last forward (0 without EP)."""
    ranks = [m.max_ranks for m in model.modules() if isinstance(m, ExpertParallel)]
    return int(torch.stack(ranks).max()) if ranks else 0


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer as a full CPU tensor, on every rank (tests, export).

    Under pipeline parallelism a rank holds only its stage: merge the stages' dicts."""
    out = {}
    for name, t in model.state_dict().items():
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
    return out


@torch.no_grad()
def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient on every rank (tests)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu()
    return out
