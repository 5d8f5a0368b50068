"""DeepSeek-V3.2's GRPO refinements in nanoseek.rl.grpo: the unbiased KL estimate (value and gradient
against the formula) and off-policy sequence masking (exactly the sequences the rule names)."""

import pytest
import torch

from nanoseek.rl.grpo import grpo_loss, off_policy_sequences


def inputs(seed=0, N=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(N, T, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(N, T, generator=g)
    ref = logp.detach() + 0.5 * torch.randn(N, T, generator=g)
    mask = torch.ones(N, T)
    mask[1, 3:] = 0
    return logp, old, ref, mask


def test_unbiased_kl_equals_k3_when_policies_coincide():
    logp, _, ref, mask = inputs()
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    _, plain = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.1)
    _, unbiased = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.1, unbiased_kl=True)
    assert abs(plain["kl"] - unbiased["kl"]) < 1e-7


def test_unbiased_kl_follows_the_formula_off_policy():
    logp, old, ref, mask = inputs(1)
    adv = torch.zeros(4)  # only the KL term is left
    beta = 0.5
    loss, stats = grpo_loss(logp, old, ref, adv, mask, beta=beta, loss_type="bnpo", unbiased_kl=True)
    loss.backward()
    # by hand: ρ·k3 per token, ρ = exp(logp - old), k3 = e^d - d - 1 with d = ref - logp
    lp, o, r = logp.detach().double(), old.double(), ref.double()
    rho, d = (lp - o).exp(), r - lp
    k3 = d.exp() - d - 1
    m = mask.double()
    want = (beta * rho * k3 * m).sum() / m.sum()
    assert abs(loss.item() - want.item()) < 1e-6
    assert abs(stats["kl"] - ((rho * k3 * m).sum() / m.sum()).item()) < 1e-6
    _, plain = grpo_loss(logp, old, ref, adv, mask, beta=beta, loss_type="bnpo")
    assert abs(plain["kl"] - stats["kl"]) > 1e-3  # off-policy the two estimates differ
    # gradient: β ρ (log π_θ − log π_ref) / |tokens|, the unbiased KL gradient's integrand
    want_grad = beta * rho * (lp - r) * m / m.sum()
    assert torch.allclose(logp.grad.double(), want_grad, atol=1e-6)


def test_off_policy_masking_removes_exactly_the_named_sequences():
    N, T = 6, 4
    logp = torch.full((N, T), -1.0, requires_grad=True)
    # mean log(π_rollout/π_θ) per sequence: 0.5, 0.5, 0.05, 0.5, 0.08 (only on its 2 counted tokens), 0.5
    gap = torch.tensor([0.5, 0.5, 0.05, 0.5, 0.08, 0.5])[:, None].expand(N, T).clone()
    gap[4, 2:] = 5.0  # padding: must not count
    rollout = logp.detach() + gap
    mask = torch.ones(N, T)
    mask[4, 2:] = 0
    adv = torch.tensor([-1.0, 1.0, -1.0, 0.0, -2.0, -0.5])
    # the rule: advantage < 0 and divergence > δ = 0.1 -> sequences 0 and 5 (1 positive, 2 and 4 close, 3 zero adv)
    assert off_policy_sequences(logp, rollout, adv, mask, 0.1).tolist() == [True, False, False, False, False, True]
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, loss_type="bnpo", off_policy_delta=0.1,
                            rollout_logp=rollout)
    loss.backward()
    assert abs(stats["off_policy_masked"] - 2 / 6) < 1e-7
    assert (logp.grad[[0, 5]] == 0).all() and (logp.grad[[1, 2, 4]] != 0).any(-1).all()
    # the same loss as masking those rows by hand
    keep = mask.clone()
    keep[[0, 5]] = 0
    by_hand, _ = grpo_loss(logp.detach(), logp.detach(), None, adv, keep, loss_type="bnpo")
    assert abs(loss.item() - by_hand.item()) < 1e-7
    # without the flag nothing is masked
    _, off = grpo_loss(logp, logp.detach(), None, adv, mask, rollout_logp=rollout)
    assert off["off_policy_masked"] == 0.0


def test_kept_sampling_mask_gives_the_truncated_distributions_logps(one_thread):
    from nanoseek.inference import Engine
    from nanoseek.model import Transformer, preset
    from nanoseek.rl.rollout import Batch, completion_logps, rollout

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                               qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16, n_routed_experts=4,
                               num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                               num_nextn_predict_layers=0, initializer_range=0.3)).eval()
    engine = Engine(model, max_batch_size=4, max_seq_len=32, speculative=None, compile=False,
                    record_sampling_mask=True)
    temp = 0.8
    groups = rollout(engine, [[5, 6, 7], [9, 10]], G=2, max_new_tokens=6, temperature=temp, top_p=0.5, top_k=20,
                     seed=3, ignore_eos=True)
    comps = [c for g in groups for c in g]
    batch = Batch.of(comps, sampling_mask=True)
    with torch.no_grad():
        got = completion_logps(model, batch, temp)
        plain = completion_logps(model, Batch.of(comps), temp)
    truncated = 0
    for n, c in enumerate(comps):
        assert c.kept is not None and len(c.kept) == len(c.tokens)
        seq = torch.tensor([c.prompt + c.tokens[:-1]])
        with torch.no_grad():
            logits = model(seq)[0, len(c.prompt) - 1:].double() / temp  # [len(tokens), V]
        for t, (tok, ids) in enumerate(zip(c.tokens, c.kept)):
            assert tok in ids.tolist()  # the engine drew from its recorded set
            truncated += len(ids) < 64
            want = logits[t, tok] - logits[t, ids].logsumexp(-1)  # the truncated, renormalised distribution
            assert abs(got[n, t].item() - want.item()) < 1e-5
    assert truncated > 0 and (got - plain).abs().max() > 1e-3  # the mask mattered


