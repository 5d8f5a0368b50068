"""Expert-placement planning (EPLB): valid placements that lower the busiest GPU's load."""

import json

import pytest
import torch

from nanoseek.parallel.eplb import balanced_packing, gpu_loads, identity_placement, imbalance, plan, replicate
from nanoseek.stages import plan_experts


def skewed(layers=3, experts=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(layers, experts, generator=gen) ** 4 * 100 + 1  # a few hot experts, a long cold tail


def test_balanced_packing_fills_every_pack_equally_and_balances():
    w = [9.0, 8, 7, 1, 1, 1, 1, 0.5]
    pack = balanced_packing(w, 4)
    assert sorted(pack.count(p) for p in range(4)) == [2, 2, 2, 2]
    loads = [sum(x for x, p in zip(w, pack) if p == q) for q in range(4)]
    assert max(loads) == 9.5  # the optimum: 9 must share a pack, at best with the 0.5
    with pytest.raises(ValueError, match="do not split evenly"):
        balanced_packing(w, 3)


def test_replicate_gives_extra_copies_to_the_hottest():
    assert replicate([10.0, 1.0, 1.0], 5) == [0, 1, 2, 0, 0]  # 10/2=5 still > 1, then 10/3=3.3 > 1
    assert replicate([1.0, 1.0], 2) == [0, 1]


@pytest.mark.parametrize("gpus,nodes,replicas,groups,hier", [(8, 2, 8, 4, True), (8, 1, 8, 4, False),
                                                               (4, 4, 4, 2, False), (16, 4, 16, 8, True)])
def test_plan_is_a_valid_assignment_that_lowers_max_over_mean(gpus, nodes, replicas, groups, hier):
    loads = skewed()
    L, E = loads.shape
    p = plan(loads, replicas, gpus, nodes, groups)
    assert p.hierarchical == hier
    assert p.phy2log.shape == (L, E + replicas)  # P slots, P/G on each GPU (GPU-major)
    for layer in range(L):
        counts = torch.bincount(p.phy2log[layer], minlength=E)
        assert torch.equal(counts, p.logcnt[layer]) and (counts >= 1).all() and counts.sum() == E + replicas
        assert p.logcnt[layer, loads[layer].argmax()] == p.logcnt[layer].max()  # the hottest has the most copies
        per_gpu = p.phy2log[layer].view(gpus, -1)
        if p.logcnt[layer].max() <= gpus // nodes:  # no GPU holds two copies of one expert while avoidable
            assert all(len(set(row.tolist())) == len(row) for row in per_gpu)
        if hier:  # every copy of a group's experts on the group's one node
            node_of_slot = torch.arange(E + replicas) // ((E + replicas) // nodes)
            group_of_slot = p.phy2log[layer] // (E // groups)
            assert all(len(set(node_of_slot[group_of_slot == g].tolist())) == 1 for g in range(groups))
    load = gpu_loads(loads, p)
    assert torch.allclose(load.sum(dim=1), loads.double().sum(dim=1))  # all load served, none twice
    before = imbalance(gpu_loads(loads, identity_placement(L, E, gpus)))
    after = imbalance(load)
    assert (after < before).all() and (after - 1).mean() < 0.5 * (before - 1).mean()  # half the excess gone


def test_plan_rejects_shapes_that_do_not_divide():
    with pytest.raises(ValueError, match="do not split evenly over 5 GPUs"):
        plan(skewed(), 0, 5)
    with pytest.raises(ValueError, match="not a multiple of --nodes 3"):
        plan(skewed(), 4, 8, 3)


def test_cli_reads_a_training_runs_metrics_and_writes_the_plan(tmp_path, capsys):
    loads = skewed(2, 8)
    recs = [{"kind": "train", "step": s, "load": (loads / loads.sum(1, keepdim=True)).tolist()} for s in range(3)]
    recs.insert(1, {"kind": "val", "step": 1, "val_loss": 3.0})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra')  # torn last line
    assert plan_experts.main(["--loads", str(path), "--gpus", "4", "--nodes", "2", "--replicas", "4",
                              "--groups", "2"]) == 0
    out = capsys.readouterr().out
    assert "hierarchical" in out and "max/mean before" in out
    doc = json.loads((tmp_path / "expert_plan.json").read_text())
    assert doc["slots_per_gpu"] == 3 and len(doc["layers"]) == 2
    assert all(sum(layer["logcnt"]) == 12 and len(layer["phy2log"]) == 12 for layer in doc["layers"])
    assert all(doc["max_mean_after"][i] < doc["max_mean_before"][i] for i in range(2))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"load": [[1, 2, 3, 4]]}))
    assert plan_experts.main(["--loads", str(path), "--gpus", "3"]) == 2
    assert "4 experts + 0 replicas = 4 slots do not split evenly over 3 GPUs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        plan_experts.main(["--loads", str(path), "--gpus", "0"])
    assert exc.value.code == 2 and "--gpus must be >= 1" in capsys.readouterr().err


def test_cli_missing_or_broken_loads(tmp_path, capsys):
    assert plan_experts.main(["--loads", str(tmp_path / "nope.json"), "--gpus", "2"]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert plan_experts.main(["--loads", str(bad), "--gpus", "2"]) == 2
    assert "not valid JSON" in capsys.readouterr().err

