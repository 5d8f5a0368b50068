"""From logits to tokens: the per-request sampling parameters, the truncations and the draw.

Design choices:

* **One uniform number per draw, from the request's own stream.** A draw is inverse-CDF
  sampling: `u ~ U[0, 1)` from the request's `RandomStream` (its own `torch.Generator`), then the
  first token whose cumulative probability exceeds `u`. A seeded request therefore consumes its
  random stream the same way whatever else is in the batch, so its output does not depend on its
  neighbours. (The Gumbel/exponential trick gpt-fast uses needs V random numbers per row; one is
  enough here.) The stream draws its generator a block at a time: one call per 64 tokens instead of
  one per token and request (a batch-64 step spent ~0.1 ms in 64 generator calls), the same numbers.
* **Truncations in a fixed, documented order**: temperature → top-k → top-p (on the top-k set,
  renormalised) → min-p (relative to the most likely token). They produce a full probability
  vector, so the same function feeds both plain sampling and the speculative acceptance rule,
  which needs p and q as distributions.
* **temperature 0 is greedy** (argmax of the raw logits), as in the OpenAI API.
* **Logprobs are of the raw model distribution** (log-softmax before temperature and truncation),
  as vLLM reports them by default.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

# torch.Generator.manual_seed takes a 64-bit seed.
SEED_LIMIT = 2**64


def _is_int(x) -> bool:
    """An integer (Python or numpy), not a bool and not a float that happens to be whole."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """How one request is decoded.

    max_new_tokens: generated tokens at most (the stop token counts);
    temperature: 0 = greedy; top_p: nucleus mass (1 = off); top_k: keep the k most likely (0 = off);
    min_p: drop tokens below min_p × p(most likely) (0 = off);
    seed: seeds this request's own generator (None: drawn from torch's global RNG, so
    `torch.manual_seed` still makes a run reproducible);
    stop: strings that end generation (need a tokenizer; cut out of the text);
    stop_token_ids: extra ids that end generation like EOS; ignore_eos: do not stop on EOS;
    logprobs: None, or how many top alternatives to report per token (0 = the chosen token only).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field: every field's type and range (token ids
        and logprobs bounded by `vocab_size` when given). A float where an int belongs is an
        error, never truncated; NaN and infinities are errors."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        V = vocab_size
        checks = [
            (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (_is_real(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p must be a number in (0, 1]"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (_is_real(self.min_p) and 0 <= self.min_p < 1, "min_p must be a number in [0, 1)"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < SEED_LIMIT),
             f"seed must be None or an integer in [0, 2**64)"),
            (isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
             "stop must be a list of non-empty strings"),
            (isinstance(self.stop_token_ids, (list, tuple, set)) and all(_is_int(t) and t >= 0 and (V is None or t < V)
                                                                        for t in self.stop_token_ids),
             "stop_token_ids must be a list of integer token ids" + (f" in [0, {V})" if V else " >= 0")),
            (isinstance(self.ignore_eos, bool), "ignore_eos must be true or false"),
            (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= (V or self.logprobs)),
             "logprobs must be None or an integer >= 0" + (f" and <= the vocabulary size {V}" if V else "")),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request; seed None draws one from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.Generator().manual_seed(seed)


class RandomStream:
    """One request's U[0, 1) numbers: its own generator's float64 stream (`make_generator(seed)`),
    drawn BLOCK numbers per generator call. The numbers and their order are those of one
    `torch.rand(1, generator=g, dtype=torch.float64)` per draw (a CPU generator fills a tensor
    serially), so a seed gives the same tokens whichever way they are drawn."""

    BLOCK = 64

    def __init__(self, seed: int | None):
        self.generator = make_generator(seed)
        self._left: list[float] = []  # the block's numbers not drawn yet, last first

    def next(self) -> float:
        if not self._left:
            self._left = torch.rand(self.BLOCK, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        return self._left.pop()

    def tensor(self, device) -> torch.Tensor:
        """The next number as a float64 [1] tensor on `device`."""
        return torch.tensor([self.next()], dtype=torch.float64, device=device)


def uniforms(streams: list[RandomStream], device) -> torch.Tensor:
    """The next U[0, 1) number of each stream -> float64 [n] on `device`."""
    return torch.tensor([s.next() for s in streams], dtype=torch.float64, device=device)


def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [n, V] -> the sampling distribution [n, V] (fp32, rows sum to 1) of each row's params.

    Rows must not be greedy (temperature > 0). Truncated tokens get probability exactly 0.
    """
    device = logits.device
    temperatures = {p.temperature for p in params}
    if temperatures == {1.0}:  # x / 1 is x: skip the division (RL rollouts)
        probs = logits.float().softmax(dim=-1)
    else:
        temperature = torch.tensor([p.temperature for p in params], device=device)
        probs = (logits.float() / temperature[:, None]).softmax(dim=-1)
    if all(p.top_k == 0 and p.top_p >= 1 and p.min_p == 0 for p in params):
        return probs
    V = probs.shape[-1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else V for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=device)
    sorted_p = sorted_p * (rank < top_k[:, None])
    # top-p: keep a token while the mass strictly before it is below top_p (so at least one stays)
    before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p * (before < top_p[:, None] * sorted_p.sum(dim=-1, keepdim=True))
    sorted_p = sorted_p * (sorted_p >= min_p[:, None] * sorted_p[:, :1])
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling. probs [n, V] (rows need not be normalised), u [n] in [0, 1) -> ids [n]."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.double() * cdf[:, -1])[:, None]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    # u·total can round up to total itself; never return a zero-probability token for it.
    zero = probs.gather(-1, ids[:, None]).squeeze(-1) <= 0
    if bool(zero.any()):
        ids = torch.where(zero, probs.argmax(dim=-1), ids)
    return ids


def sample(logits: torch.Tensor, params: list[SamplingParams], streams: list[RandomStream]) -> torch.Tensor:
    """logits [n, V] -> token ids [n]: argmax for greedy rows, a draw from `probabilities` otherwise
    (with the next number of the row's stream)."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == len(params):  # every row samples (GRPO rollouts): no argmax, no row gathers
        return draw(probabilities(logits, params), uniforms(streams, logits.device))
    ids = logits.argmax(dim=-1)
    if rows:
        index = torch.tensor(rows, device=logits.device)
        probs = probabilities(logits[index], [params[i] for i in rows])
        ids[index] = draw(probs, uniforms([streams[i] for i in rows], logits.device))
    return ids


def logprobs(logits: torch.Tensor, ids: torch.Tensor, params: list[SamplingParams]
             ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Raw-model logprobs of the chosen ids [n] and each row's top-`params.logprobs` alternatives.

    Returns (chosen: float or None per row, top: [(token_id, logprob), ...] best first, or None per
    row). Rows with `logprobs=None` get None and cost nothing.
    """
    n = len(params)
    chosen: list[float | None] = [None] * n
    top: list[list[tuple[int, float]] | None] = [None] * n
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return chosen, top
    if len(rows) == n:  # every row (RL rollouts): no row gather
        logp, chosen_ids = logits.float().log_softmax(dim=-1), ids
    else:
        index = torch.tensor(rows, device=logits.device)
        logp, chosen_ids = logits[index].float().log_softmax(dim=-1), ids[index]
    picked = logp.gather(-1, chosen_ids[:, None]).squeeze(-1).tolist()
    k = max(params[i].logprobs for i in rows)
    best = logp.topk(k, dim=-1) if k > 0 else None
    for j, i in enumerate(rows):
        chosen[i] = picked[j]
        n_top = params[i].logprobs
        top[i] = [] if best is None else list(zip(best.indices[j, :n_top].tolist(), best.values[j, :n_top].tolist()))
    return chosen, top
