"""Corpus files and the built-in corpora, the tokenizer, and the QA / instruction formats (prompts, blends)."""
