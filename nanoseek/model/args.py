"""ModelArgs: one dataclass whose field names are the checkpoints' own `config.json` keys.

A DeepSeek `config.json` round-trips through `ModelArgs.from_config` / `to_config` without a
translation table. Two spellings exist in the wild and both are read:

* the official DeepSeek style: `rope_scaling` + top-level `rope_theta`, `num_nextn_predict_layers`,
  `quantization_config` (FP8 checkpoints);
* the newer transformers style: `rope_parameters` (with `rope_theta` inside), `num_mtp_layers`.

We always write the official style (it is what the released checkpoints use, and transformers
reads it). Unknown keys and contradictory values raise `ConfigError` instead of being guessed at.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that nanoseek cannot interpret faithfully."""


@dataclass
class ModelArgs:
    model_type: str = "deepseek_v3"  # "deepseek_v3", "deepseek_v32" (V3 + DSA) or "deepseek_v2": decides the defaults
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # width of the dense FFN in the first layers
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    first_k_dense_replace: int = 3  # layers [0, k) use a dense FFN, the rest DeepSeekMoE
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    initializer_range: float = 0.006  # V3 paper: all weights ~ N(0, 0.006)
    hidden_act: str = "silu"
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # mla
    q_lora_rank: int | None = 1536  # None: queries use one full-rank q_proj (V2-Lite)
    kv_lora_rank: int = 512  # size of the cached latent c_KV
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # the decoupled, RoPE-carrying part (shared key across heads)
    v_head_dim: int = 128
    # dsa (deepseek_v32 only): a lightning indexer per attention layer picks index_topk past tokens
    index_n_heads: int = 64
    index_head_dim: int = 128  # one key per token, its first qk_rope_head_dim channels rotated
    index_topk: int = 2048
    # moe
    moe_intermediate_size: int = 2048  # width of one fine-grained expert
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8  # experts are split in n_group groups (a node at scale) ...
    topk_group: int = 4  # ... and a token may only reach topk_group of them
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3, biased sigmoid), "greedy", "group_limited_greedy" (V2)
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    norm_topk_prob: bool = True  # renormalise the chosen gate weights to sum to 1
    routed_scaling_factor: float = 2.5
    # mtp
    num_nextn_predict_layers: int = 1  # D, the number of sequential MTP modules
    # rope / yarn
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # checkpoints rotate adjacent pairs (complex view), not halves
    # storage
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None  # FP8 block-quantised weights, dequantised on load

    def __post_init__(self):
        self.validate()

    # --- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters when `rope_scaling` asks for YaRN, else None."""
        if not self.rope_scaling:
            return None
        return self.rope_scaling

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale^2 under YaRN (DeepSeek-V2 appendix, V3 config)."""
        scale = self.qk_head_dim**-0.5
        if self.yarn and self.yarn.get("mscale_all_dim"):
            m = yarn_mscale(self.yarn["factor"], self.yarn["mscale_all_dim"])
            scale = scale * m * m
        return scale

    @property
    def dsa(self) -> bool:
        """DeepSeek Sparse Attention (V3.2): a lightning indexer in every attention layer."""
        return self.model_type == "deepseek_v32"

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace

    # --- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        """Every field's type and range (FIELD_RULES), then the limits between fields. One ConfigError
        naming the field and the value, for `--set`, config.json and presets alike."""
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        missing = {f.name for f in dataclasses.fields(self)} - set(FIELD_RULES)
        need(not missing, f"no validation rule for ModelArgs fields {sorted(missing)}")  # a new field needs one
        for name, rule in FIELD_RULES.items():
            problem = rule(getattr(self, name))
            need(problem is None, f"{name} {problem}, got {getattr(self, name)!r}")

        need(self.model_type in MODEL_TYPES,
             f"model_type {self.model_type!r} is not supported ({', '.join(MODEL_TYPES)})")
        if self.dsa:
            need(self.q_lora_rank is not None, "deepseek_v32 needs q_lora_rank (the indexer reads the query latent)")
            need(self.qk_rope_head_dim <= self.index_head_dim,
                 f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim}")
            need(self.rope_interleave, "deepseek_v32 checkpoints use rope_interleave=true")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (silu)")
        need(self.scoring_func in ("sigmoid", "softmax"),
             f"scoring_func {self.scoring_func!r} is not supported (sigmoid, softmax)")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
             f"topk_method {self.topk_method!r} is not supported (noaux_tc, greedy, group_limited_greedy)")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even (RoPE rotates pairs), got "
                                             f"{self.qk_rope_head_dim}")
        need(self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers="
             f"{self.num_hidden_layers}]")
        for name in ("bos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            need(tid is None or tid < self.vocab_size, f"{name}={tid} is outside the vocabulary (vocab_size="
                                                       f"{self.vocab_size})")
        for tid in self.eos_token_ids:
            need(tid < self.vocab_size, f"eos_token_id={tid} is outside the vocabulary (vocab_size={self.vocab_size})")
        if self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers:
            need(self.n_routed_experts > 0 and self.moe_intermediate_size > 0,
                 "MoE layers need n_routed_experts > 0 and moe_intermediate_size > 0")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts="
                 f"{self.n_routed_experts}]")
        need(self.n_routed_experts % self.n_group == 0,
             f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
        need(self.topk_group <= self.n_group, f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.topk_method != "greedy" and self.topk_group < self.n_group:
            per_group = self.n_routed_experts // self.n_group
            need(self.topk_group * per_group >= self.num_experts_per_tok,
                 f"topk_group={self.topk_group} groups of {per_group} experts cannot hold num_experts_per_tok="
                 f"{self.num_experts_per_tok} experts")
            if self.topk_method == "noaux_tc":
                need(per_group >= 2, "noaux_tc scores a group by its top-2 experts: groups need >= 2 experts")
        if self.yarn is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind == "yarn", f"rope_scaling type {kind!r} is not supported (yarn)")
            unknown = set(self.rope_scaling) - set(_YARN_RULES)
            need(not unknown, f"unknown rope_scaling keys: {sorted(unknown)}")
            need("factor" in self.rope_scaling and "original_max_position_embeddings" in self.rope_scaling,
                 "rope_scaling (yarn) needs factor and original_max_position_embeddings")
            for key, rule in _YARN_RULES.items():
                if key in self.rope_scaling:
                    problem = rule(self.rope_scaling[key])
                    need(problem is None, f"rope_scaling.{key} {problem}, got {self.rope_scaling[key]!r}")
        if self.quantization_config is not None:
            q = self.quantization_config
            need(q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3",
                 f"quantization_config {q} is not supported (quant_method fp8, fmt e4m3)")
            block = q.get("weight_block_size", [128, 128])
            need(isinstance(block, (list, tuple)) and len(block) == 2 and all(_is_int(b) and b > 0 for b in block),
                 f"quantization_config.weight_block_size must be [rows, cols], got {block!r}")

    # --- config.json I/O ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a parsed config.json (either spelling). Raises ConfigError on anything off."""
        if not isinstance(config, dict):
            raise ConfigError("config.json must hold a JSON object")
        cfg = dict(config)
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json model_type {model_type!r} is not supported ({', '.join(MODEL_TYPES)})")
        defaults = {"deepseek_v3": V3_DEFAULTS, "deepseek_v32": V32_DEFAULTS, "deepseek_v2": V2_DEFAULTS}[model_type]
        if model_type != "deepseek_v32" and any(k.startswith("index_") for k in cfg):
            raise ConfigError(f"index_* keys belong to deepseek_v32 configs, not {model_type}")
        kwargs: dict[str, Any] = dict(defaults)

        # RoPE: `rope_parameters` (new) vs `rope_scaling` + `rope_theta` (official). Both may be present
        # when a config was re-saved by transformers; then they must agree.
        params = cfg.pop("rope_parameters", None)
        scaling = cfg.pop("rope_scaling", None)
        theta = cfg.pop("rope_theta", None)
        for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key} must be an object or null, got {value!r}")
        for key, value in (("rope_theta", theta), ("rope_parameters.rope_theta", (params or {}).get("rope_theta"))):
            if value is not None and _number(0, strict=True)(value) is not None:
                raise ConfigError(f"{key} {_number(0, strict=True)(value)}, got {value!r}")
        if params is not None:
            params = dict(params)
            p_theta = params.pop("rope_theta", None)
            p_type = params.pop("rope_type", params.pop("type", "default"))
            if theta is not None and p_theta is not None and float(theta) != float(p_theta):
                raise ConfigError(f"rope_theta={theta} contradicts rope_parameters.rope_theta={p_theta}")
            theta = p_theta if p_theta is not None else theta
            p_scaling = None if p_type == "default" else {"type": p_type, **params}
            if p_type == "default" and params:
                raise ConfigError(f"rope_parameters has keys {sorted(params)} but rope_type 'default'")
            if scaling is not None and _norm_scaling(scaling) != _norm_scaling(p_scaling):
                raise ConfigError(f"rope_scaling={scaling} contradicts rope_parameters={config['rope_parameters']}")
            scaling = p_scaling
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        kwargs["rope_scaling"] = _norm_scaling(scaling)

        # MTP depth has two names.
        mtp_a, mtp_b = cfg.pop("num_nextn_predict_layers", None), cfg.pop("num_mtp_layers", None)
        if mtp_a is not None and mtp_b is not None and mtp_a != mtp_b:
            raise ConfigError(f"num_nextn_predict_layers={mtp_a} contradicts num_mtp_layers={mtp_b}")
        if mtp_a is not None or mtp_b is not None:
            kwargs["num_nextn_predict_layers"] = mtp_a if mtp_a is not None else mtp_b

        if "dtype" in cfg:  # transformers 5 renamed torch_dtype -> dtype
            d = cfg.pop("dtype")
            cfg.setdefault("torch_dtype", d)

        # Keys transformers or the official repo write that are either derived or irrelevant here.
        # Derived ones must agree with what we derive.
        checks = {
            "qk_head_dim": lambda a: a.qk_head_dim,
            "head_dim": lambda a: a.qk_rope_head_dim,
        }
        derived = {k: cfg.pop(k) for k in list(cfg) if k in checks}
        for key in ("tie_word_embeddings", "mlp_bias"):
            if cfg.pop(key, False):
                raise ConfigError(f"{key}=true is not supported by DeepSeek models")
        mlp_types = cfg.pop("mlp_layer_types", None)  # transformers' spelling of first_k_dense_replace
        if mlp_types is not None:
            k = cfg.get("first_k_dense_replace", defaults.get("first_k_dense_replace", 3))
            if list(mlp_types) != ["dense"] * k + ["sparse"] * (len(mlp_types) - k):
                raise ConfigError(f"mlp_layer_types {mlp_types} contradicts first_k_dense_replace={k}")
        if any(t != "indexed_attention" for t in cfg.pop("layer_types", None) or []):
            raise ConfigError("layer_types other than 'indexed_attention' are not supported")
        if cfg.pop("moe_layer_freq", 1) != 1:
            raise ConfigError("moe_layer_freq != 1 is not supported (every layer after first_k_dense_replace is MoE)")
        if cfg.pop("attention_dropout", 0.0) not in (0, 0.0, None):
            raise ConfigError("attention_dropout > 0 is not supported")
        for key in list(cfg):
            if key in _IGNORED_KEYS:
                cfg.pop(key)

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown config.json keys for {model_type}: {unknown}")
        kwargs.update(cfg)
        if kwargs.get("n_group") is None:
            kwargs["n_group"] = 1
        if kwargs.get("topk_group") is None:
            kwargs["topk_group"] = kwargs["n_group"]
        args = cls(**kwargs)
        for key, value in derived.items():
            if value is not None and value != checks[key](args):
                raise ConfigError(f"config.json {key}={value} contradicts the derived value {checks[key](args)}")
        return args

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file (a model directory needs a config.json)") from None
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_config(config)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_config(self) -> dict[str, Any]:
        """The official checkpoint spelling, readable by transformers too."""
        cfg = dataclasses.asdict(self)
        cfg["architectures"] = [ARCHITECTURES[self.model_type]]
        if not self.dsa:
            for key in ("index_n_heads", "index_head_dim", "index_topk"):
                del cfg[key]
        cfg["num_key_value_heads"] = self.num_attention_heads
        cfg["tie_word_embeddings"] = False
        cfg["moe_layer_freq"] = 1
        if cfg["quantization_config"] is None:
            del cfg["quantization_config"]
        return dict(sorted(cfg.items()))

    def replace(self, **changes) -> "ModelArgs":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# --- field rules: a function from the value to None (fine) or what is wrong with it ---------------
