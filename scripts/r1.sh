#!/usr/bin/env bash
# The DeepSeek-R1 story at tiny scale, one `nanoseek` command per stage (~60 minutes on one core).
#
#   bash scripts/r1.sh                                   # RUN=runs/r1, 2-digit sums by default
#   RUN=runs/r1b RL_STEPS=120 N_TEST=100 K=8 bash scripts/r1.sh   # faster evals, more RL
#
# tiny base model (pre-trained on the embedded code corpus) -> cold-start SFT on a few hundred worked
# arithmetic solutions (column by column in <think>, answer boxed) -> eval -> GRPO with accuracy +
# format rewards -> eval (pass@1 over K samples, cons@K, on the test split) -> rejection sampling from
# the RL model -> distillation (SFT only) into a smaller student -> eval of the student, beside the
# same student trained with its own RL: R1's comparison (its Table 6: Qwen-32B-Base + large-scale RL,
# R1-Zero style, against the same base distilled from R1) is GRPO straight from the student's base
# with R1-Zero's template (R1's finding: distillation beats the small model's own RL); and the
# student with its own cold start + GRPO (the cold start is itself distillation, from the exact
# worked-solution generator). Plus the R1-Zero arm: GRPO straight from the base model with R1-Zero's
# template, reporting what it learns (format rate, accuracy, length over steps: RUN/r1zero/report.md).
# The before/after table is printed at the end (RUN/*/eval/summary.json).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -d .venv ] && export PATH="$ROOT/.venv/bin:$PATH"
RUN="${RUN:-runs/r1}"
DIGITS="${DIGITS:-2}"            # arithmetic operands up to this many digits
OPS="${OPS:-+}"                  # operators (the worked solutions go column by column for +)
BASE_STEPS="${BASE_STEPS:-30}"   # pre-training steps of 4K tokens (teacher and student bases)
COLD_N="${COLD_N:-1500}"         # worked solutions for the cold start (R1: "thousands")
SFT_EPOCHS="${SFT_EPOCHS:-6}"
RL_STEPS="${RL_STEPS:-80}"
ZERO_STEPS="${ZERO_STEPS:-30}"   # R1-Zero arm
DISTILL_N="${DISTILL_N:-2000}"   # train problems the RL model answers for the student (rejection sampled)
RL_LR="${RL_LR:-3e-5}"           # GRPO learning rate (1e-4 over-fits each step's 8 problems and lowers test pass@1)
RL_PROMPTS="${RL_PROMPTS:-16}"   # problems per GRPO step (x 8 completions each)
MAX_TOKENS="${MAX_TOKENS:-128}"  # completion budget: a worked 2-digit sum with a final carry is ~100 tokens
K="${K:-16}"                     # samples per test problem (pass@1 is their mean correctness)
N_TEST="${N_TEST:-200}"
SECONDS=0
stage() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }
TASK=(--task arithmetic --digits "$DIGITS" --ops "$OPS")
EVAL=(--split test --n "$N_TEST" --k "$K" --think --max-new-tokens "$MAX_TOKENS" --quiet)
# small batches (2 packed rows, ~12 solutions): a tiny model needs many updates, not big ones (on 400
# solutions, 8 rows per step left the val loss at 1.08 after 8 epochs; 2 rows reached 0.40 in 6)
SFT=(--epochs "$SFT_EPOCHS" --lr 2e-3 --batch-size 2 --seq-len 512 --samples 0 --quiet)
STUDENT=(--set num_hidden_layers=2 --set hidden_size=96)
GRPO=(--n-problems 2000 --reward accuracy=1 --reward format=0.2 --steps "$RL_STEPS" --prompts-per-step "$RL_PROMPTS"
      --num-generations 8 --max-completion-length "$MAX_TOKENS" --temperature 1.0 --lr "$RL_LR" --beta 0.001 --epsilon-high 0.28
      --sample-every 20 --quiet)

