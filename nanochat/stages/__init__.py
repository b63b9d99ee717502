"""Pipeline stages. Each module has a `Config` dataclass and `run(config, runtime) -> dict`.

Stages may import the core modules (`nanochat.tokenizer`, `nanochat.gpt`, ...);
core modules never import stages.
"""