MAX_INT = 2**31 - 1  # sizes and token ids beyond int32 are typos (and overflow index tensors)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a size


def _int(lo: int, *, optional: bool = False):
    def rule(v):
        if v is None and optional:
            return None
        if not _is_int(v):
            return f"must be an integer{' or null' if optional else ''}"
        if not lo <= v <= MAX_INT:
            return f"must be in [{lo}, {MAX_INT}]"
        return None
    return rule


def _number(lo: float, *, strict: bool = False, hi: float = math.inf):
    def rule(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return "must be a finite number"
        if v < lo or (strict and v == lo) or v > hi:
            return f"must be {'>' if strict else '>='} {lo}" + (f" and <= {hi}" if hi < math.inf else "")
        return None
    return rule


def _kind(t: type, what: str, *, optional: bool = False):
    return lambda v: None if isinstance(v, t) or (optional and v is None) else f"must be {what}"


def _token_ids(v):
    if v is None or _is_int(v) and 0 <= v <= MAX_INT:
        return None
    if isinstance(v, list) and v and all(_is_int(x) and 0 <= x <= MAX_INT for x in v):
        return None
    return "must be a token id, a non-empty list of token ids, or null"


FIELD_RULES = {
    "model_type": _kind(str, "a string"),
    "vocab_size": _int(1), "hidden_size": _int(1), "intermediate_size": _int(1), "num_hidden_layers": _int(1),
    "num_attention_heads": _int(1), "first_k_dense_replace": _int(0),
    "rms_norm_eps": _number(0, strict=True, hi=1.0), "max_position_embeddings": _int(1),
    "initializer_range": _number(0), "hidden_act": _kind(str, "a string"), "attention_bias": _kind(bool, "true or false"),
    "bos_token_id": _int(0, optional=True), "eos_token_id": _token_ids, "pad_token_id": _int(0, optional=True),
    "q_lora_rank": _int(1, optional=True), "kv_lora_rank": _int(1), "qk_nope_head_dim": _int(1),
    "qk_rope_head_dim": _int(2), "v_head_dim": _int(1),
    "moe_intermediate_size": _int(0), "n_routed_experts": _int(0), "n_shared_experts": _int(0),
    "num_experts_per_tok": _int(0), "n_group": _int(1), "topk_group": _int(1),
    "topk_method": _kind(str, "a string"), "scoring_func": _kind(str, "a string"),
    "norm_topk_prob": _kind(bool, "true or false"), "routed_scaling_factor": _number(0, strict=True),
    "num_nextn_predict_layers": _int(0),
    "rope_theta": _number(0, strict=True), "rope_scaling": _kind(dict, "an object or null", optional=True),
    "rope_interleave": _kind(bool, "true or false"),
    "torch_dtype": lambda v: None if v in ("float32", "bfloat16", "float16") else "must be float32, bfloat16 or float16",
    "quantization_config": _kind(dict, "an object or null", optional=True),
    "index_n_heads": _int(1), "index_head_dim": _int(1), "index_topk": _int(1),
}
_YARN_RULES = {
    "type": _kind(str, "a string"), "factor": _number(1), "original_max_position_embeddings": _int(1),
    "beta_fast": _number(0), "beta_slow": _number(0), "mscale": _number(0), "mscale_all_dim": _number(0),
    "attention_factor": _number(0, strict=True), "truncate": _kind(bool, "true or false"),
}


def _norm_scaling(scaling: dict | None) -> dict | None:
    """`rope_scaling` with `rope_type` spelled `type`; None for no scaling."""
    if not scaling:
        return None
    s = dict(scaling)
    kind = s.pop("rope_type", None) or s.pop("type", None)
    s.pop("rope_theta", None)
    if kind in (None, "default"):
        return None
    return {"type": kind, **s}


# Written by transformers / the official repo, meaningless for the model maths.
_IGNORED_KEYS = {
    "architectures", "auto_map", "transformers_version", "use_cache", "pretraining_tp", "num_key_value_heads",
    "aux_loss_alpha", "seq_aux", "ep_size", "output_router_logits", "router_aux_loss_coef", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "num_labels", "problem_type",
    "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder", "_attn_implementation_autoset",
    "max_window_layers", "use_sliding_window", "sliding_window",
}

# The defaults of each family, applied before the file's own keys (a config.json may omit keys).
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM"}
MODEL_TYPES = tuple(ARCHITECTURES)
V3_DEFAULTS: dict[str, Any] = {}
V32_DEFAULTS: dict[str, Any] = dict(model_type="deepseek_v32")  # V3 sizes; index_* defaults are V3.2's
V2_DEFAULTS: dict[str, Any] = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288, num_hidden_layers=60,
    num_attention_heads=128, first_k_dense_replace=1, max_position_embeddings=163840, q_lora_rank=1536,
    moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8,
    topk_group=3, topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
    routed_scaling_factor=16.0, num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001,
)


