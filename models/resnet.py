"""ResNet18/50/152 with a 2-class head, on torchvision's builders (no copy of the architecture here)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

MODEL_NAMES = ("resnet18", "resnet50", "resnet152")
STEMS = ("standard", "seed")


class ModelError(ValueError):
    """An unknown model name or stem, or a weights file that does not fit; the message says what to do."""


def load_error_reason(err: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in a line or two. torch's own text for such a file (a JSON,
    a pickle holding code) opens with a paragraph advising `weights_only=False` - unsafe for a file of unknown
    origin - and filing an issue, and ends with a link: neither is the user's next step, so only the unpickler's
    reason between them is kept."""
    text = str(err).strip()
    if not text.startswith("Weights only load failed"):
        return f"{type(err).__name__}: {text}"
    middle = [part.strip() for part in text.split("\n\n")[1:] if part.strip()
              and not part.strip().startswith("Check the documentation")]
    reason = " ".join(middle) or "no reason given"
    return f"not a file of weights that torch.load reads with weights_only=True: {reason}"


def build_model(name: str, num_classes: int = 2, stem: str = "standard",
                pretrained: str | os.PathLike | None = None) -> nn.Module:
    """A torchvision ResNet with a `num_classes` head.

    stem="seed" drops the 3x3 max-pool after conv1, as the original report's code did (feature maps 4x larger than
    torchvision's at the same input size). `pretrained` is a local file of weights for the 1000-class model (e.g.
    torchvision's ImageNet weights, downloaded by the user); everything but the head is loaded, the head is new.
    """
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if stem not in STEMS:
        raise ModelError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    builder = getattr(torchvision.models, name)
    model = builder(weights=None, num_classes=num_classes)
    if pretrained is not None:
        load_backbone(model, Path(pretrained))
    if stem == "seed":
        model.maxpool = nn.Identity()
    return model


def load_backbone(model: nn.Module, path: Path) -> None:
    """Load every weight but the classification head from `path` (a state dict, no arbitrary pickle)."""
    if not path.is_file():
        raise ModelError(f"--pretrained {path}: no such file (download the weights first; nothing is fetched here)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad or unsafe file
        raise ModelError(f"--pretrained {path}: not a loadable weights file ({load_error_reason(err)})") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a checkpoint of ours
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: weights of another architecture
        first = str(err).split("\n\t")[1] if "\n\t" in str(err) else str(err)
        raise ModelError(f"--pretrained {path} does not fit {type(model).__name__} (e.g. {first.strip()}); use "
                         f"weights of the same architecture") from err
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ModelError(f"--pretrained {path} does not fit {type(model).__name__}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
