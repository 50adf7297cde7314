"""Training features of kept clips (curation stage "features"; schemas: latent/audio/kps/motion.npy).

Each module is one feature with its own definition, references and smoke model:
``vae`` (SD 1.5 posterior mean+std), ``wav2vec`` (all hidden states at 25 fps),
``dwpose`` (68 face keypoints), ``motion`` (Loopy 3.5 variances); ``extractor`` runs them all.
"""
from .extractor import FeatureExtractor
from .motion import motion_variances
from .wav2vec import to_16k_mono

__all__ = ["FeatureExtractor", "motion_variances", "to_16k_mono"]
