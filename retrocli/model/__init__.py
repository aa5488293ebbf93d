"""The Retro model: the architecture, readable top to bottom."""
