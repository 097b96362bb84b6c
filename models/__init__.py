"""Network builders; they know nothing of data."""
from models.resnet import MODEL_NAMES, STEMS, ModelError, build_model, load_error_reason

__all__ = ["MODEL_NAMES", "STEMS", "ModelError", "build_model", "load_error_reason"]
