"""The DeepSeek-V3 / V2 decoder: embedding → blocks (MLA + dense FFN or DeepSeekMoE) → norm → head,
plus the Multi-Token Prediction modules (V3 §2.2).

Module names mirror the checkpoint (`embed_tokens`, `layers.N.self_attn.*`, `norm`, `lm_head`), so
checkpoint I/O (`nanoseek/checkpoint.py`) only adds the `model.` prefix and fuses experts.

MTP module k (1-based) at position i combines the previous depth's representation of token i with
the embedding of token i+k and predicts token i+k+1:
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]) → one Block → shared_head.norm → lm_head
Depth 1 takes the main model's final (normed) hidden state, as vLLM and transformers do when they
serve the released checkpoints; depth k>1 takes depth k-1's block output. Embedding and output head
are the main model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .args import ModelArgs
from .layers import MLP, RMSNorm
from .mla import MLA, Spans
from .moe import MoE, Routing
from .rope import inv_frequencies

LayerCache = torch.Tensor  # [B, S, kv_lora_rank + qk_rope_head_dim]: rows [norm(c_KV) ; rotated k_R]


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x, cos, sin, cache=None, positions=None, kv_len=None, absorbed=None, mask=None, keep=None):
        """x [B, T, hidden] -> (x [B, T, hidden], Routing | None). mask: see MLA.forward. keep: LongTensor [N]
        of flat positions (b·T + t) whose outputs are wanted: the FFN runs on those only, x [1, N, hidden]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions, kv_len, absorbed, mask)
        if keep is not None:
            x = x.flatten(0, 1)[keep][None]
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, routing = self.mlp(h)
            return x + out, routing
        return x + self.mlp(h), None


