"""The data pipeline: corpus -> tokenizer -> FIM -> packed token shards -> batches.

    corpus.py     read files / dirs / the embedded stdlib corpus into documents
    tokenizer.py  the DeepSeek-style BPE (or the real V3 vocabulary) and the chat format
    fim.py        documents -> ids, Prefix-Suffix-Middle FIM on a fraction of them
    shards.py     train/val split, the .bin token-shard format, its writer and reader
    loader.py     resumable shuffled training batches and in-order eval batches

The `nanoseek prepare` stage (nanoseek/stages/prepare.py) runs them in this order.
"""

from nanoseek.data.corpus import (Corpus, DataError, read_corpus, stdlib_corpus,
                                  stdlib_files)
from nanoseek.data.fim import encode_documents, fim_split, fim_tokens
from nanoseek.data.loader import BatchLoader, eval_batches
from nanoseek.data.shards import ShardWriter, TokenShards, read_header, split_documents
from nanoseek.data.tokenizer import Tokenizer, load_deepseek_v3, train_bpe

__all__ = [
    "BatchLoader", "Corpus", "DataError", "ShardWriter", "TokenShards", "Tokenizer",
    "encode_documents", "eval_batches", "fim_split", "fim_tokens", "load_deepseek_v3",
    "read_corpus", "read_header", "split_documents", "stdlib_corpus", "stdlib_files",
    "train_bpe",
]
