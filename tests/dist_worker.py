"""One rank of a multi-process test (tests/test_parallel.py), or the one-process reference.

    python tests/dist_worker.py '{"runs": [{"name": "ep2", "layout": {"ep": 2}}], "steps": 3, "out": "DIR", ...}'

with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set as torchrun would. For each run (one process
group, a new DeviceMesh per run) trains a tiny MoE model for a few steps on a fixed random global
batch and writes, on every rank, the global losses, the full parameters and the last step's full
gradients (DIR/NAME.rankR.safetensors + .json) for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nanoseek.model import Transformer, preset
from nanoseek.parallel import (Dist, build_mesh, check_layout, fail, init_distributed, parallelize, shutdown,
                               torchrun_world)
from nanoseek.parallel.checkpoint import load_sharded, save_sharded
from nanoseek.parallel.parallelize import full_grads, full_state_dict, max_ranks_reached
from nanoseek.parallel.step import train_step

# 4 layers (1 dense), 8 experts in 2 groups of which a token reaches 1 (so with EP=2 one rank), 1 MTP module.
MODEL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
             topk_group=1, num_nextn_predict_layers=1, initializer_range=0.05, torch_dtype="float32")


def batches(cfg: dict, step: int) -> torch.Tensor:
    """The global batch of a step: LongTensor[batch, seq+1], the same on every rank and layout."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, MODEL["vocab_size"], (cfg["batch"], cfg["seq"] + 1), generator=gen)


def run(cfg: dict, d: Dist) -> dict:
    """Train cfg["steps"] steps; returns {"losses", "max_ranks", "params", "grads"} (full tensors)."""
    args = preset("tiny", **{**MODEL, **cfg.get("model", {})})
    lay = cfg.get("layout", {})
    layout = check_layout(d.world_size, lay.get("dp_shard"), lay.get("ep", 1), lay.get("pp", 1), args,
                          micro_batch=cfg["micro"], batch_size=cfg["batch"])
    mesh = build_mesh(layout, d)
    torch.manual_seed(0)
    model = Transformer(args)
    model.train()
    if layout.pp > 1:
        from nanoseek.parallel.pipeline import build_pipeline

        pipe = build_pipeline(model, mesh, cfg["micro"], cfg["seq"], schedule=cfg.get("schedule", "1f1b"),
                              n_microbatches=cfg["batch"] // cfg["micro"], mtp_lambda=0.3,
                              seq_alpha=cfg.get("seq_alpha", 1e-2))
        model = pipe.module
    else:
        parallelize(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    start = load_sharded(cfg["resume"], model, optimizer)["step"] if cfg.get("resume") else 0
    dp, dp_rank = (mesh["dp"].size(), mesh["dp"].get_local_rank()) if mesh is not None else (1, 0)
    rows = cfg["batch"] // dp
    losses, max_ranks = [], 0
    for step in range(start, cfg["steps"]):
        last = step == cfg["steps"] - 1
        ids = batches(cfg, step)[dp_rank * rows:(dp_rank + 1) * rows]
        if layout.pp > 1:
            res = pipe.step(ids[:, :-1], ids[:, 1:], optimizer, gamma=0.01, grad_clip=1.0, zero_grad=not last)
        else:
            micro = [(x[:, :-1], x[:, 1:]) for x in ids.split(cfg["micro"])]
            res = train_step(model, optimizer, micro, mtp_lambda=0.3, seq_alpha=cfg.get("seq_alpha", 1e-2),
                             gamma=0.01, grad_clip=1.0, zero_grad=not last)
            max_ranks = max(max_ranks, max_ranks_reached(model))
        losses.append([res.ce, res.mtp, res.grad_norm])
    if cfg.get("save"):
        save_sharded(cfg["save"], model, optimizer, args, {"step": cfg["steps"]})
    params, grads = full_state_dict(model), full_grads(model)
    if layout.pp > 1:
        params, grads = pipe.gather(params), pipe.gather(grads)
    return {"losses": losses, "max_ranks": max_ranks, "params": params, "grads": grads}


def main() -> int:
    from safetensors.torch import save_file

    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    torch.set_num_threads(1)
    try:  # every rank checks every layout before any collective: a bad one exits at once, no hang
        for spec in cfg["runs"]:
            lay = spec.get("layout", {})
            check_layout(torchrun_world()[1], lay.get("dp_shard"), lay.get("ep", 1), lay.get("pp", 1),
                         preset("tiny", **{**MODEL, **spec.get("model", {})}), cfg["micro"], cfg["batch"])
    except ValueError as e:  # LayoutError: one line on every rank, exit 2
        raise fail("dist_worker", e) from None
    d = init_distributed("cpu")
    for spec in cfg["runs"]:
        result = run({**cfg, **spec}, d)
        save_file({f"params/{k}": v.contiguous() for k, v in result["params"].items()}
                  | {f"grads/{k}": v.contiguous() for k, v in result["grads"].items()},
                  str(out / f"{spec['name']}.rank{d.rank}.safetensors"))
        (out / f"{spec['name']}.rank{d.rank}.json").write_text(
            json.dumps({"losses": result["losses"], "max_ranks": result["max_ranks"]}))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