class SharedHead(nn.Module):
    """The MTP module's own final norm; its `head` is the main lm_head (shared)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class MTPModule(Block):
    """One MTP depth: a Block preceded by the embedding/hidden merge. Checkpoint: model.layers.{N+k-1}."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__(args, layer_id)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)

    def forward(self, prev, emb, cos, sin, cache=None, positions=None, kv_len=None, absorbed=None, mask=None):
        """prev [B, T, hidden] (depth k-1 states), emb [B, T, hidden] (Emb(t_{i+k})) -> (h, Routing | None)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(prev)], dim=-1))
        return super().forward(h, cos, sin, cache, positions, kv_len, absorbed, mask)


@dataclass
class Output:
    """logits [B, T, V] (None if not asked); hidden [B, T, hidden] after the final norm;
    mtp_logits[k-1] [B, T-k, V] predicts targets[:, k:] (empty if logits not asked);
    mtp_hidden[k-1] [B, T-k, hidden] the states it is computed from (after shared_head.norm);
    routing: one entry per MoE layer, main layers first, then MTP layers."""

    logits: torch.Tensor | None
    hidden: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    routing: list[Routing] = field(default_factory=list)
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(args, args.num_hidden_layers + k) for k in range(args.num_nextn_predict_layers)
        )
        inv_freq, self.rope_scale = inv_frequencies(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All matrices ~ N(0, initializer_range) (V3: 0.006), norms 1, biases and balance bias 0."""
        std = self.args.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        self.inv_freq.copy_(inv_frequencies(self.args)[0])

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions LongTensor[B, T] -> cos, sin FloatTensor[B, T, qk_rope_head_dim // 2]."""
        angles = positions[..., None].float() * self.inv_freq.float()
        return angles.cos() * self.rope_scale, angles.sin() * self.rope_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids LongTensor[B, T] -> logits FloatTensor[B, T, V] (full causal forward)."""
        return self.run(input_ids).logits

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        kv_len: int | None = None,
        absorbed: bool | None = None,
        mtp: bool = False,
        logits: bool = True,
        doc_ids: torch.Tensor | None = None,
        doc_lens: list[int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> Output:
        """The full forward with every option.

        input_ids [B, T]; positions [B, T] absolute positions (default 0..T-1); cache: one
        LayerCache per main layer (extra entries for MTP layers are ignored here), written
        at `positions` (see MLA.forward; positions=None with a cache: the prompts' first chunk,
        plain causal attention over it); mtp: also run the MTP modules over this chunk (training);
        logits=False skips the output head, for the main model and MTP (callers that need only
        some positions, or a loss that fuses the head with the cross-entropy); doc_ids [B, T] (no
        cache): several documents packed in a row, attention stays causal within each (pass their
        own restarting `positions` too). MTP depth k at a document's last k tokens then reads the
        next document's tokens: the loss must mask those targets (nanoseek.train.loss.sft_loss).
        doc_lens (B = 1, no cache, no MTP): padding-free packing, documents of these lengths end to end,
        each attending to itself only (`Spans`: no T×T mask); positions restart per document.
        keep: LongTensor [N] of flat positions (b·T + t) that matter (e.g. a reward model's last tokens):
        the last block's FFN, the final norm and the head run on those only; hidden is [1, N, hidden].
        """
        B, T = input_ids.shape
        first_chunk = cache is not None and positions is None  # see MLA.forward
        mask = None
        if doc_lens is not None:
            if B != 1 or sum(doc_lens) != T or cache is not None or mtp or doc_ids is not None:
                raise ValueError(f"doc_lens packs one row without a cache or MTP: got B={B}, T={T}, "
                                 f"sum(doc_lens)={sum(doc_lens)}")
            mask = Spans(doc_lens, input_ids.device)
            if positions is None:
                positions = torch.cat([torch.arange(n, device=input_ids.device) for n in doc_lens])[None]
        if keep is not None and mtp:
            raise ValueError("keep drops positions the MTP modules read")
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, T, T]
        cos, sin = self.rope(positions)
        x = self.embed_tokens(input_ids)
        routing: list[Routing] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, r = layer(x, cos, sin, None if cache is None else cache[i], None if first_chunk else positions, kv_len,
                         absorbed, mask, keep if i == last else None)
            if r is not None:
                routing.append(r)
        hidden = self.norm(x)
        out = Output(logits=self.lm_head(hidden) if logits else None, hidden=hidden, routing=routing)
        if mtp:
            prev = hidden
            for k, module in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                emb = self.embed_tokens(input_ids[:, k:])
                prev, r = module(prev[:, : T - k], emb, cos[:, : T - k], sin[:, : T - k], absorbed=absorbed,
                                 mask=None if mask is None else mask[:, : T - k, : T - k])
                if r is not None:
                    out.routing.append(r)
                out.mtp_hidden.append(module.shared_head.norm(prev))
                if logits:
                    out.mtp_logits.append(self.lm_head(out.mtp_hidden[-1]))
        return out

    def mtp_step(self, k: int, prev: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                 cache: LayerCache, kv_len: int | None = None, last: int | None = None
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One cached MTP depth for speculative decoding.

        prev [B, T, hidden] (main normed hidden for k=1), next_ids [B, T] tokens t_{i+k},
        positions [B, T] of the hidden states, cache: that MTP layer's LayerCache.
        Returns (logits [B, last, V] for t_{i+k+1} at the last `last` positions (all T if None; 0:
        no logits, None returned), block output [B, T, hidden] for depth k+1). A draft needs the
        logits of the newest position only: the output head is the step's largest matmul.
        """
        module = self.mtp[k - 1]
        cos, sin = self.rope(positions)
        h, _ = module(prev, self.embed_tokens(next_ids), cos, sin, cache, positions, kv_len)
        if last == 0:
            return None, h
        return self.lm_head(module.shared_head.norm(h if last is None else h[:, -last:])), h

    def num_params(self, active: bool = False) -> int:
        """Parameters of the main model (MTP excluded); active=True counts only the routed experts
        a token uses (num_experts_per_tok of n_routed_experts)."""
        total = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp."):
                continue
            n = p.numel()
            if active and ".experts." in name:
                n = n * self.args.num_experts_per_tok // self.args.n_routed_experts
            total += n
        return total

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "Transformer":
        """Load an HF-layout directory (see nanoseek.checkpoint.load)."""
        from ..checkpoint import load

        return load(path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_size: int = 2 << 30) -> None:
        """Write an HF-layout directory atomically (see nanoseek.checkpoint.save)."""
        from ..checkpoint import save

        save(self, path, max_shard_size=max_shard_size)
