"""Inference: a continuous-batching engine over MLA's latent cache, with MTP speculative decoding.

    engine.py       Engine (add_request / step / cancel, generate, stream): the scheduler
    request.py      Request, StepEvent, prompt checks
    prefill.py      prompts into the cache in padded groups and chunks
    decode.py       Decoder: the per-step model work (absorbed attention, compiled or eager, speculative)
    compiled.py     torch.compile of the hot path: when it pays, its disk cache, eager fallback
    cache.py        the preallocated latent cache (kv_lora_rank + rope values per token per layer)
    sampling.py     SamplingParams, temperature / top-k / top-p / min-p, seeded draws, logprobs
    speculative.py  drafting with the MTP modules and the verification rule
    text.py         incremental detokenisation and stop strings
    chat.py         chat prompts from the tokenizer's template
    reasoning.py    R1 replies split into reasoning and answer, whole or as they stream
"""

from .chat import chat_prompt
from .reasoning import ReasoningParser, split_reasoning
from .engine import Engine
from .request import RequestFailed, StepEvent
from .sampling import SamplingParams

__all__ = ["Engine", "RequestFailed", "SamplingParams", "StepEvent", "chat_prompt", "ReasoningParser", "split_reasoning"]
