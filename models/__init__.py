"""Network builders; they know nothing of data."""
from models.resnet import MODEL_NAMES, STEMS, ModelError, build_model

__all__ = ["MODEL_NAMES", "STEMS", "ModelError", "build_model"]
