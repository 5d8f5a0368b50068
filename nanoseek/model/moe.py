"""DeepSeekMoE (DeepSeek-V2 §2.2, V3 §2.1.2): shared experts plus fine-grained routed experts.

    y = x + Σ_shared FFN_s(x) + Σ_{i ∈ TopK} g_i FFN_i(x)

Routing (`Gate`):
* scores s_i = sigmoid(u·e_i) (V3) or softmax over experts (V2), in fp32;
* choice: V3 (`noaux_tc`) adds the balancing bias b_i (`e_score_correction_bias`) to the scores for
  *selection only*, scores each of `n_group` groups by the sum of its top-2 biased scores and keeps
  `topk_group` groups; V2 `group_limited_greedy` scores a group by its max; `greedy` ignores groups;
* gate weights are the chosen unbiased s_i, renormalised when `norm_topk_prob`, times
  `routed_scaling_factor`.

Routed experts are stored fused (one tensor per projection across experts, rows in nn.Linear
order) and run as two grouped matmuls over tokens sorted by expert: no per-expert Python loop.
Small batches take cheaper paths (`Experts.forward`): a few tokens gather their experts' weights;
on CPU, a forward without gradients whose every-expert work is small runs all experts densely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .layers import MLP

# On CPU the grouped path below has a fixed cost of a few hundred µs a layer, whatever the batch: the
# sort, the two permutations, one MKL call per expert inside the grouped GEMM, and from compiled code a
# trip through Python for the custom op. Running every expert on every token (two plain matmuls, the
# unchosen experts weighted 0) costs extra FLOPs instead; in a forward without gradients (decoding,
# rollouts) it is the cheaper of the two while those extra FLOPs stay under this (2-core CPU, tiny
# preset: 64 tokens, 19 MFLOP extra, a compiled layer 0.68 -> 0.30 ms, a GRPO rollout of 64 x 64 tokens
# ~15% faster; past ~40 MFLOP grouped wins). Training keeps the grouped path (a backward would triple
# the extra work, and expert parallelism dispatches the same way). Real sizes never qualify (V3: one
# token's extra work is ~20 GFLOP).
DENSE_EXTRA_FLOPS = 24e6


def dense_tokens(n_experts: int, top_k: int, hidden: int, inter: int) -> int:
    """The most tokens that run every routed expert densely on CPU (`DENSE_EXTRA_FLOPS`)."""
    return int(DENSE_EXTRA_FLOPS // max((n_experts - top_k) * 6 * hidden * inter, 1))  # per (token, unchosen expert)


@dataclass
class Routing:
    """What one MoE layer decided, for balancing during training (all detached except `scores`).

    indices: LongTensor[N, K] chosen experts per token (N = B*T, row-major over [B, T]);
    scores: FloatTensor[N, E] unbiased affinities s_i (sigmoid or softmax), with grad.
    """

    indices: torch.Tensor
    scores: torch.Tensor


class Gate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.n_experts = args.num_experts_per_tok, args.n_routed_experts
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.topk_method, self.scoring_func = args.topk_method, args.scoring_func
        self.norm_topk_prob, self.scale = args.norm_topk_prob, args.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, args.hidden_size))
        # Aux-loss-free balancing bias (V3): moved by the trainer, not by gradients; kept in fp32.
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Routing replay (DeepSeek-V3.2's "keep routing"): LongTensor[N, K] experts to use instead of
        # choosing, set from outside for one forward (nanoseek.rl.rollout.replay_routing); gate weights
        # are still this forward's scores of those experts, so gradients reach the gate as usual.
        self.replay: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> weights FloatTensor[N, K], indices LongTensor[N, K], scores FloatTensor[N, E]."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach()
        if self.e_score_correction_bias is not None:
            choice = choice + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices if self.replay is None else self.replay
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, indices, scores


class Experts(nn.Module):
    """n_routed_experts SwiGLU FFNs in two fused tensors.

    gate_up_proj [E, 2*inter, hidden] (gate rows then up rows), down_proj [E, hidden, inter].
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, I = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.n_experts, self.inter_dim = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, hidden], indices/weights [N, K] -> [N, hidden]."""
        N, K = indices.shape
        if N * K <= self.n_experts:
            return self._few_tokens(x, indices, weights)
        if x.device.type == "cpu" and not torch.is_grad_enabled() and \
                N <= dense_tokens(self.n_experts, K, *self.down_proj.shape[1:]):
            return self._all_experts(x, indices, weights)
        return self._grouped(x, indices, weights)

    def _grouped(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, two grouped matmuls, back to token order."""
        N, K = indices.shape
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # token copies sorted by expert
        token = order // K  # copy j is x[token[j]]
        # counts per expert by scatter_add into E zeros (not bincount, whose output size depends on the data: a graph break)
        counts = torch.zeros(self.n_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
        offsets = counts.cumsum(0).to(torch.int32)
        # Compiled, both reorderings are row permutations, gathers forward and backward (`_Permute`):
        # inductor's CPU code runs a scatter (the index_add combine, x[token]'s backward) with atomic
        # adds on 2+ threads. Eagerly the gather + index_add pair is fewer ops.
        compiled = torch.compiler.is_compiling()
        if compiled:
            # where each (token, k) copy sits in that order: the inverse permutation (a store, not a second sort)
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            xs = _Permute.apply(x.repeat_interleave(K, dim=0), order, inverse)
        else:
            xs = x[token]
        h = grouped_mm(xs, self.gate_up_proj, offsets, counts)
        gate, up = h.split(self.inter_dim, dim=-1)
        h = grouped_mm(F.silu(gate) * up, self.down_proj, offsets, counts)
        if compiled:
            h = _Permute.apply(h, inverse, order).view(N, K, -1)  # back in (token, k) order
            return (h * weights[..., None].to(h.dtype)).sum(dim=1)
        h = h * weights.flatten()[order, None].to(h.dtype)
        return torch.zeros_like(x).index_add_(0, token, h)

    def _few_tokens(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding (N*K <= E): gather the chosen experts' weights and run batched mat-vecs, as
        gpt-fast's MoE does: no sort, and no pass over the experts nobody chose."""
        N, K = indices.shape
        flat = indices.flatten()
        xs = x.repeat_interleave(K, dim=0)[:, :, None]  # [N*K, hidden, 1]
        h = torch.bmm(self.gate_up_proj[flat], xs).squeeze(-1)
        gate, up = h.split(self.inter_dim, dim=-1)
        h = torch.bmm(self.down_proj[flat], (F.silu(gate) * up)[:, :, None]).squeeze(-1)
        return (h.view(N, K, -1) * weights[..., None].to(h.dtype)).sum(dim=1)

    def _all_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, each output weighted by its gate weight (0 where not chosen): the
        grouped path's result (the unchosen terms add exact zeros; the matmuls may order their sums
        differently), with no sort and no grouped GEMM."""
        N, E, I = x.shape[0], self.n_experts, self.inter_dim
        h = F.linear(x, self.gate_up_proj.flatten(0, 1)).view(N, E, 2 * I)
        gate, up = h.split(I, dim=-1)
        h = torch.bmm((F.silu(gate) * up).transpose(0, 1), self.down_proj.transpose(1, 2))  # [E, N, hidden]
        w = torch.zeros(N, E, dtype=h.dtype, device=x.device).scatter(1, indices, weights.to(h.dtype))
        return (h * w.t()[:, :, None]).sum(dim=0)


class _Permute(torch.autograd.Function):
    """x[index] for a permutation `index` whose inverse is `inverse`, with grad[inverse] as its gradient:
    a gather too, where autograd's own backward of x[index] is a scatter-add (it cannot know that no
    row repeats)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group times w[g]^T. x [M, in], w [E, out, in], offsets = cumsum(counts)."""
    if x.dtype == torch.bfloat16:
        return F.grouped_mm(x, w.transpose(1, 2), offs=offsets)
    if x.device.type == "cpu":
        return _cpu_grouped_mm(x, w, offsets)
    # CUDA grouped GEMM wants bf16; other dtypes fall back to one matmul per non-empty expert.
    out, start = x.new_empty(x.shape[0], w.shape[1]), 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = x[start : start + n] @ w[e].T
            start += n
    return out


# fp32 F.grouped_mm on CPU as an opaque custom op: torch.compile (2.13) traces grouped_mm only in bf16, and
# a graph break around it measured slower than eager; as a custom op with a shape function (`register_fake`)
# and its derivative, one compiled graph spans the routed experts too (inductor calls the op as is).
@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def _cpu_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, in] sorted by group, w [E, out, in], offsets [E] int32 -> [M, out] (x_g @ w[g]^T)."""
    return F.grouped_mm(x, w.transpose(1, 2), offs=offsets)


@_cpu_grouped_mm.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("nanoseek::grouped_mm_weight_grad", mutates_args=())
def _cpu_grouped_mm_weight_grad(grad: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grad [M, out], x [M, in] sorted by group -> [E, out, in]: grad_g^T @ x_g per group (0 for empty groups)."""
    return F.grouped_mm(grad.t(), x, offs=offsets)


@_cpu_grouped_mm_weight_grad.register_fake
def _(grad, x, offsets):
    return grad.new_empty(offsets.shape[0], grad.shape[1], x.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = _cpu_grouped_mm(grad, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _cpu_grouped_mm_weight_grad(grad, x, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_cpu_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Gate(args)
        self.experts = Experts(args)
        self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts) \
            if args.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x [B, T, hidden] -> (y [B, T, hidden], Routing)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat)
        y = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape), Routing(indices=indices, scores=scores)
