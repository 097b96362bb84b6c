"""Class activation maps of a trained run over chosen cells (`python -m train.explain`), with the grad-cam library.

The cells come from the run's cache (a split, read through the run's own loader and fold) or from image files (through
the predictor: the build's preprocessing with the run's saved parameters); either way each cell is shown as the
evaluation view the model was given, with the map of the class the model called over it. The maps are the library's
(`pytorch_grad_cam`): no hooks of ours. The target layer is the last residual block of the ResNet (`layer4[-1]`), the
usual choice for Grad-CAM: its feature map is the finest that still carries the class evidence, and its side is the
map's true resolution (size/32 px with torchvision's stem, size/16 with the `seed` stem: 7x7 or 14x14 at 224 px);
the library enlarges it to the view's size, and scales each cell's map to [0, 1] on its own.

Memory and time stay bounded: choosing cells from a split needs one forward pass over it (in batches, as the
evaluation does; the probabilities are read back once at the end); from image files, the predictor's bounded
windows. Then only the chosen cells (at most `MAX_CELLS`) are read again and explained, `CAM_BATCH` at a time.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_grad_cam
import torch
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from pipeline import parallel
from train.data.loader import loader_for
from train.engine.distributed import Dist
from train.engine.loop import predict_split
from train.evaluation import gallery, picks
from train.evaluation.evaluator import open_run_cache
from train.evaluation.metrics import predicted_labels
from train.evaluation.mistakes import eval_views, read_rows
from train.evaluation.predictor import (Entry, PredictError, Predictor, check_out_folder, gather,
                                        predict_images)

log = logging.getLogger(__name__)

MAX_CELLS = 64  # a grid of more cells is no longer read cell by cell; and it bounds the work after the choice
# cells per map computation: the backward pass of 8 cells through a ResNet152 at 224 px added 1.8 GB to the peak
# memory on the CPU (34 s on the busy 2-core machine); a ResNet18 at 96 px needs a small part of that
CAM_BATCH = 8
COLUMNS = 4  # cells per row of the grid (each cell is two pictures: the view and the map over it)
# Methods that run the model once per channel of the target layer (512 for ResNet18, 2048 for ResNet50/152) for
# every cell: minutes on a CPU, where the gradient methods take seconds. Named here to warn; still offered.
SLOW_METHODS = ("ablationcam", "scorecam")


class ExplainError(PredictError):
    """A bad argument to train.explain (a split, a method, a number of cells); the message says what to pass."""


def _library_methods() -> dict[str, type]:
    """Every class activation map the installed grad-cam exports (the subclasses of its BaseCAM), by the names its
    own example script uses: the class name in lower case, `PlusPlus` as `++`, no underscore (GradCAMPlusPlus ->
    gradcam++, KPCA_CAM -> kpcacam). A newer grad-cam with more methods offers them without a change here."""
    found = {}
    for name, obj in vars(pytorch_grad_cam).items():
        if inspect.isclass(obj) and issubclass(obj, BaseCAM) and obj is not BaseCAM:
            found[name.lower().replace("plusplus", "++").replace("_", "")] = obj
    return dict(sorted(found.items()))


METHODS = _library_methods()
DEFAULT_METHOD = "gradcam"


@dataclass
class Cell:
    """One explained cell."""
    path: str
    patient: str
    label: int  # 0 hem, 1 all, -1 unknown
    prob_all: float
    kind: str  # why it was chosen (`picks`)
    view: np.ndarray  # (size, size, 3) uint8 RGB: the evaluation view
    heat: np.ndarray  # (size, size) float32 in [0, 1]: the map of the called class, scaled per cell


@dataclass
class Explanation:
    cells: list[Cell]
    title: str
    layer: str  # the target layer, e.g. `layer4[-1] (BasicBlock)`
    feature_hw: tuple[int, int]  # the target layer's feature map: the map's true resolution


# ----------------------------------------------------------------------------- the maps


def target_layer(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(the last residual block of a torchvision ResNet, its name): `layer4[-1]`, with either stem."""
    blocks = getattr(model, "layer4", None)
    if not isinstance(blocks, torch.nn.Sequential) or not len(blocks):
        raise ExplainError(f"the run's model ({type(model).__name__}) has no layer4 of residual blocks; train.explain "
                           f"takes the ResNets of models.build_model")
    return blocks[-1], f"layer4[{len(blocks) - 1}] ({type(blocks[-1]).__name__})"