def tiny_policy_and_rm(tmp_path):
    """A tiny random policy (tmp_path/m) and a random reward model with its tokenizer (tmp_path/rm)."""
    import json

    from nanoseek.data import train_bpe
    from nanoseek.model import ModelArgs, Transformer
    from nanoseek.rl.reward_model import RewardModel
    from nanoseek.stages import init as init_stage

    texts = [f"What is {a} + {b}? The answer is \\boxed{{{a + b}}}." for a in range(20) for b in range(5)]
    tok = train_bpe(texts, vocab_size=300)
    tok.save(tmp_path / "tok")
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                topk_group=2, num_nextn_predict_layers=0, max_position_embeddings=256, vocab_size=tok.vocab_size)
    sets = [x for k, v in tiny.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert init_stage.main(["--preset", "tiny", "--out", str(tmp_path / "m"), *sets, "--tokenizer",
                            str(tmp_path / "tok")]) == 0
    # a reward model (random head) with its own tokenizer, as `nanoseek rm` leaves it
    RewardModel(Transformer(ModelArgs(**tiny, bos_token_id=0, eos_token_id=1, pad_token_id=2))).save_pretrained(
        tmp_path / "rm")
    tok.save(tmp_path / "rm")
    return tmp_path / "m", tmp_path / "rm"


def grpo_records(out):
    import json

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("kind") == "grpo"]


GRPO_FAST = ["--prompts-per-step", "2", "--num-generations", "3", "--max-completion-length", "6", "--steps", "2",
             "--quiet", "--sample-every", "0"]


def test_grpo_stage_runs_with_the_three_refinements_and_a_reward_model(tmp_path, one_thread):
    from nanoseek.stages import grpo as grpo_stage

    model, rm = tiny_policy_and_rm(tmp_path)
    out = tmp_path / "run"
    assert grpo_stage.main([
        "--model", str(model), "--out", str(out), "--task", "arithmetic", "--digits", "1", "--n-problems", "20",
        *GRPO_FAST, "--beta", "0.01", "--unbiased-kl", "--off-policy-mask", "0", "--keep-sampling-mask",
        "--top-p", "0.9", "--top-k", "50", "--num-iterations", "2",
        "--reward", "accuracy=1", "--reward", f"rm:{rm}=0.5"]) == 0
    steps = grpo_records(out)
    assert len(steps) == 2 and all(0 <= r["off_policy_masked"] <= 1 and r["kl"] >= 0 for r in steps)
    for r in steps:  # the RM's scores are logged like a rule reward and weighted into the total
        assert r["rewards/rm/std"] > 0
        assert abs(r["reward"] - (r["rewards/accuracy/mean"] + 0.5 * r["rewards/rm/mean"])) < 1e-5


def test_task_rows_choose_rule_rewards_or_the_reward_model(tmp_path, one_thread, capsys):
    import json

    from nanoseek.data import DataError
    from nanoseek.rl.tasks import load_problems
    from nanoseek.stages import grpo as grpo_stage

    model, rm = tiny_policy_and_rm(tmp_path)
    rows = [{"prompt": "What is 1 + 2?", "answer": 3, "reward": "rule"}, {"prompt": "Write a haiku.", "reward": "rm"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.reward for p in load_problems(tmp_path / "mixed.jsonl")] == ["rule", "rm"]
    out = tmp_path / "run"
    assert grpo_stage.main(["--model", str(model), "--out", str(out), "--task", str(tmp_path / "mixed.jsonl"),
                            "--n-problems", "2", *GRPO_FAST, "--no-think", "--reward", "format=1", "--reward", f"rm:{rm}=1"]) == 0
    for r in grpo_records(out):  # each prompt scored by its own terms: the total is the mean of the two halves
        assert r["rewards/rm/std"] > 0
        assert abs(r["reward"] - 0.5 * (r["rewards/format/mean"] + r["rewards/rm/mean"])) < 1e-5
    # rm rows without a reward model, and a bad choice, are one-line errors
    assert grpo_stage.main(["--model", str(model), "--out", str(tmp_path / "r2"), "--task",
                            str(tmp_path / "mixed.jsonl"), *GRPO_FAST, "--reward", "format=1"]) == 2
    assert 'rows with "reward": "rm" but no --reward rm:DIR' in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answer": 1}\n{"prompt": "y", "reward": "judge"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: \"reward\" must be"):
        load_problems(tmp_path / "bad.jsonl")
