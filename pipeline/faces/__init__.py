"""Face detection + landmark backends behind one small interface (see base.py)."""
from .base import Face, FaceDetector, make_detector

__all__ = ["Face", "FaceDetector", "make_detector"]
