"""Pipeline parallelism with torch.distributed.pipelining: the model split into stages from outside.

    pipe = build_pipeline(model, mesh, micro_batch=2, seq_len=T, schedule="dualpipev", n_microbatches=8,
                          mtp_lambda=0.3, seq_alpha=1e-4)
    result = pipe.step(inputs, targets, optimizer, gamma=1e-3, grad_clip=1.0)

Stages. The main layers are cut into S contiguous stages (S = pp for 1F1B, 2·pp for DualPipeV);
stage 0 also holds the embedding, the last one the final norm, the MTP modules and the output head
(MTP shares embedding and head with the model, V3 §2.2). A stage's activations are a pair
(h [b, T, D], emb [b, T, D]): `emb` is the embedding output, carried along so that the MTP modules
on the last stage can take Emb(t_{i+k}) = emb[:, k:] without a second copy of the embedding, and its
gradient flows back to stage 0 with the rest.

DualPipeV (DeepSeek's DualPipe folded into a V: rank r holds stages r and S-1-r, so the embedding
and the head sit on the same rank) and 1F1B both come from PyTorch (`ScheduleDualPipeV`,
`Schedule1F1B`); nothing here schedules anything.

Balance terms. The sequence-wise balance loss of a layer inside stage s cannot be added to the last
stage's loss; each stage attaches it to its output with DeepSeek-V2's `AddAuxiliaryLoss` trick
(identity forward, gradient 1 into the auxiliary term backward). The per-expert loads each stage
counts are rows of one [L, E] tensor (main MoE layers, then MTP), summed over all ranks.

State-dict names. A stage keeps the Transformer's names (`layers` is a ModuleDict keyed by the
original layer index), so a rank's `module` (the union of its stages) saves and loads the same
keys as the whole model: checkpoints move between pipelined and flat layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining.schedules import _Action, _ComputationType, _PipelineScheduleRuntime

from nanoseek.model import Transformer
from nanoseek.model.moe import MoE
from nanoseek.train.balance import balance_loss
from nanoseek.train.loss import linear_cross_entropy

from .parallelize import clip_grad_norm_, global_counts, parallelize
from .step import StepResult, mean_over_ranks

SCHEDULES = ("1f1b", "dualpipev")


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on x; in the backward, also a gradient of 1 into `aux` (DeepSeek-V2's modeling code)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.clone()  # not a view: DualPipeV's split backward detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


class Stage(nn.Module):
    """Main layers `layer_ids` of `model` (+ embedding if first, + norm, MTP and head if last).

    forward: first stage input_ids [b, T]; others (h, emb) [b, T, D] each -> (h, emb), or on the
    last stage (hidden [b, T, D] after the norm, mtp_hidden_1 [b, T-1, D], ...).
    """

    def __init__(self, model: Transformer, layer_ids: list[int], first: bool, last: bool, seq_alpha: float = 0.0):
        super().__init__()
        self.args, self.first, self.last, self.seq_alpha = model.args, first, last, seq_alpha
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp = model.mtp if last else nn.ModuleList()
        self.register_buffer("inv_freq", model.inv_freq, persistent=False)
        self.rope_scale = model.rope_scale
        # Row of each MoE layer in the [L, E] loads (Output.routing order: main layers, then MTP).
        moe_main = [i for i, b in enumerate(model.layers) if isinstance(b.mlp, MoE)]
        self.rows = {str(i): moe_main.index(i) for i in layer_ids if i in moe_main}
        moe_mtp = [k for k, b in enumerate(model.mtp) if isinstance(b.mlp, MoE)]
        self.mtp_rows = [len(moe_main) + moe_mtp.index(k) if k in moe_mtp else None for k in range(len(self.mtp))]
        self.n_rows = len(moe_main) + len(moe_mtp)
        self.counts = torch.zeros(self.n_rows, model.args.n_routed_experts)
        self.balance = torch.zeros(())
        # Evaluation pads the micro-batches up to the schedule's minimum with copies: a stage runs its
        # micro-batches in order, so counting only the first `count_first` forwards leaves them out.
        self.count_first: int | None = None
        self.forwards = 0

    def reset_stats(self, count_first: int | None = None) -> None:
        """Zero the loads and the balance term before a schedule step (count_first: see __init__)."""
        self.counts.zero_()
        self.balance.zero_()
        self.count_first, self.forwards = count_first, 0

    def gates(self) -> list[tuple[int, nn.Module]]:
        """(row in the global loads, Gate) for every router this stage holds."""
        out = [(self.rows[k], b.mlp.gate) for k, b in self.layers.items() if k in self.rows]
        return out + [(row, b.mlp.gate) for row, b in zip(self.mtp_rows, self.mtp) if row is not None]

    def _routed(self, x: torch.Tensor, routing, row: int) -> torch.Tensor:
        if self.count_first is None or self.forwards <= self.count_first:  # forwards: this one included
            self.counts[row] += torch.bincount(routing.indices.flatten(),
                                               minlength=self.args.n_routed_experts).cpu().float()
        if self.seq_alpha > 0 and self.training and torch.is_grad_enabled():
            aux = self.seq_alpha * balance_loss([routing], x.shape[0], self.args.num_experts_per_tok)
            self.balance += aux.detach().cpu()
            x = AddAuxiliaryLoss.apply(x, aux)
        return x

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None):
        self.forwards += 1
        if self.first:
            h = emb = self.embed_tokens(h)
        B, T, _ = h.shape
        cos, sin = Transformer.rope(self, torch.arange(T, device=h.device).expand(B, T))  # the model's own RoPE
        for key, layer in self.layers.items():
            h, r = layer(h, cos, sin)
            if r is not None:
                h = self._routed(h, r, self.rows[key])
        if not self.last:
            return h, emb.clone()  # not the input nor a view: DualPipeV detaches stage outputs in place
        hidden = self.norm(h)
        outs, prev = [hidden], hidden
        for k, (module, row) in enumerate(zip(self.mtp, self.mtp_rows), start=1):
            if T - k <= 0:
                break
            prev, r = module(prev[:, : T - k], emb[:, k:], cos[:, : T - k], sin[:, : T - k])
            if r is not None:
                prev = self._routed(prev, r, row)
            outs.append(module.shared_head.norm(prev))
        return tuple(outs)


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous, as even as possible; earlier stages get the remainder (the last carries MTP + head)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_ids(schedule: str, pp: int, pp_rank: int) -> list[int]:
    """Stage indices this rank runs: [r] for 1F1B, [r, 2·pp-1-r] for the V-shaped DualPipeV."""
    return [pp_rank] if schedule == "1f1b" else [pp_rank, 2 * pp - 1 - pp_rank]


@dataclass
class Pipeline:
    """This rank's stages and their schedules. `module` holds the rank's parameters under the model's names.

    A torch schedule is built for a fixed number of micro-batches (the stages size their buffers by
    it), so `schedule(n)` builds one per n on first use: a batch ramp changes n between steps, and
    evaluation has its own forward-only one."""

    module: Stage
    stages: list[Stage]
    kind: str
    n_stages: int
    pp_group: object
    build: object  # build(n, micro_batch, train) -> torch schedule
    micro_batch: int
    mtp_lambda: float = 0.3
    n_main_rows: int = 0  # rows of the loads that belong to main layers (evaluation counts no MTP)
    _ce: list = field(default_factory=list)
    _mtp: list = field(default_factory=list)
    _schedules: dict = field(default_factory=dict)

    @property
    def has_last(self) -> bool:
        return any(s.last for s in self.stages)

    @property
    def has_first(self) -> bool:
        return any(s.first for s in self.stages)

    def schedule(self, n: int, micro_batch: int | None = None, train: bool = True):
        """The schedule for n micro-batches of `micro_batch` rows (built on first use; at most a few kept)."""
        key = (n, micro_batch or self.micro_batch, train)
        if key not in self._schedules:
            if len(self._schedules) >= 4:  # a batch ramp walks through many n: keep the newest ones
                del self._schedules[next(iter(self._schedules))]
            self._schedules[key] = self.build(*key)
        return self._schedules[key]

    def loss_fn(self, output, target: torch.Tensor) -> torch.Tensor:
        """Next-token + λ·MTP cross-entropy of one micro-batch, on the last stage (head fused in)."""
        hidden, *mtp_hidden = output
        head = self.module.lm_head.weight
        ce = linear_cross_entropy(hidden.flatten(0, 1), head, target.flatten())
        total, mtp = ce, torch.zeros((), device=ce.device)
        if mtp_hidden and self.mtp_lambda > 0:
            mtp = torch.stack([linear_cross_entropy(h.flatten(0, 1), head, target[:, k:].flatten())
                               for k, h in enumerate(mtp_hidden, start=1)]).mean()
            total = total + self.mtp_lambda * mtp
        self._ce.append(ce.detach())
        self._mtp.append(mtp.detach())
        return total

    def eval_loss_fn(self, output, target: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of one micro-batch from fp32 logits, as `evaluate` computes it."""
        logits = self.module.lm_head(output[0]).float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        self._ce.append(ce.detach())
        return ce

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor,
                         n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the schedule over this rank's rows (inputs/targets [n·micro, T], the same on every stage
        rank: only the first uses inputs, only the last targets); gradients are the mean over the n
        micro-batches. Returns this rank's (ce, mtp, balance) means over the micro-batches (ce and mtp
        nonzero on the last stage only, balance summed over this rank's stages) and its loads [L, E]
        (rows of its own layers); reduce both over ranks."""
        self._ce.clear()
        self._mtp.clear()
        for s in self.stages:
            s.reset_stats()
        device = next(self.module.parameters()).device
        kwargs = {"target": targets.to(device)} if self.has_last else {}
        args = (inputs.to(device),) if self.has_first else ()
        self.schedule(n).step(*args, **kwargs)
        local = torch.zeros(3)
        if self.has_last:
            local[0] = torch.stack(self._ce).sum().cpu() / n
            local[1] = torch.stack(self._mtp).sum().cpu() / n
        local[2] = sum(s.balance for s in self.stages) / n
        return local, sum(s.counts for s in self.stages)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, optimizer, *, gamma: float = 0.0,
             grad_clip: float = 1.0, zero_grad: bool = True) -> StepResult:
        """One optimizer step on this data-parallel rank's rows (inputs/targets [rows, T])."""
        local, counts = self.forward_backward(inputs, targets, inputs.shape[0] // self.micro_batch)
        # ce/mtp live on the last stage, balance terms on every stage: sum over ranks, then average
        # over the data-parallel ranks (sum over pp is a sum over disjoint parts).
        pp = self.pp_group.size() if self.pp_group is not None else 1
        ce, mtp, bal = (mean_over_ranks(local) * pp).tolist()
        counts = global_counts(counts)
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm_(params, grad_clip)
        skipped = not (math.isfinite(ce) and math.isfinite(grad_norm))
        if not skipped:
            optimizer.step()
            if gamma > 0:
                with torch.no_grad():
                    for s in self.stages:
                        for row, gate in s.gates():
                            if gate.e_score_correction_bias is not None:
                                load = counts[row].to(gate.e_score_correction_bias.device)
                                gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        return StepResult(ce=ce, mtp=mtp, balance=bal, grad_norm=grad_norm, counts=counts, skipped=skipped)

    @torch.no_grad()
    def evaluate(self, batches) -> tuple[float, torch.Tensor]:
        """`nanoseek.train.loss.evaluate` through the stages: mean next-token loss over `batches` of
        (inputs [b, T], targets [b, T]) and the loads [L_main, E] summed over them, on every rank of
        this pipeline (every data-parallel rank evaluates the same batches, as without a pipeline).

        Forward only (the schedule's `eval`), one row per micro-batch so a short last batch needs no
        padding; fewer rows than the schedule's minimum (its stage count) are padded with copies of
        the first, which are neither counted nor scored."""
        inputs = torch.cat([x for x, _ in batches])
        targets = torch.cat([y for _, y in batches])
        rows = inputs.shape[0]
        n = max(rows, self.n_stages)
        if n > rows:
            inputs = torch.cat([inputs, inputs[:1].expand(n - rows, -1)])
            targets = torch.cat([targets, targets[:1].expand(n - rows, -1)])
        self._ce.clear()
        for s in self.stages:
            s.reset_stats(count_first=rows)
            s.eval()
        device = next(self.module.parameters()).device
        try:
            kwargs = {"target": targets.to(device)} if self.has_last else {}
            args = (inputs.to(device),) if self.has_first else ()
            self.schedule(n, 1, train=False).eval(*args, **kwargs)
            counts = sum(s.counts for s in self.stages)[: self.n_main_rows].clone()
        finally:
            for s in self.stages:
                s.train()
                s.reset_stats()
        total = torch.zeros(1, dtype=torch.float64)
        if self.has_last:
            total[0] = torch.stack(self._ce[:rows]).double().sum().cpu()
        if self.pp_group is not None:  # the loss lives on the last stage, each layer's loads on its own
            dist.all_reduce(total, group=self.pp_group)
            dist.all_reduce(counts, group=self.pp_group)
        return total.item() / targets[:rows].numel(), counts

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Merge every pipeline rank's {name: tensor} (CPU) into one dict on every rank."""
        parts = [None] * self.pp_group.size()
        dist.all_gather_object(parts, {k: v.cpu() for k, v in tensors.items()}, group=self.pp_group)
        out = {}
        for p in parts:
            out.update(p)
        return out


class ForwardOnlyV(_PipelineScheduleRuntime):
    """Evaluation over DualPipeV's V placement (rank r holds stages r and 2·pp-1-r), forward only.

    torch's ScheduleDualPipeV has no forward-only mode (its overlapped forward/backward actions need
    a backward). This lists the forwards breadth-first per stage and lets torch's schedule runtime
    add the sends and receives and run them. torch's schedule check insists on a backward for every
    forward, so the order is lowered with backwards, which are then dropped with their messages."""

    FORWARD_ONLY = {_ComputationType.FORWARD, _ComputationType.SEND_F, _ComputationType.RECV_F,
                    _ComputationType.UNSHARD, _ComputationType.RESHARD}

    def __init__(self, stages: list, n_microbatches: int, loss_fn):
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        pp, n = self.pp_group_size, n_microbatches
        F, B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
        self._prepare_schedule_with_comms(
            {r: [_Action(s, F, i) for s in (r, 2 * pp - 1 - r) for i in range(n)]
             + [_Action(s, B, i) for s in (2 * pp - 1 - r, r) for i in range(n)] for r in range(pp)})
        self.pipeline_order_with_comms = {r: [a for a in order if a.computation_type in self.FORWARD_ONLY]
                                          for r, order in self.pipeline_order_with_comms.items()}


def build_pipeline(model: Transformer, mesh, micro_batch: int, seq_len: int, *, schedule: str, mtp_lambda: float,
                   n_microbatches: int | None = None, seq_alpha: float = 0.0, **parallel_flags) -> Pipeline:
    """Cut `model` into this rank's stages, parallelize them over the rest of the mesh (`parallel_flags`:
    `parallelize`'s bf16, activation_checkpoint, compile), and return the Pipeline that builds schedules.

    n_microbatches: micro-batches per step on this data-parallel rank, checked here (>= number of
    stages) when given; each step may use another count (`Pipeline.schedule`).
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose from {SCHEDULES}")
    pp_mesh = mesh["pp"]
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    n_stages = pp if schedule == "1f1b" else 2 * pp
    if model.args.num_hidden_layers < n_stages:
        raise ValueError(f"{schedule} with --pp {pp} needs {n_stages} stages, the model has only "
                         f"{model.args.num_hidden_layers} layers")
    if n_microbatches is not None and n_microbatches < n_stages:
        raise ValueError(f"{schedule} needs at least {n_stages} micro-batches per step, got {n_microbatches} "
                         f"(lower --micro-batch or raise --batch-size)")
    layers = split_layers(model.args.num_hidden_layers, n_stages)
    mine = stage_ids(schedule, pp, pp_rank)
    stages = [Stage(model, layers[s], s == 0, s == n_stages - 1, seq_alpha) for s in mine]
    module = Stage(model, sorted(i for s in mine for i in layers[s]), 0 in mine, n_stages - 1 in mine)
    for s in stages:
        parallelize(s, mesh, **parallel_flags)
    device = next(module.parameters()).device
    # Static shapes: without them the stages infer shapes by running a forward and backward on dummy
    # tensors, which would also count expert loads and call the loss.
    dtype = torch.bfloat16 if parallel_flags.get("bf16") else torch.float32
    D, T, K = model.args.hidden_size, seq_len, len(model.mtp)

    def build(n: int, m: int, train: bool):
        act = (torch.empty(m, T, D, dtype=dtype, device="meta", requires_grad=train),) * 2
        last_out = tuple(torch.empty(m, T - k, D, dtype=dtype, device="meta", requires_grad=train)
                         for k in range(K + 1) if T - k > 0)

        def stage(s: Stage, i: int) -> PipelineStage:
            inputs = (torch.empty(m, T, dtype=torch.long, device="meta"),) if s.first else act
            return PipelineStage(s, i, n_stages, device, input_args=inputs, output_args=last_out if s.last else act,
                                 group=pp_mesh.get_group())

        pipe_stages = [stage(s, i) for s, i in zip(stages, mine)]
        loss_fn = pipe.loss_fn if train else pipe.eval_loss_fn
        if schedule == "dualpipev":
            return (ScheduleDualPipeV(pipe_stages, n, loss_fn=loss_fn) if train
                    else ForwardOnlyV(pipe_stages, n, loss_fn))
        return (Schedule1F1B if train else ScheduleGPipe)(pipe_stages[0], n, loss_fn=loss_fn)

    moe_main = sum(model.args.is_moe_layer(i) for i in range(model.args.num_hidden_layers))
    pipe = Pipeline(module=module, stages=stages, kind=schedule, n_stages=n_stages, pp_group=pp_mesh.get_group(),
                    build=build, micro_batch=micro_batch, mtp_lambda=mtp_lambda, n_main_rows=moe_main)
    return pipe