def class_maps(model: torch.nn.Module, x: torch.Tensor, classes: list[int],
               method: str) -> tuple[np.ndarray, tuple[int, int]]:
    """((B, H, W) float32 maps in [0, 1], the target layer's (h, w)) of the `classes` (one output index per row) for
    the normalised input x (B, 3, H, W), by grad-cam's `method` on the last residual block."""
    if method not in METHODS:
        raise ExplainError(f"--method {method!r} is not one of grad-cam's: {', '.join(METHODS)}")
    layer, _ = target_layer(model)
    cam = METHODS[method](model, [layer])
    try:  # not `with`: the library's __exit__ swallows an IndexError, which must reach the user
        with torch.enable_grad():
            maps = cam(x, [ClassifierOutputTarget(c) for c in classes])
        seen = cam.activations_and_grads.activations
        feature_hw = tuple(seen[0].shape[-2:]) if seen else tuple(x.shape[-2:])
    finally:
        cam.activations_and_grads.release()  # removes the library's hooks from the model
        model.zero_grad(set_to_none=True)  # the backward pass filled the weights' .grad: free it
    return np.asarray(maps, np.float32), feature_hw


def _explain(predictor: Predictor, stored: torch.Tensor, probs_all: np.ndarray,
             method: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(views (k, s, s, 3) uint8, maps (k, s, s) float32, feature (h, w)) of stored (k, 3, S, S) uint8 images: the
    map of the class each was called, computed `CAM_BATCH` cells at a time, in full precision."""
    calls = predicted_labels(probs_all)
    classes = [predictor.all_index if c == 1 else 1 - predictor.all_index for c in calls]  # the two-class head
    maps, feature_hw = [], (0, 0)
    for start in range(0, len(stored), CAM_BATCH):
        x = predictor.augment.eval_transform(stored[start:start + CAM_BATCH].to(predictor.device))
        batch_maps, feature_hw = class_maps(predictor.model, x, classes[start:start + CAM_BATCH], method)
        maps.append(batch_maps)
    empty = np.empty((0, predictor.size, predictor.size), np.float32)
    return eval_views(stored, predictor.size), np.concatenate(maps) if maps else empty, feature_hw


# ----------------------------------------------------------------------------- the cells


def explain_split(predictor: Predictor, run_dir: Path, split: str, n: int, method: str,
                  batch_size: int | None = None) -> Explanation:
    """The `n` most useful cells of the run's `split` (`picks.useful_cells`), read from the run's cache (its fold's
    rows for a cross-validation run's train or valid), explained."""
    config = predictor.config
    reader = open_run_cache(config, Path(run_dir))
    if split not in reader.manifest["splits"]:
        raise ExplainError(f"the run's cache {config.cache_dir} has no split {split!r} (it has: "
                           f"{', '.join(sorted(reader.manifest['splits']))}); pass one of those as --split")
    loader = loader_for(reader, predictor.size, split, batch_size or predictor.batch_size, config.fold,
                        device=predictor.device)
    probs, labels = predict_split(predictor.model, loader, predictor.augment, predictor.precision, predictor.device,
                                  Dist())
    probs_all = probs[:, predictor.all_index]
    chosen = picks.useful_cells(probs_all, labels, n)
    rows = [p.index for p in chosen]
    views, maps, feature_hw = _explain(predictor, read_rows(loader, rows), probs_all[rows], method)
    cells = [Cell(str(loader.paths[p.index]), str(loader.patients[p.index]), int(labels[p.index]),
                  float(probs_all[p.index]), p.kind, view, heat) for p, view, heat in zip(chosen, views, maps)]
    what = f"split {split} ({len(labels)} images): {picks.describe(chosen, labels)}"
    return _explanation(predictor, cells, what, method, feature_hw)


def _stored(predictor: Predictor, entries: list[Entry]) -> torch.Tensor:
    """(k, 3, S, S) uint8: the stored images of `entries`, made by the build's own worker with the run's parameters
    (as `predict_images` makes them); a few images, read once more after they were chosen."""
    tasks = [(e.file, (predictor.size,)) for e in entries]
    window, workers = parallel.window_for(predictor.stored_size ** 2 * 3, parallel.workers(-1))
    outputs = parallel.results(tasks, predictor.preprocess, "threads", workers, None, window)
    try:
        images = []
        for entry, (ok, value) in zip(entries, outputs):
            if not ok:  # it was read a moment ago: changed on disk since
                raise PredictError(f"{entry.path}: {value}. The file changed while it was explained; run again")
            images.append(value[predictor.size])  # (S, S, 3) uint8
    finally:
        outputs.close()
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def explain_images(predictor: Predictor, inputs, n: int, method: str, batch_size: int | None = None,
                   progress="off") -> Explanation:
    """The images named by `inputs` (files, folders, source layouts: `predictor.gather`), explained: all of them in
    the order given when there are at most `n`, else the `n` most useful (`picks.useful_cells`; labels where a
    source layout gave them). A bad image stops it with the predictor's PredictError naming the file."""
    entries, _ = gather(inputs, None)  # None: stop at a bad image without suggesting --on-error, which explain lacks
    kept, probs_all, _ = predict_images(predictor, entries, batch_size or predictor.batch_size, False, None, progress)
    labels = np.array([e.label for e in kept], np.int64)
    if len(kept) <= n:
        chosen = [picks.Pick(i, picks.GIVEN) for i in range(len(kept))]
    else:
        chosen = picks.useful_cells(probs_all, labels, n)
    shown = [kept[p.index] for p in chosen]
    views, maps, feature_hw = _explain(predictor, _stored(predictor, shown), probs_all[[p.index for p in chosen]],
                                       method)
    cells = [Cell(e.path, e.patient, e.label, float(probs_all[p.index]), p.kind, view, heat)
             for e, p, view, heat in zip(shown, chosen, views, maps)]
    what = f"{len(kept)} images: {picks.describe(chosen, labels)}"
    return _explanation(predictor, cells, what, method, feature_hw)


def _explanation(predictor: Predictor, cells: list[Cell], what: str, method: str,
                 feature_hw: tuple[int, int]) -> Explanation:
    c = predictor.config
    _, layer = target_layer(predictor.model)
    h, w = feature_hw
    coarse = " - a single value per cell: the map shows nothing of where" if h * w == 1 else ""
    if coarse:
        log.warning("the %s px input gives a 1x1 feature map at %s: every map is flat; explain a run trained at a "
                    "larger size", predictor.size, layer)
    title = (f"{c.model} (stem {c.stem}), epoch {predictor.epoch}, {predictor.size} px; {what}\n"
             f"{method} map of the class called, from {layer}: a {h}x{w} feature map{coarse}, enlarged to the view")
    return Explanation(cells, title, layer, (int(h), int(w)))


# ----------------------------------------------------------------------------- the figure


def draw_explanation(explanation: Explanation, out: Path) -> None:
    """The grid: per cell its evaluation view and the map over it (the library's overlay), never over a file."""
    tiles = [gallery.Tile((cell.view, show_cam_on_image(cell.view / 255.0, cell.heat, use_rgb=True)),
                          Path(cell.path).name, cell.patient, cell.prob_all, cell.label, cell.kind)
             for cell in explanation.cells]
    gallery.draw(tiles, explanation.title, out, COLUMNS, replace=False,
                 colorbar="map value, scaled per cell: 0 = the cell's lowest, 1 = its highest")


def check_out(out: Path) -> None:
    """PredictError unless `out` is a new .png file in a writable folder (checked before any image is read)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise PredictError(f"--out {out}: the figure is a PNG; pass a file name ending in .png")
    if os.path.lexists(out):
        raise PredictError(f"{out} already exists; explain never replaces an earlier figure: pass another --out "
                           f"(or move that file away)")
    check_out_folder(out)
