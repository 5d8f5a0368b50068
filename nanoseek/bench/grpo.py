"""One GRPO step: nanoseek against TRL's GRPOTrainer, same model, prompts and settings, one run.

    nanoseek bench grpo                               # tiny preset, P 8 x G 8, 64 new tokens, β 0.04, μ 1
    nanoseek bench grpo --prompts 4 --generations 4 --completion-length 32 --rounds 2 --out bench.jsonl

The same randomly initialised tiny model is saved in the HF layout and loaded by transformers'
`DeepseekV3ForCausalLM` for TRL (`use_vllm=False`: its rollouts are `model.generate`, `bf16=False`,
on the CPU). Both sides get the same arithmetic prompts (our chat template, rendered to text for
TRL), G completions each forced to the full --completion-length (nanoseek `--ignore-eos`,
TRL `min_new_tokens`), the same β (a reference model's forward), μ, loss type, one optimizer step
per generation batch, and the task's accuracy reward. Rounds alternate between the two, so a
busy machine slows both alike; a side's figure is its best step over the rounds (the range is
printed too). The split: generation (nanoseek: the engine's rollouts; TRL: `_generate`) and the
rest of the step (rewards, reference and policy forwards, backward, AdamW). nanoseek runs as
`nanoseek grpo --compile`: its decode step and its log-prob forwards compiled (torch.compile,
inductor's artefacts cached on disk), so the first step of a round pays for compiling (printed, with
its seconds); a side's best step is a steady one. (`nanoseek grpo` without the flag runs eagerly
until the eager update time reaches what compiling cost here last time, then the same compiled steps:
a long run's steady state; a short run on a cold cache stays eager.)

What each side computes per step (P·G = N completions of C tokens): sampling with temperature 1 from
the full distribution, one token per completion per decode step (KV/latent cache; TRL: a
DynamicCache over the left-padded batch, nanoseek: continuous batching, each distinct prompt
prefilled once, the sampled tokens' log-probs recorded); the accuracy reward of the N decoded texts
(nanoseek counts it in generation, TRL in the update); a no-grad reference forward and a policy
forward + backward over the N prompt+completion rows with the head applied at completion positions
only (TRL also computes each token's entropy, which it logs); old log-probs = the detached current
ones (μ 1: ratio exactly 1 on both sides); the k3 KL term; gradient clipping at 1; one AdamW step
(fused on both: transformers' default optimizer with torch >= 2.8).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import types
from pathlib import Path

import torch

from nanoseek.data import train_bpe
from nanoseek.eval.runner import build_prompt
from nanoseek.model import Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.rl import rewards as R
from nanoseek.rl.tasks import arithmetic


def make_model(root: Path, overrides: list[str]) -> Path:
    """A tokenizer trained on arithmetic text and a random tiny model with it, in HF layout."""
    texts = [f"What is {a} + {b}? The answer is \\boxed{{{a + b}}}." for a in range(100) for b in range(0, 100, 7)]
    tok = train_bpe(texts, vocab_size=512)
    torch.manual_seed(0)
    args = preset("tiny", vocab_size=tok.vocab_size, **parse_overrides(overrides)).replace(torch_dtype="float32")
    Transformer(args).save_pretrained(root)
    tok.save(root)
    return root


def run_nanoseek(model_dir: Path, a, out: Path) -> list[tuple[float, float, float]]:
    """--steps GRPO steps with `nanoseek grpo --compile` (eager, with one line, where no compiler is found);
    returns (generation s, rest s, wall s spent compiling) per step."""
    from nanoseek.stages import grpo as stage

    wall = stage.time
    if a.clock == "cpu":  # the stage times its phases with time.perf_counter: read this process's CPU clock
        stage.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        code = stage.main(["--model", str(model_dir), "--out", str(out), "--task", "arithmetic", "--digits", "2",
                           "--n-problems", str(a.prompts * a.steps), "--prompts-per-step", str(a.prompts),
                           "--num-generations", str(a.generations), "--max-completion-length",
                           str(a.completion_length), "--ignore-eos", "--beta", str(a.beta), "--num-iterations",
                           str(a.mu), "--steps", str(a.steps), "--reward", "accuracy=1", "--sample-every", "0",
                           "--quiet", "--lr", "1e-5", "--compile"])
    finally:
        stage.time = wall
    if code:
        raise SystemExit(f"nanoseek bench grpo: nanoseek grpo failed ({code})")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["rollout_s"], r["train_s"], r["compile_s"]) for r in recs]


def run_trl(model_dir: Path, a, out: Path, prompts: list[str], answers: list[str]) -> list[tuple[float, float]]:
    """The same steps with TRL's GRPOTrainer; returns (generation s, rest s) per step."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    tokenizer.padding_side = "left"

    def accuracy(prompts, completions, answer, **kw):
        return [R.accuracy(p, c, ans) for p, c, ans in zip(prompts, completions, answer)]

    config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=a.prompts * a.generations,
                        num_generations=a.generations, max_completion_length=a.completion_length,
                        temperature=1.0, beta=a.beta, num_iterations=a.mu, loss_type="grpo", learning_rate=1e-5,
                        max_steps=a.steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                        bf16=False, use_vllm=False, generation_kwargs={"min_new_tokens": a.completion_length},
                        disable_tqdm=True, seed=0, shuffle_dataset=False)
    data = Dataset.from_dict({"prompt": prompts, "answer": answers})
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=config, train_dataset=data,
                          processing_class=tokenizer)
    gen, steps, t = [], [], {}
    generate = trainer._generate
    clock = time.process_time if a.clock == "cpu" else time.perf_counter

    def timed_generate(*args, **kw):
        t0 = clock()
        result = generate(*args, **kw)
        gen.append(clock() - t0)
        return result

    trainer._generate = timed_generate

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kw):
            t["begin"] = clock()

        def on_step_end(self, *args, **kw):
            steps.append(clock() - t["begin"])

    trainer.add_callback(Clock())
    trainer.train()
    return [(g, s - g) for g, s in zip(gen, steps)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek bench grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a tiny-preset field")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per step")
    p.add_argument("--generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--completion-length", type=int, default=64, help="new tokens per completion (EOS ignored)")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: a reference forward on both sides)")
    p.add_argument("--mu", type=int, default=1, help="num_iterations")
    p.add_argument("--steps", type=int, default=2, help="GRPO steps per side per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0: leave as is)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed seconds; cpu: this process's CPU seconds (with --threads 1 the work done, "
                        "whatever else runs on a shared machine)")
    p.add_argument("--out", type=Path, help="append the results as one JSON line here")
    a = p.parse_args(argv)
    import trl  # the peer; a test/bench-only dependency

    if a.threads:
        torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(root / "model", a.overrides)
        from nanoseek.data import Tokenizer

        tok = Tokenizer.from_dir(model_dir)
        problems = arithmetic(a.prompts * a.steps, 0, "train", digits=2)
        # TRL reads the problems in its own order; the nanoseek run draws them shuffled: the same set,
        # and with EOS ignored every completion has the same length whatever the prompt.
        texts = [tok.decode(build_prompt(tok, q, "chat", think=True)) for q in problems]
        times: dict[str, list[tuple]] = {"nanoseek": [], "TRL": []}
        for r in range(a.rounds):
            times["nanoseek"] += run_nanoseek(model_dir, a, root / f"ours-{r}")
            times["TRL"] += run_trl(model_dir, a, root / f"trl-{r}", texts, [q.answer for q in problems])
    rows = {}
    for name, ts in times.items():
        totals = [t[0] + t[1] for t in ts]
        best = min(range(len(ts)), key=lambda i: totals[i])
        rows[name] = {"step_s": totals[best], "generation_s": ts[best][0], "update_s": ts[best][1],
                      "range_s": [min(totals), max(totals)], "steps": len(ts), "first_step_s": totals[0],
                      "compile_s": sum(t[2] for t in ts) if name == "nanoseek" else 0.0}
    ratio = rows["TRL"]["step_s"] / rows["nanoseek"]["step_s"]
    print(f"one GRPO step, tiny preset, P {a.prompts} x G {a.generations} = {a.prompts * a.generations} completions x "
          f"{a.completion_length} tokens (EOS ignored), β {a.beta}, μ {a.mu}, fp32 CPU, {torch.get_num_threads()} "
          f"threads, {a.clock} clock; TRL {trl.__version__} (use_vllm=False); best of {a.rounds} alternating rounds x "
          f"{a.steps} steps")
    print(f"{'':<10}{'step s':>9}{'generation s':>14}{'update s':>10}{'range s':>16}")
    for name, r in rows.items():
        print(f"{name:<10}{r['step_s']:>9.2f}{r['generation_s']:>14.2f}{r['update_s']:>10.2f}"
              f"{r['range_s'][0]:>8.2f}-{r['range_s'][1]:.2f}")
    ours = rows["nanoseek"]
    print(f"nanoseek compiled for {ours['compile_s']:.1f} s (wall, all rounds; the first step of a round pays it, "
          f"{ours['first_step_s']:.2f} s on the clock in round 1; disk-cached: later rounds trace only)")
    print(f"nanoseek is {ratio:.2f}x faster per step than TRL")
    if a.out:
        record = {"bench": "grpo", "prompts": a.prompts, "generations": a.generations,
                  "completion_length": a.completion_length, "beta": a.beta, "mu": a.mu, "rows": rows, "ratio": ratio,
                  "trl": trl.__version__, "threads": torch.get_num_threads(), "clock": a.clock}
        with open(a.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
