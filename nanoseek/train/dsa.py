"""Training the lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1.1), at any scale.

V3.2 continues V3's pre-training in two stages:

* **Dense warm-up** (`--dsa-warmup`): the main model frozen, attention dense; only the indexer
  learns, to match the main attention: per query token t,
      L_I = Σ_t KL( p_t,: ‖ softmax(I_t,:) )
  where p_t,: is the main attention distribution summed over heads and L1-normalised.
  (V3.2: 1000 steps of 16 × 128K tokens, lr 1e-3.)
* **Sparse training**: the selection in the forward (each query attends to the indexer's top-k);
  the indexer's KL is taken over the selected set S_t only, against the main attention restricted
  to S_t, and the indexer's input is detached from the graph: the indexer learns only from L_I and
  the main model only from the language-modelling loss. (V3.2: k = 2048, lr 7.3e-6.)

`IndexerLoss(model)` hooks every DSA attention layer from outside (forward hooks, no change to the
model code): each full (uncached) forward then also computes, per layer, the KL above and the
share of the dense attention mass the indexer's top-k keeps ("kept mass", the figure that says
whether the sparse model can match the dense one). `pop()` returns their layer means and clears them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.model.indexer import topk_mask
from nanoseek.model.mla import MLA, _causal


@dataclass
class IndexerStats:
    kl: torch.Tensor  # mean over DSA layers and tokens, differentiable w.r.t. the indexers only
    kept_mass: float  # mean share of the dense attention mass inside the indexer's top-k


class IndexerLoss:
    """Per-layer indexer KL and kept attention mass, collected by forward hooks on the MLA layers."""

    def __init__(self, model: nn.Module):
        self.kl: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.active = True
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True)
                        for m in model.modules() if isinstance(m, MLA) and m.indexer is not None]
        if not self.handles:
            raise ValueError("the model has no DSA layers (model_type deepseek_v32 needed)")

    def _hook(self, mla: MLA, args, kwargs, output):
        names = ("x", "cos", "sin", "cache", "positions", "kv_len", "absorbed", "mask")
        inputs = {**dict(zip(names, args)), **kwargs}
        if inputs.get("cache") is not None or not self.active:
            return  # cached inference, evaluation: nothing to train
        kl, kept = layer_loss(mla, inputs["x"], inputs["cos"], inputs["sin"], inputs.get("mask"))
        self.kl.append(kl)
        self.kept.append(kept)

    def pop(self) -> IndexerStats:
        """The layer means since the last pop (KL with its graph; kept mass as a float)."""
        if not self.kl:
            raise RuntimeError("no forward ran since the last pop")
        stats = IndexerStats(torch.stack(self.kl).mean(), torch.stack(self.kept).mean().item())
        self.kl, self.kept = [], []
        return stats

    @contextlib.contextmanager
    def paused(self):
        """No collection inside (validation, throughput measurements)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_loss(mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
    """One layer's (KL, kept mass). x [B, T, hidden] is the attention input (after input_layernorm);
    mask bool [B|1, T, T] (default causal). Dense target while `mla.sparse` is off or the context fits
    in index_topk, else the sparse target over the selected tokens (see the module docstring)."""
    T = x.shape[1]
    base = _causal(T, x.device) if mask is None else mask
    x, cos, sin = x.detach(), cos.detach(), sin.detach()
    with torch.no_grad():
        q_nope, q_rope, latent, k_rope, q_resid = mla.project(x, cos, sin)
        probs = attention_probs(mla, q_nope, q_rope, latent, k_rope, base)  # [B, H, T, T] per head
    idx = mla.indexer
    with torch.enable_grad():  # also under a no_grad main forward (the warm-up runs the frozen model so)
        scores = idx.score(*idx.query(x, q_resid, cos, sin), idx.stored(idx.key(x, cos, sin)))  # [B, T, T]
    top = topk_mask(scores.detach(), base, idx.topk)
    dense = probs.mean(1)  # summed over heads, L1-normalised
    kept = (dense * top).sum(-1).mean()
    if mla.sparse and T > idx.topk:
        # the main model attends over the selection: each head's softmax restricted to it
        restricted = probs * top[:, None]
        target = (restricted / restricted.sum(-1, keepdim=True).clamp(min=1e-30)).mean(1)
        allowed = top
    else:
        target, allowed = dense, base.expand_as(dense)
    with torch.enable_grad():
        log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        terms = torch.where(target > 0, target * (target.clamp(min=1e-30).log() - log_q), torch.zeros_like(target))
        return terms.sum(-1).mean(), kept


def attention_probs(mla: MLA, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
    """Main attention probabilities [B, H, T, S] of one MLA layer (absorbed form), under bool mask [B|1, T, S]."""
    H = mla.n_heads
    w_uk = mla.kv_b_proj.weight.view(H, mla.nope_dim + mla.v_dim, mla.kv_lora_rank)[:, : mla.nope_dim]
    q_latent = torch.einsum("bthd,hdr->bhtr", q_nope.float(), w_uk.float())
    logits = q_latent @ latent.float()[:, None].transpose(-1, -2)
    logits = logits + q_rope.float().transpose(1, 2) @ k_rope.float()[:, None].transpose(-1, -2)
    logits = (logits * mla.softmax_scale).masked_fill(~mask[:, None], float("-inf"))
    return logits.softmax(-1)


def freeze_all_but_indexers(model: nn.Module) -> list[nn.Parameter]:
    """The DSA warm-up's trainable set: every indexer parameter; everything else requires_grad=False."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(".indexer." in f".{name}")
        if p.requires_grad:
            trainable.append(p)
    return trainable
