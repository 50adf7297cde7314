"""Curation library: raw talking-head video -> training-ready WebDataset shards (see README)."""
__version__ = "0.1.0"
