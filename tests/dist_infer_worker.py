"""One rank of the sharded-inference tests (tests/test_parallel_inference.py), or the one-process reference.

    python tests/dist_infer_worker.py '{"out": DIR, "cases": [{"name": "v3", "dir": MODEL_DIR}, ...],
                                        "bad": [{"name": ..., "dir": ...}, ...], "exit_on": MODEL_DIR}'

with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set as torchrun would. For each case, loads the
checkpoint with `load_sharded` and writes what `drive` returns plus the resident bytes
(DIR/NAME.rankR.safetensors + .json); with "shard_model": true the full model is loaded and
cut by `shard_model` instead. Each "bad" checkpoint must fail on every rank with the same
message (written to DIR/bad.rankR.json); `exit_on` is then loaded the way a CLI would, so a failure
exits 2 with one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nanoseek.checkpoint import CheckpointError
from nanoseek.checkpoint import load
from nanoseek.inference import Engine
from nanoseek.inference.cache import LatentCache
from nanoseek.parallel import fail, init_distributed, shutdown
from nanoseek.parallel.inference import load_sharded, resident_bytes, shard_model

LENGTHS = [5, 9, 3]  # a mixed-length batch, right-padded to the longest
DECODE_STEPS = 3


@torch.inference_mode()
def drive(model) -> dict[str, torch.Tensor]:
    """The calls the engine makes, on fixed random tokens (teacher-forced: no argmax feeds back):
    a naive prefill into the latent cache, absorbed decode steps over it, the full forward with the
    MTP heads, and cached MTP steps. -> {name: tensor}."""
    args = model.args
    gen = torch.Generator().manual_seed(7)
    B, L = len(LENGTHS), max(LENGTHS)
    ids = torch.randint(0, args.vocab_size, (B, L + DECODE_STEPS), generator=gen)
    dtype = model.embed_tokens.weight.dtype
    cache = LatentCache(args, args.num_hidden_layers, B, L + DECODE_STEPS, dtype, "cpu")
    positions = torch.arange(L).expand(B, L)
    out = model.run(ids[:, :L], positions=positions, cache=cache.layers, kv_len=L, absorbed=False)
    res = {"prefill": out.logits, "prefill_hidden": out.hidden}
    pos = torch.tensor(LENGTHS)[:, None]  # each row continues after its own prompt
    for step in range(DECODE_STEPS):
        tok = ids.gather(1, pos)
        dec = model.run(tok, positions=pos, cache=cache.layers, kv_len=int(pos.max()) + 1, absorbed=True)
        res[f"decode{step}"] = dec.logits
        pos = pos + 1
    if len(model.mtp):
        full = model.run(ids, mtp=True)
        res["full"] = full.logits
        res.update({f"mtp{k}": t for k, t in enumerate(full.mtp_logits)})
        mtp_cache = LatentCache(args, 1, B, L + 1, dtype, "cpu")
        logits, h = model.mtp_step(1, out.hidden, ids[:, 1 : L + 1], positions, mtp_cache.layers[0], kv_len=L)
        res["mtp_step"], res["mtp_step_hidden"] = logits, h
    # the engine itself, unchanged: greedy, MTP-speculative when the model has MTP modules
    engine = Engine(model, max_batch_size=2, max_seq_len=32, speculative="mtp" if len(model.mtp) else None,
                    compile=False)
    prompts = [ids[b, :n].tolist() for b, n in enumerate(LENGTHS)]
    res["engine_greedy"] = torch.tensor(engine.generate(prompts, max_new_tokens=6, ignore_eos=True))
    return {k: v.contiguous() for k, v in res.items()}


def main() -> int:
    from safetensors.torch import save_file

    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    for case in cfg.get("cases", []):
        if case.get("shard_model"):  # the whole model loaded on every rank, then cut
            model = shard_model(load(case["dir"]))
        else:
            model = load_sharded(case["dir"], dtype=case.get("dtype"))
        save_file(drive(model), str(out / f"{case['name']}.rank{d.rank}.safetensors"))
        (out / f"{case['name']}.rank{d.rank}.json").write_text(json.dumps({"resident_bytes": resident_bytes(model)}))
    messages = {}
    for case in cfg.get("bad", []):
        try:
            load_sharded(case["dir"], dtype=case.get("dtype"))
            messages[case["name"]] = None
        except CheckpointError as e:
            messages[case["name"]] = str(e)
    (out / f"bad.rank{d.rank}.json").write_text(json.dumps(messages))
    if cfg.get("exit_on"):
        try:
            load_sharded(cfg["exit_on"])
        except CheckpointError as e:
            raise fail("dist_infer_worker", e) from None
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
