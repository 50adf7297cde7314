"""Training features of kept clips (curation stage "features"; schemas: latent/audio/kps/motion.npy).

Each module is one feature with its own definition, references and smoke model:
``vae`` (SD 1.5 posterior mean, fp32; std optional), ``wav2vec`` (all hidden states at 25 fps, fp32),
``dwpose`` (68 face keypoints), ``motion`` (Loopy 3.5 variances, raw and face-size normalised);
``extractor`` runs them all.
"""
from .extractor import FeatureExtractor
from .motion import motion_table, motion_variances
from .wav2vec import to_16k_mono

__all__ = ["FeatureExtractor", "motion_table", "motion_variances", "to_16k_mono"]
