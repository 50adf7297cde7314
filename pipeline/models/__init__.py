"""Model weights: the registry of full-profile files (names, paths, URLs, checksums) and the
one-time fetcher used by ``jobs/fetch_models.py``. Workers only read the model directory."""
from .registry import FULL_MODELS, FetchError, ModelFile, ModelSpec, fetch_models, require_file, require_model

__all__ = ["FULL_MODELS", "FetchError", "ModelFile", "ModelSpec", "fetch_models", "require_file", "require_model"]
