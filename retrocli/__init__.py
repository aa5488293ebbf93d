"""retro: retrieval-enhanced language models (RETRO, InstructRetro), from a corpus to a scored model."""

__version__ = "0.1.0"
