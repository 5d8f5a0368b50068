"""SFT and evaluation throughput: `nanoseek sft` against TRL's SFTTrainer, `nanoseek eval`'s sampler
against transformers' `generate`; same model, same data, one run.

    nanoseek bench sft                                    # tiny preset, 256 conversations, seq 512, batch 8
    nanoseek bench sft --rounds 2 --steps 6 --eval-problems 8 --set num_hidden_layers=2
    pip install trl                                       # the peer (a bench-only dependency)

**SFT.** The data: worked solutions of 3-digit arithmetic (nanoseek/rl/tasks.py) as chat rows,
encoded once by `encode_chat` (assistant-only loss mask) with a BPE trained on them; the model: the
preset with random weights, saved in the HF layout, which TRL loads as `DeepseekV3ForCausalLM`
(SDPA attention, grouped_mm experts). Both sides get the same token ids and loss masks (TRL as a
pre-tokenized dataset with `assistant_masks`), the same sequence length, rows per step, packing
(nanoseek: first-fit rows, positions restart and `doc_ids` block attention across conversations;
TRL: `packing=True` with its BFD strategy, which is padding-free: position_ids restart and, with
use_cache off, transformers builds the block-diagonal mask from them — checked here on a packed
batch before timing), AdamW (β 0.9/0.95, wd 0.1, fused), warm-up + cosine, clip 1.0, fp32 on CPU.
The main model only on both sides (TRL has no MTP: nanoseek runs with --mtp-lambda 0 and
--freeze-bias), plus a reference row: nanoseek's defaults (MTP λ 0.1 trained, bias updates).

tokens/s = conversation tokens (padding excluded) of the timed steps / their summed step times;
the first --warmup steps of each run are not timed. nanoseek's step time is its own loop's (pack,
forward, backward, update); TRL's is from `on_step_begin` to `on_step_end` (forward, backward,
update; its collation happens before and is not counted). The peers take turns, --rounds runs each,
and each one's best run counts, with the range over runs: interference on a shared machine only
ever slows a run down.

**Evaluation.** --eval-problems arithmetic test prompts × k = 8 samples (temperature 0.6, top-p
0.95, --eval-tokens new tokens at most) through `nanoseek.eval.runner.sample_problems` (the engine,
continuous batching, --eval-batch requests at a time), against transformers' `generate` with
`num_return_sequences=8` on batches of the same prompts (left-padded, the same number of
sequences in flight). Completions/s and generated tokens/s, best of --rounds, taking turns.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.bench import vs_trl
from nanoseek.bench.decode import cpu_pressure
from nanoseek.data import train_bpe
from nanoseek.data.chat import encode_chat
from nanoseek.model import Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.rl.tasks import arithmetic, worked_solutions


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanoseek bench sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=256, help="training conversations")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per optimizer step")
    p.add_argument("--eval-problems", type=int, default=16, help="prompts for the evaluation throughput (0: skip)")
    p.add_argument("--eval-tokens", type=int, default=64, help="new tokens per completion at most")
    p.add_argument("--eval-batch", type=int, default=32, help="sequences decoded together")
    return vs_trl.parse_args(p, argv, ("conversations", "seq_len", "batch_size", "eval_tokens", "eval_batch"))


def setup(a, root: Path):
    """Chat JSONL, BPE tokenizer, the random model in HF layout, encoded conversations."""
    rows = worked_solutions(arithmetic(a.conversations, seed=0, digits=3))
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe([json.dumps(r) for r in rows], vocab_size=1024)
    tok.save(root / "tok")
    torch.manual_seed(0)
    args = preset(a.preset, **{**parse_overrides(a.overrides), "vocab_size": tok.vocab_size,
                               "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}).replace(torch_dtype="float32")
    model = Transformer(args)
    model.save_pretrained(root / "model")
    tok.save(root / "model")
    convs = [encode_chat(tok, r["messages"]) for r in rows]
    return tok, model, convs


def nanoseek_run(a, root: Path, mtp: bool):
    """One `nanoseek sft` run of --steps steps; returns (conversation tokens/s, steps timed)."""
    from nanoseek.stages import sft as sft_stage

    out = Path(tempfile.mkdtemp(dir=root, prefix="ns-"))
    flags = ["--model", root / "model", "--data", root / "chat.jsonl", "--out", out, "--seq-len", a.seq_len,
             "--batch-size", a.batch_size, "--tokens", (a.steps + 1) * a.batch_size * a.seq_len, "--stop-at", a.steps, "--lr", "1e-3", "--warmup",
             "0.03", "--eval-every", "0", "--samples", "0", "--quiet", "--val-fraction", "0.02"]
    flags += [] if mtp else ["--mtp-lambda", "0", "--freeze-bias"]
    steps = vs_trl.run_stage(sft_stage.main, flags, a.warmup, "sft")
    return sum(r["data_tokens"] for r in steps) / sum(r["step_s"] for r in steps)


def trl_run(a, root: Path, tok, convs):
    """One TRL SFTTrainer run of --steps steps on the same ids and masks; conversation tokens/s."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="sdpa")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(root / "tok")
    data = Dataset.from_dict({"input_ids": [ids for ids, _ in convs],
                              "assistant_masks": [[int(m) for m in mask] for _, mask in convs]})
    config = SFTConfig(output_dir=str(Path(tempfile.mkdtemp(dir=root, prefix="trl-"))), max_steps=a.steps,
                       per_device_train_batch_size=a.batch_size, max_length=a.seq_len, packing=True,
                       packing_strategy="bfd", learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03,
                       weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch_fused",
                       use_cpu=True, bf16=False, fp16=False, save_strategy="no", report_to=[], logging_steps=10**6,
                       disable_tqdm=True, dataloader_num_workers=0, seed=0, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=hf_tok)
    return vs_trl.trl_tokens_per_s(trainer, model, lambda kw: kw["input_ids"].numel(), a.warmup)


