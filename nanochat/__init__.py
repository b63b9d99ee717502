"""nanochat: from raw text to a chat model in one small, readable codebase."""

__version__ = "0.1.0"
