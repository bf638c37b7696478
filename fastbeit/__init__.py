"""fastbeit: fast, faithful BEiT (BERT pre-training of image transformers)."""

__version__ = "0.1.0"
