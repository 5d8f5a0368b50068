"""Multi-device inference: one model sharded over the ranks of a torchrun job, loaded per rank.

    torchrun --nproc-per-node N -m nanoseek generate ...       (the runtime side: nanoseek/inference)

    d = init_distributed()                      # nanoseek.parallel.env: gloo on CPU, NCCL on GPU
    model = load_sharded(model_dir, dtype=None, device=None)
    resident_bytes(model)                       # this rank's parameter + buffer bytes

The model keeps the ordinary Transformer API (`run`, `mtp_step`, `embed_tokens`, `lm_head`, ...) and
gives full-vocabulary logits, bit-identical on every rank, PROVIDED every rank makes the same forward
calls with the same inputs (the runtime broadcasts each step's batch). All N ranks form one group;
the layout (the official DeepSeek-V3 demo's, plus expert parallelism):

* **MLA: tensor parallel over heads.** q_proj / q_b_proj and kv_b_proj are column-parallel (rank r
  holds heads [r*H/N, (r+1)*H/N) and `n_heads` = H/N), o_proj is row-parallel: each rank's output
  is a partial sum, and one all-reduce completes it. The down-projections (q_a_proj,
  kv_a_proj_with_mqa), their norms and the DSA indexer are replicated: they are small, and the
  latent they make is shared by all heads, so the **latent cache is complete on every rank**
  (layers x (kv_lora_rank + qk_rope_head_dim) values a token per rank, as on one device).
  Data-parallel attention (requests split over ranks, DeepSeek's own decode deployment) would keep
  one copy, 1/N of it per rank; we chose TP because every rank then runs the same step on the same
  batch, so the runtime stays one scheduler broadcasting one batch, and the head split also
  divides the attention weights (q_b, kv_b, o: the bulk of MLA's parameters) by N.
* **MoE: expert parallel, combined by all-reduce.** Rank r holds routed experts
  [r*E/N, (r+1)*E/N); the gate is replicated. Hidden states are replicated after attention, so
  every rank routes every token identically, runs only its own experts on the (token, expert)
  pairs routed to them, and the partial outputs are summed by one all-reduce, into which the
  shared experts' tensor-parallel partial sums are folded (one collective per MoE layer). The
  alternative, an all-to-all dispatch + combine, moves each token's K copies instead of one row per
  token and needs the split sizes on the host first (a sync): with replicated hidden states there
  is nothing to dispatch. (README "Multi-device inference: layout" has the measurement.)
* **Dense FFNs** (the first layers, and the shared experts): tensor parallel, gate/up
  column-parallel and down row-parallel over intermediate channels, one all-reduce.
* **Vocab parallel** embedding (rank r holds a slice of rows; a masked lookup, then an all-reduce)
  and output head (rank r computes its vocab slice of logits, an all-gather gives the full
  logits). The MTP modules use the main model's embedding and head, so they are sharded too.

Everything is applied from outside the model: parameters are replaced by their slices and a module
that must add one collective gets its class swapped for a subclass whose `forward` adds it (what
FSDP2's `fully_shard` does), so parameter names stay those of the checkpoint and
`isinstance(block.mlp, MoE)` still holds. Collectives are plain `torch.distributed` calls (gloo and
NCCL both have them) and graph breaks under torch.compile.

**Loading** (`load_sharded`): the model is built on the meta device, sharded, allocated at the
local shapes, and each rank reads only the tensors and row/column slices it owns from the HF
safetensors shards (`safe_open(...).get_slice`, memory-mapped): experts of other ranks are never
read. FP8 tensors are dequantised slice by slice with the block scales that cover the slice, or
with dtype="fp8" kept FP8 (the slice's blocks and their scales, as stored). Any
error on any rank (missing or mis-shaped tensor, bad shard, a layout that does not divide) stops
every rank with the same one-line CheckpointError naming the rank and the problem: the ranks agree
on the outcome with a collective before anyone returns, so none hangs waiting for a failed peer.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ..checkpoint import (FP8_DTYPES, CheckpointError, _check_shape, check_complete, default_dtype, dequantize_fp8,
                          internal_to_hf, load, open_shard, read_layout, route, weight_block)
from ..model.args import ModelArgs
from ..model.layers import MLP
from ..model.mla import MLA
from ..model.moe import Experts, MoE
from ..model.rope import inv_frequencies
from ..model.transformer import Block, Transformer
from ..quant.inference import FP8InferenceExperts, FP8InferenceLinear, to_fp8_inference
from .env import LayoutError


# --- collectives -----------------------------------------------------------------------------
@torch.compiler.disable  # a graph break: the collective runs eagerly between compiled pieces
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over all ranks, in place; the same bits on every rank (ring all-reduce, gloo and NCCL)."""
    x = x.contiguous()
    dist.all_reduce(x)
    return x


