"""Evaluation: perplexity, generation with live retrieval, and scoring."""
