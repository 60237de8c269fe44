"""textbook: textbook-quality pretraining data (synthetic textbooks + educational web pages → tokenized shards)."""

__version__ = "0.1.0"
