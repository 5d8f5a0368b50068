"""Reward models: a scalar `score` head on a DeepSeek trunk, trained with the Bradley–Terry loss.

    rm = RewardModel.from_pretrained("runs/rm/checkpoints/latest")    # or a base model: new head
    rewards = rm(input_ids)                                           # [B, T] right-padded -> [B]
    rewards = rm.packed([ids_1, ids_2, ...])                          # padding-free, the same rewards
    loss = bt_loss(rm(chosen_ids), rm(rejected_ids), margin)          # -log σ(r_c - r_r - m), mean

The layout is transformers' `DeepseekV3ForSequenceClassification` (GenericForSequenceClassification):
`model.*` the trunk's tensors, `score.weight` [num_labels = 1, hidden] (a Linear without bias on the
final-norm hidden states), config.json with architectures [...ForSequenceClassification], id2label /
label2id of one label and pad_token_id. The reward of a sequence is the score at its last non-pad
token (the rightmost position whose id differs from pad_token_id, transformers' rule), so
transformers loads our reward models and we load theirs with the same scores. The trunk is the
nanoseek Transformer unchanged (its lm_head is unused; MTP modules are dropped).

Sources: the Bradley–Terry objective as in InstructGPT (Ouyang et al. 2022, eq. 1) and TRL's
RewardTrainer (`-logsigmoid(chosen - rejected - margin)`); V3 §5.2 / R1 §2.3.4 use such reward
models for general-domain prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from nanoseek.checkpoint import CheckpointError, load, resolve_model_dir, save
from nanoseek.model import Transformer


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley–Terry loss -log σ(r_chosen - r_rejected - margin), averaged over pairs. All [N]."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def last_token_index(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """[B, T] -> [B]: the rightmost position whose id is not pad_id (transformers' rule; 0 for an
    all-pad row); T - 1 everywhere when there is no pad id."""
    B, T = input_ids.shape
    if pad_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    idx = torch.arange(T, device=input_ids.device)
    return (idx * (input_ids != pad_id)).argmax(-1)


def pad_batch(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad token lists into a [B, max len] LongTensor."""
    T = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad_id] * (T - len(s)) for s in seqs], dtype=torch.long)


