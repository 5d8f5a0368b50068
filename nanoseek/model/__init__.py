"""The DeepSeek-V3/V2 model: `ModelArgs` (config.json fields) and `Transformer`."""

from .args import PRESETS, ConfigError, ModelArgs, preset
from .moe import Routing
from .transformer import Output, Transformer

__all__ = ["ModelArgs", "Transformer", "Output", "Routing", "ConfigError", "PRESETS", "preset"]
