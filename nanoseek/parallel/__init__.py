"""Scale-out training on PyTorch's own distributed stack (torchrun, DeviceMesh, FSDP2, pipelining, DCP).

    env.py          process group from the torchrun environment, rank-0 printing, the layout flags
                    (--dp-shard, --ep, --pp) checked against the world size, the DeviceMesh
    parallelize.py  parallelize(model, mesh, ...): EP, activation checkpointing, compile, FSDP2,
                    applied from outside the model; a layout-agnostic grad-norm clip; global loads
    expert.py       expert parallelism: all_to_all_single dispatch/combine around grouped GEMMs
    step.py         one optimizer step for the data/expert-parallel layouts
    pipeline.py     torch.distributed.pipelining stages and schedules (1F1B, DualPipeV)
    checkpoint.py   sharded DCP checkpoints (each rank writes its shards), resumable at another
                    layout; export to the HF layout
    inference.py    sharded inference: MLA heads tensor-parallel, experts expert-parallel, vocab-parallel
                    embedding and head; load_sharded reads each rank's slices straight from the HF files
    eplb.py         expert-placement planning for serving (DeepSeek's EPLB: packing, replication,
                    hierarchical placement), a pure function of the recorded loads

DeepSeek-V3's pre-training layout (report §3.2): 2048 H800 GPUs, PP16 (DualPipe) x EP64 (over 8
nodes) x ZeRO-1 DP, no tensor parallelism. Here the same three degrees are flags; ZeRO-1 becomes
FSDP2 (ZeRO-3) because that is what PyTorch ships.
"""

from .env import (Dist, Layout, LayoutError, agree, any_rank, build_mesh, check_layout, fail, init_distributed,
                  print0, quiet_other_ranks, shutdown, torchrun_world)
from .parallelize import clip_grad_norm_, global_counts, parallelize

__all__ = ["Dist", "Layout", "LayoutError", "agree", "any_rank", "build_mesh", "check_layout", "fail",
           "init_distributed", "print0", "quiet_other_ranks", "shutdown", "torchrun_world", "parallelize",
           "clip_grad_norm_", "global_counts"]
