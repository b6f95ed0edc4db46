"""astrea: a persistent expert-feature cache and a trainer that streams it (Astrea, arXiv 2503.09445)."""

__version__ = "0.1.0"
