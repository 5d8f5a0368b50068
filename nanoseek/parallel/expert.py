"""Expert parallelism: routed experts split over the "ep" mesh dimension, tokens moved by all-to-all.

`ExpertParallel` replaces a MoE's `experts` module from outside (same parameter names, so
checkpoints and optimizer states keep their keys). Each of the `ep` ranks holds E/ep consecutive
experts as the local shard of a DTensor (Shard(0) over "ep"). One forward:

    1. sort this rank's (token, expert) pairs by expert: they are then grouped by destination rank;
    2. all-to-all the per-expert counts (a host sync: the split sizes must be known);
    3. dispatch: all_to_all_single of the token rows (differentiable: its backward is the reverse
       all-to-all of the gradients);
    4. re-sort the received rows by local expert, run the two grouped GEMMs, un-sort;
    5. combine: all_to_all_single back to the ranks the tokens came from;
    6. scale by the gate weights and sum the K copies of each token, on the token's own rank (so the
       gate's gradient never travels).

Device-limited routing (V2 §2.2.2, V3 §2.1.2 "node-limited"): with groups of experts laid onto
ranks (n_group divisible by ep, or ep by n_group), the model's own group-limited routing, which
keeps `topk_group` groups chosen by group scores, bounds the ranks a token reaches:

    M = min(ep, num_experts_per_tok, topk_group * max(1, ep // n_group))

So the model computes the same function at every layout (no layout-dependent routing), and
`max_ranks` records what the dispatch actually did, for the tests and the benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from nanoseek.model.moe import Experts, grouped_mm


def rank_limit(args, ep: int) -> int:
    """M: the most EP ranks one token's routed experts can lie on, given the model's routing."""
    K = args.num_experts_per_tok
    if args.topk_method == "greedy" or args.n_group <= 1:
        return min(ep, K)
    return min(ep, K, args.topk_group * max(1, ep // args.n_group))


class ExpertParallel(nn.Module):
    """Drop-in for `Experts` across the EP group: forward(x [N, D], indices [N, K], weights [N, K]) -> [N, D].

    gate_up_proj: DTensor [E, 2*inter, D], down_proj: DTensor [E, D, inter], both Shard(0) over ep_mesh.
    Statistics: `max_ranks` (int tensor, the most ranks one token reached in the last forward) and
    `rows_sent` (token rows this rank has sent to other ranks so far, dispatch only; the combine
    returns as many).
    """

    def __init__(self, experts: Experts, ep_mesh):
        super().__init__()
        self.n_experts, self.inter_dim = experts.n_experts, experts.inter_dim
        self.ep_mesh, self.group = ep_mesh, ep_mesh.get_group()
        self.ep, self.ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
        self.n_local = self.n_experts // self.ep
        # Every rank built the same model from the same seed: take the local slice, no communication.
        self.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj.data, ep_mesh, [Shard(0)],
                                                           src_data_rank=None))
        self.down_proj = nn.Parameter(distribute_tensor(experts.down_proj.data, ep_mesh, [Shard(0)],
                                                        src_data_rank=None))
        self.max_ranks = torch.zeros((), dtype=torch.long)
        self.rows_sent = 0

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, K = indices.shape
        E, ep, n_local = self.n_experts, self.ep, self.n_local
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # token copies sorted by expert, hence by destination rank
        token = order // K
        counts = torch.bincount(flat, minlength=E)  # [E] rows this rank sends to each expert
        self.max_ranks = F.one_hot(indices // n_local, ep).amax(dim=1).sum(dim=1).max().detach() if N else self.max_ranks

        # recv_counts[s, j]: rows rank s sends to my local expert j
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(ep, n_local)
        send_splits = counts.view(ep, n_local).sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        self.rows_sent += sum(send_splits) - send_splits[self.ep_rank]

        received = all_to_all_single_autograd(x[token], recv_splits, send_splits, self.group)
        # Received rows are grouped by source rank, then by local expert: regroup by local expert.
        expert_of_row = torch.repeat_interleave(torch.arange(n_local, device=x.device).repeat(ep),
                                                recv_counts.flatten())
        perm = expert_of_row.argsort(stable=True)
        local_counts = recv_counts.sum(dim=0)
        offsets = local_counts.cumsum(0).to(torch.int32)
        # The backward of the dispatch sums every EP rank's tokens into these gradients: scale them to
        # the mean over the EP ranks, as the data-parallel average does for every other weight.
        w1 = ScaleGrad.apply(_local(self.gate_up_proj), 1.0 / ep)
        w2 = ScaleGrad.apply(_local(self.down_proj), 1.0 / ep)
        h = grouped_mm(received[perm], w1, offsets, local_counts)
        gate, up = h.split(self.inter_dim, dim=-1)
        h = grouped_mm(F.silu(gate) * up, w2, offsets, local_counts)
        h = h[perm.argsort()]  # back to (source rank, local expert) order

        back = all_to_all_single_autograd(h, send_splits, recv_splits, self.group)
        back = back * weights.flatten()[order, None].to(back.dtype)
        return torch.zeros_like(x).index_add_(0, token, back.to(x.dtype))


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def a2a_bytes_per_layer(tokens: int, top_k: int, hidden: int, ep: int, elem_bytes: int) -> float:
    """Expected bytes one rank sends per MoE layer per forward+backward for `tokens` local tokens.

    Each token's K copies go to their experts' ranks; with uniform routing a copy stays local with
    probability 1/ep. Dispatch and combine each move the rows once in the forward and once (their
    gradients) in the backward: 4 transfers of tokens*K*(1-1/ep) rows of `hidden` elements.
    (DeepSeek-V3 dispatches a token once per *node* and fans out inside it, which is why node-limited
    routing bounds its cost; a plain all-to-all sends one row per expert copy, as here.)
    """
    return 4 * tokens * top_k * (1 - 1 / ep) * hidden * elem_bytes