@torch.compiler.disable
def all_gather_last(x: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's x [..., n_r] along the last dim -> [..., total]; slices are
    ceil(total/N) wide except the last rank's, padded to that width for the collective."""
    width = -(-total // dist.get_world_size())
    x = F.pad(x, (0, width - x.shape[-1])).contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)[..., :total]


# --- the layout: which slice of each tensor a rank owns ------------------------------------------
def span(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's share [start, stop) of n units: ceil(n/N) each, the last rank takes what remains."""
    width = -(-n // world)
    return min(rank * width, n), min((rank + 1) * width, n)


_HEAD_ROWS = re.compile(r"self_attn\.(q_proj|q_b_proj|kv_b_proj)\.weight$")  # rows grouped by head
_HEAD_COLS = re.compile(r"self_attn\.o_proj\.weight$")  # columns grouped by head
_FFN_ROWS = re.compile(r"mlp\.(shared_experts\.)?(gate_proj|up_proj)\.weight$")
_FFN_COLS = re.compile(r"mlp\.(shared_experts\.)?down_proj\.weight$")
_EXPERTS = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)$")
_VOCAB = ("embed_tokens.weight", "lm_head.weight")


def owned_part(name: str, shape, args: ModelArgs, rank: int, world: int) -> tuple[int, int, int] | None:
    """(dim, start, stop): the slice of internal tensor `name` (full shape `shape`) this rank holds;
    None: replicated. Experts: dim 0 counts experts."""
    H = args.num_attention_heads
    if _EXPERTS.search(name) or name in _VOCAB or _FFN_ROWS.search(name):
        return (0, *span(shape[0], rank, world))
    if _FFN_COLS.search(name):
        return (1, *span(shape[1], rank, world))
    if _HEAD_ROWS.search(name) or _HEAD_COLS.search(name):
        dim = 0 if _HEAD_ROWS.search(name) else 1
        per_head = shape[dim] // H
        first, stop = span(H, rank, world)
        return dim, first * per_head, stop * per_head
    return None


def check_shardable(args: ModelArgs, world: int) -> None:
    """LayoutError (one line) unless heads and routed experts divide evenly over `world` ranks."""
    H, E = args.num_attention_heads, args.n_routed_experts
    if H % world:
        raise LayoutError(f"num_attention_heads={H} is not divisible by the {world} ranks (attention is split by heads)")
    has_moe = args.num_nextn_predict_layers or any(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    if has_moe and E % world:
        raise LayoutError(f"n_routed_experts={E} is not divisible by the {world} ranks (expert parallelism)")
    if args.vocab_size < world:
        raise LayoutError(f"vocab_size={args.vocab_size} is smaller than the {world} ranks")


# --- the sharded modules -----------------------------------------------------------------------
class HeadParallelMLA(MLA):
    """MLA over this rank's heads; o_proj's partial sums all-reduced. Only rank 0 keeps o_proj's bias."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return all_reduce(super().forward(*args, **kwargs))


class TensorParallelMLP(MLP):
    """A dense FFN over this rank's intermediate channels; down_proj's partial sums all-reduced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x))


class ExpertParallelMoE(MoE):
    """DeepSeekMoE whose experts are this rank's (LocalExperts) and shared experts a TP share:
    both give partial sums, completed by one all-reduce."""

    def forward(self, x: torch.Tensor):
        y, routing = super().forward(x)
        return all_reduce(y), routing


class _LocalExperts:
    """Routed experts [first, first + n_experts) of n_total; pairs routed elsewhere contribute zero.

    x [N, hidden], indices/weights [N, K] (global expert ids) -> this rank's partial sum [N, hidden].
    Mixed into the experts class it replaces (plain or FP8-resident), whose forward runs the pairs.
    """

    first: int
    n_total: int

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, K = indices.shape
        local = indices - self.first
        mine = (local >= 0) & (local < self.n_experts)
        if N * K <= self.n_total:
            # Decoding (the one-device engine's batched mat-vec path): every pair runs, the other
            # ranks' pairs with weight 0, so there is no host sync and no data-dependent shape.
            return self._few_tokens(x, local.clamp(0, self.n_experts - 1), weights.masked_fill(~mine, 0))
        token, slot = mine.nonzero(as_tuple=True)  # prefill: only this rank's (token, expert) pairs
        if token.numel() == 0:
            return torch.zeros_like(x)
        y = super().forward(x[token], local[token, slot, None], weights[token, slot, None])
        return torch.zeros_like(x).index_add_(0, token, y)


class LocalExperts(_LocalExperts, Experts):
    """This rank's share of `Experts` (gate_up_proj [E/N, 2*inter, hidden], down_proj [E/N, hidden, inter])."""


class LocalFP8Experts(_LocalExperts, FP8InferenceExperts):
    """This rank's share of FP8-resident experts (dtype="fp8": each projection [E/N, out, in] + scales)."""


class VocabParallelEmbedding(nn.Module):
    """Rows [start, stop) of the embedding; other ids look up zeros, an all-reduce fills them in.
    ids [...] -> [..., hidden]."""

    def __init__(self, weight: torch.Tensor, start: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.vocab_size = start, vocab_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return all_reduce(out.masked_fill(~mine[..., None], 0))


class VocabParallelHead(nn.Module):
    """Rows [start, stop) of the output head: this slice's logits, all-gathered to the full vocabulary.
    x [..., hidden] -> [..., vocab_size]."""

    def __init__(self, weight: torch.Tensor, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(F.linear(x, self.weight), self.vocab_size)


def _shard(model: Transformer, rank: int, world: int, copy: bool) -> Transformer:
    """Replace parameters by this rank's slices (clones when `copy`, so the full tensors can be freed;
    views on the meta device) and swap in the sharded modules. In place; returns `model`."""
    args = model.args
    check_shardable(args, world)

    def cut(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
        piece = t.narrow(dim, start, stop - start)
        return piece.clone() if copy else piece

    with torch.no_grad():
        for name, p in model.named_parameters():
            part = owned_part(name, p.shape, args, rank, world)
            if part is not None:
                p.data = cut(p.data, *part)
        for name, module in model.named_modules():  # FP8-resident holders (dtype="fp8"): buffers, not parameters
            if isinstance(module, FP8InferenceLinear):
                part = owned_part(name + ".weight", module.weight_fp8.shape, args, rank, world)
                if part is not None:
                    dim, start, stop = part
                    _check_block_aligned(name, part, module.weight_fp8.shape, module.block, rank)
                    b = module.block[dim]
                    module.weight_fp8 = cut(module.weight_fp8, *part)
                    module.weight_fp8_scale_inv = cut(module.weight_fp8_scale_inv, dim, start // b, -(-stop // b))
                    module.out_features, module.in_features = module.weight_fp8.shape
            elif isinstance(module, FP8InferenceExperts):
                start, stop = span(module.n_experts, rank, world)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    for buf in (proj, proj + "_scale_inv"):
                        setattr(module, buf, cut(getattr(module, buf), 0, start, stop))
    for module in model.modules():
        if isinstance(module, MLA):
            module.n_heads = args.num_attention_heads // world
            module.__class__ = HeadParallelMLA
        elif isinstance(module, Block) and type(module.mlp) is MLP:
            module.mlp.__class__ = TensorParallelMLP
        elif isinstance(module, MoE):
            module.__class__ = ExpertParallelMoE
            experts = module.experts
            fp8 = isinstance(experts, FP8InferenceExperts)
            experts.__class__ = LocalFP8Experts if fp8 else LocalExperts
            experts.n_total = experts.n_experts
            experts.n_experts = (experts.gate_proj if fp8 else experts.gate_up_proj).shape[0]
            experts.first = rank * experts.n_experts
    start = span(args.vocab_size, rank, world)[0]
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight.data, start, args.vocab_size)
    model.lm_head = VocabParallelHead(model.lm_head.weight.data, args.vocab_size)
    return model


def _check_block_aligned(name: str, part, shape, block, rank: int) -> None:
    """FP8-resident slices keep the checkpoint's blocks (and their scales) whole: a slice must start
    and end on block edges (the tensor's own end excepted). DeepSeek-V3's do at 8 and 16 ranks."""
    dim, start, stop = part
    b = block[dim]
    if start % b or (stop % b and stop != shape[dim]):
        raise LayoutError(f"dtype='fp8' keeps {block[0]}x{block[1]} FP8 blocks whole, but rank {rank}'s slice "
                          f"[{start}, {stop}) of {name} (dim {dim}) cuts one; load with a float dtype instead")


def _rank0_only_biases(model: Transformer, rank: int) -> None:
    """o_proj's bias (attention_bias) is added once, by rank 0, to the all-reduced sum."""
    if rank:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, MLA) and module.o_proj.bias is not None:
                    module.o_proj.bias.zero_()


def shard_model(model: Transformer) -> Transformer:
    """Shard an already loaded full model over the process group, in place (every rank must hold the
    same weights, e.g. the same checkpoint or seed). One process: returned unchanged."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    rank, world = dist.get_rank(), dist.get_world_size()
    _shard(model, rank, world, copy=True)
    _rank0_only_biases(model, rank)
    return model.eval()


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (each tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# --- loading per rank ----------------------------------------------------------------------------
def load_sharded(path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Transformer:
    """Load an HF-layout directory with this rank reading only what it owns (see the module docstring).

    Needs the process group of nanoseek.parallel.env.init_distributed; without one (or with one
    rank) it is `nanoseek.checkpoint.load`. dtype None: float32 on CPU, the checkpoint's dtype on
    GPU; "fp8": the layers DeepSeek-V3 stores in FP8 stay FP8 + block scales in memory
    (nanoseek/quant/inference.py; each rank's slices must then be whole blocks, as DeepSeek-V3's are
    at 8 and 16 ranks); device None: this rank's GPU under NCCL, else the CPU. Raises CheckpointError on every rank,
    with the same message, when any rank fails.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return load(path, dtype=dtype, device=device or "cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    nccl = dist.get_backend() == "nccl"
    comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")  # where collectives run
    device = comm if device is None else torch.device(device)
    model, error = None, None
    try:
        model = _load_part(Path(path), dtype, device, rank, world)
    except Exception as e:  # noqa: BLE001 - every failure must reach the agreement below, or peers hang
        error = e
    message = _agree(error, rank, world, comm)
    if message is not None:
        if error is not None and not isinstance(error, (CheckpointError, ValueError, OSError)):
            raise error  # a bug on this rank: keep its traceback (the peers got the one line)
        raise CheckpointError(message)
    return model


def _agree(error: Exception | None, rank: int, world: int, device: torch.device) -> str | None:
    """Every rank learns whether any rank failed and, if so, the lowest failing rank's message."""
    failed = torch.tensor([rank if error is not None else world], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    src = int(failed.item())
    if src == world:
        return None
    size = 1024
    buf = torch.zeros(size, dtype=torch.uint8, device=device)
    if rank == src:
        text = " ".join(str(error).split()) or type(error).__name__
        data = f"rank {rank}: {text}".encode()[:size]
        buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src)
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode(errors="replace")


def _load_part(path: Path, dtype, device: torch.device, rank: int, world: int) -> Transformer:
    args, files, weight_map = read_layout(path)
    check_shardable(args, world)
    fp8_resident = dtype == "fp8"
    dtype = default_dtype(args, device) if dtype is None or fp8_resident else dtype
    block = weight_block(args)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    full_shapes = {name: tuple(t.shape) for name, t in internal_to_hf(model)}
    full_params = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    fp8_slots = to_fp8_inference(model, dtype, block) if fp8_resident else {}
    E = args.n_routed_experts
    first, stop = span(E, rank, world)
    expected = {n for n in full_shapes if not _foreign_expert(n, args, first, stop)}
    _shard(model, rank, world, copy=False)
    model = model.to_empty(device=device)
    for module in model.modules():  # the balancing bias stays fp32 whatever the compute dtype
        if getattr(module, "e_score_correction_bias", None) is not None:
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    params = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    known = params.keys() | fp8_slots.keys()
    for file in files:  # one file mapped at a time: its pages leave this rank's memory when it closes
        with open_shard(file) as f:
            keys = set(f.keys())
            names = keys | set(weight_map or ())
            for name in sorted(keys):
                target = route(file, name, names, args, known)
                if target == "scale":
                    continue
                if name in seen:
                    raise CheckpointError(f"{file}: tensor {name!r} appears in more than one shard")
                if name not in expected:  # another rank's expert: never read
                    continue
                seen.add(name)
                try:
                    sl = f.get_slice(name)
                    shape = tuple(sl.get_shape())
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
                _check_shape(file, name, shape, full_shapes[name])
                if target is None:  # an MTP module's copy of the shared embedding / head
                    continue
                pname, sub = target
                part = None if sub is not None else owned_part(pname, full_params[pname], args, rank, world)
                holder = fp8_slots.get(pname)
                t, scale = _read(file, f, weight_map, name, sl, keys, part, block, keep_fp8=holder is not None)
                if holder is not None:  # FP8-resident: kept as stored (quantised if the file is not FP8)
                    try:
                        holder.load(None if sub is None else (sub[0] - first, *sub[1:]), t, scale)
                    except ValueError as e:
                        raise CheckpointError(f"{file}: {name}: {e}") from None
                    continue
                p = params[pname]
                with torch.no_grad():
                    if sub is None:
                        p.copy_(t.to(p.dtype))
                    else:
                        expert, start, stop_row = sub
                        dst = p[expert - first, start:stop_row] if stop_row is not None else p[expert - first]
                        dst.copy_(t.to(p.dtype))
    check_complete(path, expected, seen)
    model.inv_freq.copy_(inv_frequencies(args)[0])  # non-persistent buffer: not in the file
    _rank0_only_biases(model, rank)
    return model.eval()


_EXPERT_NAME = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _foreign_expert(name: str, args: ModelArgs, first: int, stop: int) -> bool:
    m = _EXPERT_NAME.search(name)
    return m is not None and not first <= int(m.group(1)) < stop


def _read(file, f, weight_map, name, sl, keys, part, block, keep_fp8: bool):
    """This rank's part (dim, start, stop) of tensor `name` (all of it for None) -> (tensor, None),
    FP8 dequantised; with keep_fp8, (FP8 part, the scales of its blocks) (the part is block-aligned)."""
    try:
        fp8 = sl.get_dtype() == "F8_E4M3"
        if not fp8:
            return _narrow(sl, part), None
        scale_name = name + "_scale_inv"

        def scales(rows) -> torch.Tensor:  # rows: (dim, first block, stop block) of the scale grid, or None
            if scale_name in keys:
                return _narrow(f.get_slice(scale_name), rows)
            if scale_name in (weight_map or {}):
                # Real checkpoints are sharded by size: a scale can sit in another shard than its weight.
                with open_shard(weight_map[scale_name]) as other:
                    return _narrow(other.get_slice(scale_name), rows)
            raise CheckpointError(f"{file}: FP8 tensor {name!r} has no {scale_name}")

        if keep_fp8:
            if part is None:
                return sl[:], scales(None)
            dim, start, stop = part
            return _narrow(sl, part), scales((dim, start // block[dim], -(-stop // block[dim])))
        return _dequantize_part(sl, scales, part, block), None
    except CheckpointError:
        raise
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"{file}: {name}: {e}") from None


def _narrow(sl, part) -> torch.Tensor:
    if part is None:
        return sl[:]
    dim, start, stop = part
    return sl[start:stop] if dim == 0 else sl[:, start:stop]


def _dequantize_part(sl, scales, part, block) -> torch.Tensor:
    """Dequantise rows/columns [start, stop) of an FP8 weight: read the block-aligned range that
    covers them with its scales (at most one partial block more at each end), then cut."""
    if part is None:
        return dequantize_fp8(sl[:], scales(None), block)
    dim, start, stop = part
    size, b = sl.get_shape()[dim], block[dim]
    lo, hi = start // b * b, min(-(-stop // b) * b, size)
    q = _narrow(sl, (dim, lo, hi))
    s = scales((dim, lo // b, -(-hi // b)))
    if q.dtype not in FP8_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not FP8")
    return dequantize_fp8(q, s, block).narrow(dim, start - lo, stop - start)


__all__ = ["load_sharded", "shard_model", "resident_bytes", "check_shardable", "owned_part", "span"]