rm -rf "$RUN"
stage "prepare: 3 MB of the embedded code corpus, 1K BPE";  nanoseek prepare --out "$RUN/data" --vocab-size 1024 --max-bytes 3000000
stage "train: the tiny base model ($BASE_STEPS steps)";  nanoseek train --data "$RUN/data" --out "$RUN/base" --preset tiny --steps "$BASE_STEPS" --eval-every 0 --quiet --samples 0
stage "sample --worked: cold-start data";  nanoseek sample --worked "${TASK[@]}" --n "$COLD_N" --out "$RUN/cold.jsonl"
stage "sft: cold start";  nanoseek sft --model "$RUN/base" --data "$RUN/cold.jsonl" --out "$RUN/sft" "${SFT[@]}"
stage "eval: after SFT";  nanoseek eval --model "$RUN/sft" "${TASK[@]}" "${EVAL[@]}" --out "$RUN/sft/eval"
stage "grpo: accuracy + format rewards";  nanoseek grpo --model "$RUN/sft" "${TASK[@]}" "${GRPO[@]}" --out "$RUN/rl"
stage "eval: after GRPO";  nanoseek eval --model "$RUN/rl" "${TASK[@]}" "${EVAL[@]}" --out "$RUN/rl/eval" --baseline "$RUN/sft/eval"
stage "train: the smaller student's base";  nanoseek train --data "$RUN/data" --out "$RUN/student-base" --preset tiny "${STUDENT[@]}" --steps "$BASE_STEPS" --eval-every 0 --quiet --samples 0
stage "sft: the student's own cold start";  nanoseek sft --model "$RUN/student-base" --data "$RUN/cold.jsonl" --out "$RUN/student-sft" "${SFT[@]}"
stage "eval: the student after its cold start";  nanoseek eval --model "$RUN/student-sft" "${TASK[@]}" "${EVAL[@]}" --out "$RUN/student-sft/eval"
stage "grpo: the student's own RL";  nanoseek grpo --model "$RUN/student-sft" "${TASK[@]}" "${GRPO[@]}" --out "$RUN/student-rl"
stage "eval: the student after its own RL";  nanoseek eval --model "$RUN/student-rl" "${TASK[@]}" "${EVAL[@]}" --out "$RUN/student-rl/eval" --baseline "$RUN/student-sft/eval"
# rejection sampling keeps right answers (adding `--reward equations=1 --threshold 2`, right steps too,
# kept 15% of 4 samples a problem and the distilled student did worse: README, "The R1 story")
stage "sample: rejection sampling from the RL model";  nanoseek sample --model "$RUN/rl" "${TASK[@]}" --n "$DISTILL_N" --seed 1 --k 2 --think --max-new-tokens "$MAX_TOKENS" --max-per-prompt 1 --quiet --out "$RUN/distill.jsonl"
stage "sft: distillation into the student";  nanoseek sft --model "$RUN/student-base" --data "$RUN/distill.jsonl" --out "$RUN/student-distilled" "${SFT[@]}"
stage "eval: distilled student (against its own RL)";  nanoseek eval --model "$RUN/student-distilled" "${TASK[@]}" "${EVAL[@]}" --out "$RUN/student-distilled/eval" --baseline "$RUN/student-rl/eval"
ZERO=(--template zero --n-problems 2000 --reward accuracy=1 --reward format_zero=0.5 --num-generations 8 --lr 1e-4
      --beta 0.001 --quiet)
ZERO_EVAL=(--split test --n "$N_TEST" --k "$K" --template zero --max-new-tokens "$MAX_TOKENS" --quiet)
stage "grpo: the student's own RL from its base (R1-Zero style, R1's comparison)";  nanoseek grpo --model "$RUN/student-base" "${TASK[@]}" "${ZERO[@]}" --steps "$RL_STEPS" --prompts-per-step "$RL_PROMPTS" --max-completion-length "$MAX_TOKENS" --sample-every 20 --out "$RUN/student-zero"
stage "eval: the student after its own RL from its base";  nanoseek eval --model "$RUN/student-zero" "${TASK[@]}" "${ZERO_EVAL[@]}" --out "$RUN/student-zero/eval"
stage "grpo: R1-Zero from the base model";  nanoseek grpo --model "$RUN/base" "${TASK[@]}" "${ZERO[@]}" --steps "$ZERO_STEPS" --prompts-per-step 8 --max-completion-length 64 --sample-every 10 --out "$RUN/r1zero"
stage "results: pass@1 over $K samples x $N_TEST test problems ($((K * N_TEST)) completions each), T 0.6, top-p 0.95"
for d in sft rl student-sft student-rl student-zero student-distilled; do
    python3 - "$RUN/$d/eval/summary.json" "$d" "$K" <<'PY'
import json, sys
s, name, k = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
v = s.get("vs_baseline")
change = f"  {v['delta']:+.3f} ± {v['se']:.3f} (paired se) vs {v['baseline'].split('/')[-2]}" if v else ""
print(f"{name:<18} pass@1 {s['pass@1']:.3f}  pass@{k} {s['pass@' + k]:.3f}  cons@{k} {s['cons@' + k]:.3f}  format {s['format_rate']:.3f}{change}")
PY
done
printf '%-20s ' "r1zero"; grep -E '"(reward|accuracy|format|length)_(first|last)"' "$RUN/r1zero/summary.json" | tr -d '\n '; echo "  (first -> last 10% of steps)"
stage "done: $RUN"
