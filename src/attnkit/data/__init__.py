"""Data for training and evaluation: seeded synthetic tasks, tokenizers, text sources, batching."""
