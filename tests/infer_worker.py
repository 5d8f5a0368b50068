"""One rank of the multi-rank engine test (tests/test_distributed_inference.py), or the one-process run.

    python tests/infer_worker.py MODEL_DIR OUT_DIR      # with RANK / WORLD_SIZE / MASTER_* set as torchrun would

Rank 0 drives `script` on its engine and writes OUT_DIR/rank0.json (the tokens of every case);
each follower replays it and writes OUT_DIR/rankR.json: how many of rank 0's tokens it had
computed differently itself (every case is greedy or seeded, so with identical logits: none).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nanoseek.inference import SamplingParams
from nanoseek.inference.distributed import Runtime

# Mixed lengths, more prompts than slots: requests join and leave the running batch.
PROMPTS = [[1, 5, 9, 13, 2, 7, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [3, 4], [60, 61, 62, 63, 64, 65, 66],
           [7] * 30, [11, 12, 13], [2, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100]]
NEW = 10
SLOTS = 3


def script(engine) -> dict:
    """What rank 0 (or one process) does with its engine: returns {case: tokens}."""
    out = {}
    out["greedy"] = engine.generate(PROMPTS, max_new_tokens=NEW, speculative=None)
    out["greedy_mtp"] = engine.generate(PROMPTS, max_new_tokens=NEW, speculative="mtp")
    out["seeded"] = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0.9, top_k=40, seed=7, speculative=None)
    out["seeded_mtp"] = engine.generate(PROMPTS, max_new_tokens=NEW, temperature=0.9, top_p=0.9, seed=7,
                                        speculative="mtp")
    # By hand, as a server does: requests join between steps and one is cancelled half way.
    engine.set_speculative(None)
    tokens: dict[int, list[int]] = {}
    rids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in PROMPTS[:2]]
    for step in range(6):
        for ev in engine.step():
            tokens.setdefault(ev.request_id, []).append(ev.token_id)
        if step == 1:
            rids.append(engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=NEW)))
        if step == 2:
            engine.cancel(rids[0])
    while engine.num_active:
        for ev in engine.step():
            tokens.setdefault(ev.request_id, []).append(ev.token_id)
    out["by_hand"] = [tokens[r] for r in rids]
    return out


def main() -> int:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    rt = Runtime.start("cpu")
    model = rt.load(model_dir)
    if rt.leader:
        rt.lead()
        result = script(rt.engine(model, max_batch_size=SLOTS, max_seq_len=64, compile=False))
        rt.close(0)
        (out / "rank0.json").write_text(json.dumps(result))
        return 0
    code = rt.follow(model)
    (out / f"rank{rt.dist.rank}.json").write_text(json.dumps({"replaced": rt.replaced}))
    rt.close(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
