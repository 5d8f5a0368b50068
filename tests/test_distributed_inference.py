"""The engine, generate and serve on 2 ranks (gloo on CPU) give what one process gives.

Every multi-process test spawns its own ranks with the environment torchrun sets (or torchrun
itself, for the CLI), waits with a timeout (a hang fails the test, never CI) and kills what is left.
The checkpoint is the serving tests' tiny random model (2 layers, 8 experts, 1 MTP module) with its
small BPE tokenizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from infer_worker import script
from nanoseek.inference import Engine
from nanoseek.inference.distributed import Runtime
from nanoseek.model import Transformer
from nanoseek.parallel.env import Dist
from serving import checkpoint, serve, tokenizer  # noqa: F401  (module fixtures)
from test_parallel import free_port, reap, spawn

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "infer_worker.py"
TIMEOUT = 300  # seconds a multi-rank run may take before it counts as a hang (a loaded machine is slow)


def torchrun_env() -> dict:
    """The environment of a launch through torchrun itself (which adds the rank variables)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_engine_two_ranks_equal_one_process(checkpoint, tmp_path):  # noqa: F811
    """Greedy (plain and MTP-speculative), seeded sampling (plain and speculative) and a by-hand
    run with a join and a cancellation: rank 0's tokens are the one-process engine's, and the
    follower computed every one of them itself too (it replaced none)."""
    procs = spawn(2, [str(WORKER), str(checkpoint), str(tmp_path)])
    torch.set_num_threads(1)
    model = Transformer.from_pretrained(checkpoint)
    rt = Runtime(Dist())  # one rank: a plain Engine
    rt.lead()
    engine = rt.engine(model, max_batch_size=3, max_seq_len=64, compile=False)
    assert type(engine) is Engine
    want = script(engine)
    done = reap(procs, TIMEOUT)
    assert [r.returncode for r in done] == [0, 0], [r.stderr[-2000:] for r in done]
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got == json.loads(json.dumps(want))
    assert json.loads((tmp_path / "rank1.json").read_text()) == {"replaced": 0}
    assert want["greedy_mtp"] == want["greedy"]  # speculation does not change greedy output
    assert want["seeded"] != want["greedy"]


def test_torchrun_generate_prints_what_one_process_prints(checkpoint, tmp_path):  # noqa: F811
    """The real launcher: `torchrun --nproc-per-node 2 -m nanoseek generate` streams the same text
    (greedy, a stop string, an input file's rows) as one process, and says compiling is off once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, how are you?\nWhat is seven times six?\nOnce upon a time\n")
    common = ["--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "12", "--no-compile"]
    runs = {"prompt": ["--prompt", "Hello there", "--stop", "e"],
            "file": ["--input-file", str(prompts), "--batch-size", "2"]}
    env = torchrun_env()
    procs = {name: subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                     "--master-port", str(free_port()), "-m", "nanoseek", "generate",
                                     *common, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, extra in runs.items()}
    one = {name: subprocess.run([sys.executable, "-m", "nanoseek", "generate", *common, *extra], env=env,
                                capture_output=True, text=True, timeout=TIMEOUT) for name, extra in runs.items()}
    two = dict(zip(procs, reap(list(procs.values()), TIMEOUT)))
    for name in runs:
        assert one[name].returncode == 0 and two[name].returncode == 0, two[name].stderr[-2000:]
        assert two[name].stdout == one[name].stdout
        assert two[name].stderr.count("torch.compile is off under torchrun") == 0  # --no-compile: nothing to say
    rows = [json.loads(line) for line in two["file"].stdout.splitlines()]
    assert len(rows) == 3 and all(r["completion_tokens"] >= 1 for r in rows)


def test_bad_checkpoint_and_bad_flag_fail_on_every_rank(checkpoint, tmp_path):  # noqa: F811
    """One line from rank 0, the same nonzero status on every rank, no hang: a checkpoint whose
    weights file is damaged (generate and serve), and a flag out of range."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = {
        "generate": (["-m", "nanoseek", "generate", "--model", str(bad), "--prompt", "hi"], 2, "error"),
        "serve": (["-m", "nanoseek", "serve", "--model", str(bad), "--port", str(free_port())], 1,
                  "nanoseek serve: loading the model failed"),  # (also logged, as on one process)
        "flag": (["-m", "nanoseek", "generate", "--model", str(checkpoint), "--prompt", "hi", "--top-p", "2"], 2,
                 "error: argument --top-p"),
    }
    procs = {name: spawn(2, argv) for name, (argv, _, _) in cases.items()}
    for name, (argv, code, words) in cases.items():
        rank0, rank1 = reap(procs[name], TIMEOUT)
        assert (rank0.returncode, rank1.returncode) == (code, code), (name, rank0.stderr, rank1.stderr)
        lines = [line for line in rank0.stderr.splitlines() if words in line]
        assert len(lines) == 1, (name, rank0.stderr)
        assert "Traceback" not in rank0.stderr + rank1.stderr
        assert rank1.stderr.strip() == "", (name, rank1.stderr)


