"""Expert-placement planning for serving (DeepSeek-V3 §3.4 redundant experts; DeepSeek's EPLB).

From measured per-expert loads, place E logical experts plus R redundant copies on G GPUs (P = E + R
physical slots, P/G per GPU) so that the busiest GPU carries as little as possible:

    1. replicate: give the next copy to the expert with the largest load per copy, until R are given;
    2. pack: assign copies, heaviest first, to the least-loaded GPU that still has a free slot
       (every GPU ends with exactly P/G slots).

Hierarchical (when the node count divides the group count, as in V3's prefill units): first pack
whole expert *groups* onto nodes (group-limited routing then keeps a token's traffic within
`topk_group` nodes), then replicate and pack inside each node. Otherwise global: groups ignored,
one pool of G GPUs (V3's decode units).

A copy serves load/copies of its expert (requests are spread evenly over the copies). The quality
figure is max/mean GPU load per layer, before (experts 0..E-1 in order, E/G per GPU, no copies) and
after. Pure functions of tensors: no process group, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Placement:
    """phy2log [L, P]: the logical expert in each physical slot, GPU-major (slot s is on GPU s // (P/G));
    logcnt [L, E]: copies of each logical expert; hierarchical: whether groups were packed to nodes."""

    phy2log: torch.Tensor
    logcnt: torch.Tensor
    gpus: int
    nodes: int
    hierarchical: bool

    def log2phy(self) -> list[list[list[int]]]:
        """For each layer and logical expert, the physical slots holding it (what a router dispatches to)."""
        out = []
        for row in self.phy2log.tolist():
            slots: list[list[int]] = [[] for _ in range(self.logcnt.shape[1])]
            for s, e in enumerate(row):
                slots[e].append(s)
            out.append(slots)
        return out


def balanced_packing(weights: list[float], packs: int, labels: list[int] | None = None) -> list[int]:
    """Items -> packs with exactly len/packs items each, heaviest first into the lightest pack with room.

    labels: items with the same label (copies of one expert) avoid sharing a pack while they can:
    two copies on one GPU would not spread its load."""
    n = len(weights)
    if n % packs:
        raise ValueError(f"{n} items do not split evenly into {packs} packs")
    per, load, size = n // packs, [0.0] * packs, [0] * packs
    held: list[set] = [set() for _ in range(packs)]
    pack = [0] * n
    for i in sorted(range(n), key=lambda i: -weights[i]):
        room = [p for p in range(packs) if size[p] < per]
        if labels is not None:
            room = [p for p in room if labels[i] not in held[p]] or room
            held_label = labels[i]
        p = min(room, key=lambda p: load[p])
        pack[i], load[p], size[p] = p, load[p] + weights[i], size[p] + 1
        if labels is not None:
            held[p].add(held_label)
    return pack


def replicate(weights: list[float], slots: int) -> list[int]:
    """Logical expert of each of `slots` copies: one each, then the extras to the largest load per copy."""
    count = [1] * len(weights)
    out = list(range(len(weights)))
    for _ in range(slots - len(weights)):
        e = max(range(len(weights)), key=lambda e: weights[e] / count[e])
        count[e] += 1
        out.append(e)
    return out


def _place_layer(w: list[float], P: int, G: int, nodes: int, groups: int) -> list[int]:
    """phy2log of one layer: groups packed to nodes, then per node replicate and pack to its GPUs."""
    E = len(w)
    size = E // groups
    group_load = [sum(w[g * size:(g + 1) * size]) for g in range(groups)]
    node_of_group = balanced_packing(group_load, nodes)
    per_node, gpus_per_node, slots_per_gpu = P // nodes, G // nodes, P // G
    phy2log = [0] * P
    for node in range(nodes):
        experts = [e for g in range(groups) if node_of_group[g] == node for e in range(g * size, (g + 1) * size)]
        copies = [experts[i] for i in replicate([w[e] for e in experts], per_node)]
        count = {e: copies.count(e) for e in experts}
        gpu = balanced_packing([w[e] / count[e] for e in copies], gpus_per_node, labels=copies)
        fill = [0] * gpus_per_node
        for c, g in zip(copies, gpu):
            slot = (node * gpus_per_node + g) * slots_per_gpu + fill[g]
            phy2log[slot], fill[g] = c, fill[g] + 1
    return phy2log


def plan(loads: torch.Tensor, replicas: int, gpus: int, nodes: int = 1, groups: int = 1) -> Placement:
    """loads [L, E] (any non-negative measure) -> Placement of E + replicas copies on `gpus` GPUs.

    Hierarchical when nodes > 1 and nodes divides groups; global otherwise. Raises ValueError when
    the counts do not divide (the slots per GPU and per node must be whole numbers)."""
    loads = torch.as_tensor(loads, dtype=torch.float64)
    if loads.dim() == 1:
        loads = loads[None]
    L, E = loads.shape
    P = E + replicas
    if replicas < 0 or gpus < 1 or nodes < 1:
        raise ValueError("--replicas must be >= 0, --gpus and --nodes >= 1")
    if gpus % nodes:
        raise ValueError(f"--gpus {gpus} is not a multiple of --nodes {nodes}")
    if P % gpus:
        raise ValueError(f"{E} experts + {replicas} replicas = {P} slots do not split evenly over {gpus} GPUs")
    if E % groups:
        raise ValueError(f"{groups} groups do not divide {E} experts")
    if (loads < 0).any() or not torch.isfinite(loads).all():
        raise ValueError("loads must be finite and non-negative")
    hierarchical = nodes > 1 and groups % nodes == 0 and replicas % nodes == 0
    n, g = (nodes, groups) if hierarchical else (1, 1)
    rows = [_place_layer(layer, P, gpus, n, g) for layer in loads.tolist()]
    phy2log = torch.tensor(rows, dtype=torch.long)
    logcnt = torch.stack([torch.bincount(r, minlength=E) for r in phy2log])
    return Placement(phy2log=phy2log, logcnt=logcnt, gpus=gpus, nodes=nodes, hierarchical=hierarchical)


def gpu_loads(loads: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[L, G] load per GPU: each copy carries its expert's load / its copy count."""
    loads = torch.as_tensor(loads, dtype=torch.float64).reshape(placement.phy2log.shape[0], -1)
    per_copy = loads / placement.logcnt.clamp(min=1)
    slot_load = per_copy.gather(1, placement.phy2log)
    return slot_load.view(slot_load.shape[0], placement.gpus, -1).sum(dim=-1)


def identity_placement(layers: int, E: int, gpus: int) -> Placement:
    """Experts 0..E-1 in order, E/gpus per GPU, no copies: the plain EP layout."""
    if E % gpus:
        raise ValueError(f"{E} experts do not split evenly over {gpus} GPUs")
    return Placement(phy2log=torch.arange(E).repeat(layers, 1), logcnt=torch.ones(layers, E, dtype=torch.long),
                     gpus=gpus, nodes=1, hierarchical=False)


def imbalance(gpu_load: torch.Tensor) -> torch.Tensor:
    """max/mean GPU load per layer ([L, G] -> [L]); 1.0 is perfect."""
    return gpu_load.amax(dim=-1) / gpu_load.mean(dim=-1).clamp(min=1e-12)
