"""Pretraining runner: model, streaming shard loader, trainer, growth, HF export, ablations (see README.md)."""