# --- named sizes -------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on 2 CPU cores in minutes: 4 layers (1 dense), 8 experts with 2 groups, 1 MTP module.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=1.0, num_nextn_predict_layers=1, max_position_embeddings=4096,
        initializer_range=0.02, torch_dtype="float32",
    ),
    "small": dict(
        vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        first_k_dense_replace=1, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, moe_intermediate_size=256, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=4096,
        initializer_range=0.006,
    ),
    "deepseek-v3": dict(
        max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # tiny + DSA: the indexer keeps 64 of the past tokens, so contexts past 64 attend sparsely
    "tiny-v32": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=1.0, num_nextn_predict_layers=1, max_position_embeddings=4096,
        initializer_range=0.02, torch_dtype="float32", model_type="deepseek_v32", index_n_heads=4,
        index_head_dim=32, index_topk=64,
    ),
    "deepseek-v3.2": dict(
        model_type="deepseek_v32", max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
        num_attention_heads=16, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, moe_intermediate_size=1408,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
}


def preset(name: str, **overrides) -> ModelArgs:
    """ModelArgs for a named size, with any field overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    base = V2_DEFAULTS if kw.get("model_type") == "deepseek_v2" else V3_DEFAULTS
    merged = {**base, **kw, **overrides}
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown ModelArgs fields: {unknown}")
    return ModelArgs(**merged)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["hidden_size=256", "q_lora_rank=null", "rope_scaling={...}"] -> dict, values parsed as JSON
    (bare words fall back to strings). Unknown field names raise ConfigError."""
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not FIELD=VALUE")
        if key not in known:
            raise ConfigError(f"override {item!r}: unknown field {key!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