class RewardModel(nn.Module):
    """A Transformer trunk (`model`, HF names) and a `score` Linear(hidden, 1, bias=False)."""

    def __init__(self, model: Transformer, score: torch.Tensor | None = None):
        super().__init__()
        if len(model.mtp):  # the reward reads the main trunk only
            model.mtp = nn.ModuleList()
            model.args = model.args.replace(num_nextn_predict_layers=0)
        self.model = model
        D = model.args.hidden_size
        p = model.embed_tokens.weight
        self.score = nn.Linear(D, 1, bias=False, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            if score is None:  # transformers' _init_weights for a new Linear
                self.score.weight.normal_(0.0, model.args.initializer_range)
            else:
                if tuple(score.shape) != (1, D):
                    raise CheckpointError(f"score.weight has shape {tuple(score.shape)}; a reward model needs "
                                          f"(1, {D}) (num_labels 1)")
                self.score.weight.copy_(score)
        model.lm_head.weight.requires_grad_(False)  # not part of the reward

    @property
    def args(self):
        return self.model.args

    @property
    def pad_id(self) -> int | None:
        return self.model.args.pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T], right-padded with pad_token_id -> rewards [B] (fp32)."""
        B, T = input_ids.shape
        last = last_token_index(input_ids, self.pad_id)
        keep = torch.arange(B, device=input_ids.device) * T + last  # only the scored positions leave the trunk
        h = self.model.run(input_ids, logits=False, keep=keep).hidden[0]  # [B, D] after the final norm
        return self.score(h).squeeze(-1).float()

    def packed(self, seqs: list[list[int]]) -> torch.Tensor:
        """Rewards [N] (fp32) of N token lists, padding-free: laid end to end in one row, each attending
        to itself only (positions restart), the reward read at each one's last token. Equals forward()
        on the right-padded batch (for sequences that do not end in pad ids), without the padding's work.
        (A DSA model whose pack would pass index_topk tokens takes the padded batch.)"""
        lengths = [len(s) for s in seqs]
        device = self.score.weight.device
        if self.args.dsa and sum(lengths) > self.args.index_topk:
            # sparse attention selects its keys under a dense [T, T] mask: packing would square the pack's length
            return self(pad_batch(seqs, self.pad_id if self.pad_id is not None else 0).to(device))
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)[None]  # [1, Σ len]
        ends = torch.tensor(lengths, device=device).cumsum(0)
        h = self.model.run(ids, logits=False, doc_lens=lengths, keep=ends - 1).hidden[0]  # [N, D]
        return self.score(h).squeeze(-1).float()

    @torch.no_grad()
    def score_sequences(self, seqs: list[list[int]], batch_size: int = 16) -> list[float]:
        """Rewards of token lists, batch_size at a time (packed, see `packed`)."""
        return [x for i in range(0, len(seqs), batch_size) for x in self.packed(seqs[i:i + batch_size]).tolist()]

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu",
                        pad_token_id: int | None = None, require_head: bool = False) -> "RewardModel":
        """A reward-model dir (score.weight: ours or transformers') or any DeepSeek checkpoint (a new,
        randomly initialised head; require_head: that is an error instead). pad_token_id: used when the
        config has none."""
        path = resolve_model_dir(path)
        try:
            config = json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}/config.json: cannot read ({e})") from None
        is_rm = any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])
        if require_head and not is_rm:
            raise CheckpointError(f"{path}: not a reward model (config.json architectures {config.get('architectures')}"
                                  f"; train one with `nanoseek rm`)")
        model = load(path, dtype=dtype, device=device, head="score" if is_rm else "lm")
        if model.args.pad_token_id is None and pad_token_id is not None:
            model.args = model.args.replace(pad_token_id=pad_token_id)
        score = _read_tensor(Path(path), "score.weight") if is_rm else None
        if is_rm and score is None:
            raise CheckpointError(f"{path}: config.json names a ForSequenceClassification model but no "
                                  f"score.weight tensor is stored")
        return cls(model, score).eval()

    def save_pretrained(self, path) -> None:
        """transformers' DeepseekV3ForSequenceClassification layout, atomically (see module doc)."""
        arch = self.model.args.to_config()["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
        save(self.model, path, score=self.score.weight,
             config_extra={"architectures": [arch], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})


def _read_tensor(path: Path, name: str) -> torch.Tensor | None:
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read ({e})") from None
    return None


class RewardScorer:
    """A reward model as a GRPO reward term (`nanoseek grpo --reward rm:PATH=W`): scores a group's
    completions in batches. Each is rendered as the RM was trained, with the RM's own tokenizer and
    chat template: the user prompt, then the completion's final answer as the assistant reply (the
    reasoning before </think> is left out: R1 §2.3.4 judges helpfulness on the final summary).
    `batched = True` tells the stage to call `score` rather than fn(prompt, completion, answer)."""

    batched = True

    def __init__(self, path, device="cpu", batch_size: int = 16):
        from nanoseek.data import Tokenizer

        self.path = resolve_model_dir(path)
        self.model = RewardModel.from_pretrained(self.path, device=device, require_head=True)
        self.model.requires_grad_(False)
        if not (self.path / "tokenizer.json").is_file():
            raise CheckpointError(f"{self.path}: a reward model needs its tokenizer.json next to it")
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.batch_size = batch_size

    def encode(self, prompt: str, completion: str, in_reasoning: bool = False) -> list[int]:
        from nanoseek.data import DataError
        from nanoseek.data.chat import encode_chat
        from nanoseek.inference.reasoning import split_reasoning

        answer = split_reasoning(completion, in_reasoning)[1]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        try:
            return encode_chat(self.tokenizer, messages)[0]
        except DataError:  # a reply the template cannot split cleanly: render the text whole
            tok = self.tokenizer
            return tok.encode(tok.apply_chat_template(messages[:1], add_generation_prompt=True) + answer) + [tok.eos_id]

    def score(self, prompts: list[str], completions: list[str], in_reasoning: bool = False,
              answers: list[str] | None = None) -> list[float]:
        """Rewards of completions (answers: unused, a reward model judges without a reference)."""
        seqs = [self.encode(p, c, in_reasoning)[-self.model.args.max_position_embeddings:]
                for p, c in zip(prompts, completions)]
        return self.model.score_sequences(seqs, self.batch_size)
