"""The `nanoseek` command: one subcommand per pipeline stage, each a script in nanoseek/stages/.

    nanoseek prepare   tokenize a corpus into training shards (+ tokenizer)
    nanoseek train     pre-train (MTP + balanced MoE) with exact resume
    nanoseek generate  prompt, batch-file or interactive generation
    nanoseek serve     OpenAI-compatible server with a web chat page
    nanoseek init      write a randomly initialised model (a preset + overrides)
    nanoseek eval      pass@1 / pass@k / cons@k on a verifiable task, on the inference engine
    nanoseek sample    rejection sampling: completions the reward accepts, as chat JSONL
    nanoseek convert   FP8 <-> BF16/FP32 checkpoint conversion on CPU: fp8-to-bf16 | to-fp8
    nanoseek bench     benchmarks against transformers: train | decode | serve

Each stage parses its own flags (`nanoseek STAGE --help`). Stages are imported only when run, so
`nanoseek train` does not pay for the web server's imports.
"""

from __future__ import annotations

import importlib
import sys

STAGES = {
    "prepare": ("nanoseek.stages.prepare", "tokenize a corpus into training shards (+ tokenizer)"),
    "train": ("nanoseek.stages.train", "pre-train (MTP + balanced MoE) with exact resume"),
    "generate": ("nanoseek.stages.generate", "prompt, batch-file or interactive generation"),
    "serve": ("nanoseek.stages.serve", "OpenAI-compatible server with a web chat page"),
    "init": ("nanoseek.stages.init", "write a randomly initialised model (preset + overrides)"),
    "eval": ("nanoseek.stages.eval", "pass@1 / pass@k / cons@k on a verifiable task (R1 protocol)"),
    "sample": ("nanoseek.stages.sample", "rejection sampling to chat JSONL (R1 traces, distillation data)"),
    "convert": ("nanoseek.stages.convert", "FP8 <-> BF16/FP32 checkpoint conversion on CPU (streaming)"),
}
BENCHES = {
    "train": "nanoseek.bench.train",
    "decode": "nanoseek.bench.decode",
    "serve": "nanoseek.bench.serve",
    "balance": "nanoseek.bench.balance",
}


def usage() -> str:
    lines = ["usage: nanoseek STAGE [flags]   (nanoseek STAGE --help for its flags)", "", "stages:"]
    lines += [f"  {name:<10}{desc}" for name, (_, desc) in STAGES.items()]
    lines += [f"  {'bench':<10}benchmarks against transformers: {' | '.join(BENCHES)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"usage: nanoseek bench {{{','.join(BENCHES)}}} [flags]", file=sys.stderr)
            return 2
        module = BENCHES[rest[0]]
        rest = rest[1:]
    elif stage in STAGES:
        module = STAGES[stage][0]
    else:
        print(f"nanoseek: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(module).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
