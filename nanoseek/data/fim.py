"""Documents -> token ids, with Fill-in-the-Middle (FIM) on a fraction of them.

DeepSeek-V3 (section 4.1 of its report) trains with FIM at rate 0.1 in the
Prefix-Suffix-Middle (PSM) layout: a document is cut at two random points into
pre / middle / suf and rearranged so that predicting the middle comes last,

    BOS <｜fim▁begin｜> pre <｜fim▁hole｜> suf <｜fim▁end｜> middle EOS

The model learns ordinary left-to-right prediction from it (pre, suf and middle are plain
text) and, on top, infilling: given the code before and after a hole, write the hole.
Every other document is plain `BOS text EOS`. The three pieces are tokenized separately and
joined with the special ids, so the hole boundaries fall on token boundaries.

Cuts are at character positions (not token positions) chosen uniformly, as in DeepSeek-Coder
and StarCoder. The random stream is a `random.Random` the caller seeds and passes through
the documents in order, so the same seed and order give the same FIM documents.
"""

import random

from nanoseek.data.corpus import DataError
from nanoseek.data.tokenizer import Tokenizer


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Cut text at two uniform random character positions: (pre, middle, suf)."""
    i, j = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:i], text[i:j], text[j:]


def fim_tokens(tok: Tokenizer, pre: list[int], middle: list[int], suf: list[int]
               ) -> list[int]:
    """The PSM layout from already-tokenized pieces."""
    return ([tok.bos_id, tok.fim_begin_id] + pre + [tok.fim_hole_id] + suf
            + [tok.fim_end_id] + middle + [tok.eos_id])


def encode_documents(tok: Tokenizer, texts: list[str], rng: random.Random,
                     fim_rate: float = 0.1) -> tuple[list[list[int]], int]:
    """Tokenize documents for pre-training.

    Returns (one id list per document, number of documents turned into FIM). Uses the
    tokenizer's batch encoder on all pieces at once, which runs on every core.
    """
    if fim_rate > 0 and None in (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id):
        raise DataError(f"FIM rate is {fim_rate} but tokenizer {tok.name} has no FIM "
                        f"tokens; use --fim-rate 0")
    pieces, is_fim = [], []
    for text in texts:
        # No draw at all when FIM is off, so fim_rate=0 leaves the stream untouched.
        if fim_rate > 0 and rng.random() < fim_rate:
            pre, middle, suf = fim_split(text, rng)
            pieces += [pre, middle, suf]
            is_fim.append(True)
        else:
            pieces.append(text)
            is_fim.append(False)
    ids = iter(tok.encode_batch(pieces))
    docs = []
    for fim in is_fim:
        if fim:
            pre, middle, suf = next(ids), next(ids), next(ids)
            docs.append(fim_tokens(tok, pre, middle, suf))
        else:
            docs.append([tok.bos_id] + next(ids) + [tok.eos_id])
    return docs, sum(is_fim)
