"""nanoseek: DeepSeek-V3 / R1 end to end in one readable PyTorch codebase."""

__version__ = "0.1.0"
