"""Expert load balancing for DeepSeekMoE: the V3 recipe and the classic one it replaced.

* **Auxiliary-loss-free balancing** (V3 §2.1.2; Wang et al. 2024). Each routed expert i has a
  bias b_i that is added to its affinity for *choosing* the top-K only. After every optimizer
  step, b_i += γ·sign(mean_load − load_i): overloaded experts become less attractive, idle ones
  more. No gradient flows through it, so it balances without pulling the language-model loss.
* **Sequence-wise balance loss** (V3's complement, α = 1e-4): per sequence of T tokens
      L = α Σ_i f_i P_i,   f_i = E/(K·T) Σ_t 1[i ∈ TopK(t)],   P_i = (1/T) Σ_t s'_{i,t}
  with s' the affinities normalised to sum 1 over experts. It only stops single sequences from
  collapsing onto a few experts.
* **Classic auxiliary loss** (DeepSeek-V2 / GShard style, larger α): the same formula over the
  whole batch. Kept for the ablation (`nanoseek bench balance`).

Loads are counted per MoE layer (main layers, then MTP layers, the order of `Output.routing`)
over the whole accumulated batch. The balance metric is MaxVio = (max_i load_i − mean)/mean.
"""

from __future__ import annotations

import torch

from nanoseek.model import Routing, Transformer
from nanoseek.model.moe import Gate


def moe_gates(model: Transformer) -> list[Gate]:
    """The routers in `Output.routing` order: main MoE layers first, then MTP layers."""
    blocks = list(model.layers) + list(model.mtp)
    return [b.mlp.gate for b in blocks if isinstance(getattr(b.mlp, "gate", None), Gate)]


def expert_counts(routing: list[Routing], n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: FloatTensor[L, E] (L = MoE layers incl. MTP)."""
    if not routing:
        return torch.zeros(0, n_experts)
    return torch.stack([torch.bincount(r.indices.flatten(), minlength=n_experts).float() for r in routing])


def max_vio(counts: torch.Tensor) -> torch.Tensor:
    """counts [L, E] -> MaxVio [L] = (max load − mean load) / mean load per layer (0 = perfect)."""
    mean = counts.mean(dim=-1)
    return (counts.amax(dim=-1) - mean) / mean.clamp(min=1e-9)


@torch.no_grad()
def update_bias(model: Transformer, counts: torch.Tensor, gamma: float) -> None:
    """b_i += γ·sign(mean_load − load_i) for every noaux_tc gate. counts: [L, E] from `expert_counts`:
    every MoE layer, or the main layers only (a forward without MTP: the MTP routers stay as they are)."""
    gates = moe_gates(model)
    main = sum(isinstance(getattr(b.mlp, "gate", None), Gate) for b in model.layers)
    if counts.shape[0] not in (len(gates), main):
        raise ValueError(f"counts cover {counts.shape[0]} MoE layers, the model has {len(gates)} ({main} main)")
    for gate, load in zip(gates, counts):
        if gate.e_score_correction_bias is None:
            continue  # V2 gates (softmax, greedy) have no balancing bias
        load = load.to(gate.e_score_correction_bias.device)
        gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))


def balance_loss(routing: list[Routing], batch_size: int, top_k: int, per_sequence: bool = True) -> torch.Tensor:
    """Σ over MoE layers of Σ_i f_i P_i (multiply by α). 1.0 per layer means perfectly balanced.

    routing: `Output.routing` (indices [B*T, K], scores [B*T, E] with grad; MTP layers hold
    B*(T-k) rows); batch_size: B; per_sequence: V3's sequence-wise loss (True) or the classic
    batch-wide auxiliary loss (False).
    """
    total = torch.zeros(())
    for r in routing:
        n, E = r.scores.shape
        groups = batch_size if per_sequence else 1
        T = n // groups  # tokens per sequence (or per batch)
        idx = r.indices.view(groups, T * top_k)
        hits = torch.zeros(groups, E, device=idx.device).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float))
        f = hits * E / (top_k * T)  # [groups, E], detached by construction
        s = r.scores.float()
        p = (s / s.sum(dim=-1, keepdim=True)).view(groups, T, E).mean(dim=1)
        total = total.to(p.device) + (f * p).sum(dim=-1).mean()
    return total
