"""A few sampled completions to look at while training (nanoGPT/nanochat style).

Deliberately the simplest loop there is: the whole prefix is recomputed for every new token
(no KV cache), which costs nothing at the tiny sizes this is used for. Real decoding lives in
the inference engine.
"""

from __future__ import annotations

import torch

from nanoseek.model import Transformer


@torch.no_grad()
def sample(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int = 40, stop_ids: tuple[int, ...] = (), seed: int = 0) -> list[int]:
    """prompt ids -> up to `max_new_tokens` new ids (stops after a stop id, which is included).

    temperature 0 is greedy; top_k 0 samples from the whole vocabulary."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    limit = model.args.max_position_embeddings
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -limit:])[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        new.append(nxt)
        if nxt in stop_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return new