HELLO = [{"role": "user", "content": "Hello, how are you?"}]
QUESTIONS = ["What is seven times six?", "Once upon a time", "def add(a, b):", "The weather is", "one, two,",
             "Think first"]


def ask_all(client: openai.OpenAI) -> dict:
    """The same requests for both servers: greedy chat, a stream, a seeded sample, and six requests
    at once (more than the 4 slots, so some wait and join the running batch)."""
    from concurrent.futures import ThreadPoolExecutor

    out = {}
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    out["chat"] = r.choices[0].message.content
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0,
                                            stream=True)
    out["stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0.9, seed=5)
    out["seeded"] = r.choices[0].text

    def one(q):
        return client.completions.create(model="tiny", prompt=q, max_tokens=10 + len(q) % 5, temperature=0,
                                         stop=["e"] if "e" in q else None).choices[0].text

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        out["concurrent"] = list(pool.map(one, QUESTIONS))
    return out


def disconnect_mid_stream(url: str) -> None:
    body = {"messages": HELLO, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(trust_env=False) as client:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert all(next(lines).startswith("data: ") or True for _ in range(4))  # a few chunks, then hang up


def test_two_rank_server_answers_like_one_process(checkpoint, tokenizer, tmp_path):  # noqa: F811
    """`nanoseek serve` on 2 ranks answers the openai client (chat, a stream, seeded sampling, six
    requests at once, a client that hangs up mid-stream) with the one-process server's text, and
    Ctrl-C on rank 0 ends both ranks with status 0."""
    port = free_port()
    procs = spawn(2, ["-m", "nanoseek", "serve", "--model", str(checkpoint), "--port", str(port),
                      "--max-batch-size", "4", "--max-model-len", "256", "--threads", "1", "--log-level", "warning"])
    try:
        model = Transformer.from_pretrained(checkpoint)
        with serve(model, tokenizer, slots=4, context=256) as live:
            want = ask_all(live.client())
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the server did not start"
            try:
                if httpx.get(url + "/health", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60,
                               http_client=httpx.Client(trust_env=False))
        disconnect_mid_stream(url)
        got = ask_all(client)  # after the hang-up: the ranks are still in step
        assert got == want
        metrics = httpx.get(url + "/metrics", trust_env=False).text
        assert 'nanoseek_request_finished_total{reason="cancelled"} 1' in metrics
        procs[0].send_signal(signal.SIGINT)
        done = reap(procs, timeout=60)
        assert [r.returncode for r in done] == [0, 0], [r.stderr[-2000:] for r in done]
        assert "Traceback" not in done[0].stderr + done[1].stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_bench_decode_ranks_table_runs_on_one_rank(tmp_path, capsys):
    """`bench decode --tables ranks` (what torchrun launches print): rows for each cell and each
    rank's memory, and JSONL with them."""
    from nanoseek.bench import decode

    out = tmp_path / "rows.jsonl"
    assert decode.main(["--tables", "ranks", "--preset", "tiny", "--set", "num_hidden_layers=2", "--batch-sizes",
                        "2", "--prompt-lens", "8", "--new-tokens", "3", "--repeats", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cell, rank = rows
    assert (cell["ranks"], cell["batch"], cell["prompt"]) == (1, 2, 8) and cell["decode_tok_s"] > 0
    assert rank["rank"] == 0 and 0 < rank["param_bytes"] < rank["rss"] <= rank["peak_rss"]
    assert "ranks table: 1 rank(s)" in capsys.readouterr().out
