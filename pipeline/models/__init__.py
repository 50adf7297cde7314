"""Model weights: the registry of full-profile files (names, paths, URLs, checksums), the
one-time fetcher used by ``jobs/fetch_models.py``, and the sha256 check every loader runs before
it opens a weights file (``verified_file``). Workers only read the model directory."""
from .registry import (FULL_MODELS, FetchError, ModelFile, ModelSpec, UntrustedModelFile, fetch_models,
                       register_local_files, require_file, require_model, verified_file, verified_model_path,
                       verified_tree)

__all__ = ["FULL_MODELS", "FetchError", "ModelFile", "ModelSpec", "UntrustedModelFile", "fetch_models",
           "register_local_files", "require_file", "require_model", "verified_file", "verified_model_path",
           "verified_tree"]