def check_trl_packing(root: Path) -> float:
    """Max |Δlogit| between transformers on a packed pair (position_ids restart, use_cache off, as TRL
    calls it) and on each conversation alone: TRL's padding-free rows must not attend across."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="sdpa").eval()
    x, y = torch.randint(3, 100, (1, 9)), torch.randint(3, 100, (1, 6))
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        alone = torch.cat([hf(x, use_cache=False).logits, hf(y, use_cache=False).logits], dim=1)
        packed = hf(torch.cat([x, y], dim=1), position_ids=pos, use_cache=False).logits
    return (alone - packed).abs().max().item()


def eval_runs(a, tok, model, root: Path):
    """run() closures for nanoseek's sampler and transformers' generate: completions/s, tokens/s."""
    from transformers import AutoModelForCausalLM

    from nanoseek.eval.runner import build_prompt, sample_problems

    problems = arithmetic(a.eval_problems, seed=0, split="test", digits=3)
    prompts = [build_prompt(tok, p) for p in problems]
    k = 8
    hf = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="sdpa").eval()
    model = model.eval()

    def ours():
        t0 = time.perf_counter()
        out = sample_problems(model, tok, prompts, k, a.eval_tokens, 0.6, 0.95, seed=0, batch_size=a.eval_batch,
                              progress=False)
        dt = time.perf_counter() - t0
        return {"completions_s": len(prompts) * k / dt, "tok_s": sum(len(s.tokens) for o in out for s in o) / dt}

    per_call = max(1, a.eval_batch // k)  # prompts per generate call: eval_batch sequences in flight

    def theirs():
        t0, new = time.perf_counter(), 0
        for i in range(0, len(prompts), per_call):
            group = prompts[i:i + per_call]
            width = max(len(p) for p in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=0.6, top_p=0.95, top_k=0,
                                  num_return_sequences=k, max_new_tokens=a.eval_tokens, pad_token_id=tok.eos_id,
                                  eos_token_id=tok.eos_id)
            gen = out[:, width:]
            # tokens up to and including the first EOS, as the engine counts them
            ended = (gen == tok.eos_id).int().cumsum(1)
            new += int(((ended == 0) | ((ended == 1) & (gen == tok.eos_id))).sum())
        dt = time.perf_counter() - t0
        return {"completions_s": len(prompts) * k / dt, "tok_s": new / dt}

    return ours, theirs


def print_sft(a, sft: dict, convs, model, transformers) -> float:
    """The SFT table (printed as soon as it is measured); returns nanoseek / TRL."""
    data_tokens = sum(len(ids) for ids, _ in convs)
    print(f"SFT, {a.preset} preset ({model.num_params() / 1e6:.2f}M params), {a.conversations} conversations "
          f"({data_tokens:,} tokens), seq {a.seq_len}, {a.batch_size} packed rows/step, {a.steps} steps "
          f"({a.warmup} untimed), fp32, {torch.get_num_threads()} threads, best of {a.rounds} runs taking turns; "
          f"transformers {transformers.__version__}, trl {__import__('trl').__version__}; "
          f"cpu pressure {cpu_pressure()}")
    vs_trl.print_table(sft, "tokens/s (best)")
    ratio = max(sft["nanoseek"]) / max(sft["TRL SFTTrainer"])
    print(f"nanoseek / TRL: {ratio:.2f}x")
    return ratio


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    transformers = vs_trl.peer_setup(a, "sft")
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        root = Path(tmp)
        tok, model, convs = setup(a, root)
        leak = check_trl_packing(root)
        if leak > 1e-3:
            raise SystemExit(f"nanoseek bench sft: transformers attends across packed conversations (max |Δlogit| "
                             f"{leak:.2e}); TRL's padding-free rows would not be a fair peer here")
        runs = {"nanoseek": lambda: nanoseek_run(a, root, mtp=False),
                "TRL SFTTrainer": lambda: trl_run(a, root, tok, convs),
                "nanoseek (MTP λ 0.1, bias γ)": lambda: nanoseek_run(a, root, mtp=True)}
        sft = vs_trl.take_turns(runs, a.rounds)
        ratio = print_sft(a, sft, convs, model, transformers)
        evals = {}
        if a.eval_problems:
            ours, theirs = eval_runs(a, tok, model, root)
            evals = {"nanoseek eval (engine)": [], "transformers generate": []}
            for _ in range(a.rounds):
                evals["nanoseek eval (engine)"].append(ours())
                evals["transformers generate"].append(theirs())

    record = {"bench": "sft", "preset": a.preset, "overrides": a.overrides, "seq_len": a.seq_len,
              "batch_size": a.batch_size, "steps": a.steps, "threads": torch.get_num_threads(),
              "sft_tok_s": sft, "ratio": ratio}
    if evals:
        print(f"\nevaluation sampling, {a.eval_problems} prompts x k=8, <= {a.eval_tokens} new tokens, T 0.6, "
              f"top-p 0.95, {a.eval_batch} sequences in flight")
        print(f"{'':<30}{'completions/s':>14}{'tokens/s':>10}{'range (completions/s)':>26}")
        for name, rs in evals.items():
            best = max(rs, key=lambda r: r["completions_s"])
            rng = f"{min(r['completions_s'] for r in rs):.2f} - {best['completions_s']:.2f}"
            print(f"{name:<30}{best['completions_s']:>14.2f}{best['tok_s']:>10,.0f}{rng:>26}")
        eval_ratio = (max(r["completions_s"] for r in evals["nanoseek eval (engine)"])
                      / max(r["completions_s"] for r in evals["transformers generate"]))
        print(f"nanoseek / transformers: {eval_ratio:.2f}x")
        record.update(eval=evals, eval_ratio=eval_ratio)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
