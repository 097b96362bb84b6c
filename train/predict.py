"""`python -m train.predict RUN_DIR INPUT...`: predict new cell images with a trained run, as its cache saw them.

    python -m train.predict runs/resnet18-20261126-084724 new_cells/            every image under a folder
    python -m train.predict RUN_DIR /data/C-NMC_Leukemia --tta --out cnmc.csv     a source layout: labels, patients
    python -m train.predict RUN_DIR a.bmp b.png --checkpoint last.pt --on-error skip

INPUT: image files; folders, searched recursively for .bmp .png .jpg .jpeg .tif .tiff (any case; links to folders
are not followed); or a source folder that `pipeline.build` recognises (Kaggle, CSV lists, labels.csv, all/ + hem/),
whose images, labels and patients are used. Each image goes through the build's own preprocessing with the
parameters saved in the run's config.json (the cache folder may be gone), then the evaluation's centre crop and
normalisation, at the size the checkpoint was trained at.
Writes --out (default predictions.csv): path, patient, prob_all, predicted_label (1 = all) and, where a source gave
labels, label (a path's bytes that are no UTF-8 as \\xNN and its backslashes doubled, so each row names one file);
beside it <stem>_patients.csv (patient, cells, predicted_all_share, mean_prob_all) when a patient id is known, and
<stem>_skipped.csv (path, reason) for images left out with --on-error skip. An existing file is never replaced. The
last line printed is the predictions CSV.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from pipeline.progress import add_progress_flags
from pipeline.sources import ON_ERROR, UNKNOWN_PATIENT
from train.engine.distributed import resolve_device
from train.evaluation.predictor import (PredictError, Predictor, check_out, companions, gather, load_predictor,
                                        out_file_type, patient_table, predict_images, prediction_table,
                                        write_outputs)
from train.evaluation.tta import VIEWS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dir", type=Path, help="a run folder made by python -m train.run")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or source folders")
    p.add_argument("--checkpoint", default="best.pt",
                   help="a checkpoint in the run folder (best.pt or last.pt); one from another folder is refused")
    p.add_argument("--out", type=out_file_type("predictions.csv"), default=Path("predictions.csv"),
                   help="predictions CSV (must not exist)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: the checkpoint stage's; with "
                                                  "--tta an eighth of it, as each image becomes 8 views; at most "
                                                  "the images read at a time, 512)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tta", action="store_true", help="average over the 8 flips and quarter turns of each image")
    p.add_argument("--on-error", choices=ON_ERROR, default="fail",
                   help="an unusable image stops the command (fail) or is left out and listed (skip)")
    add_progress_flags(p)
    return p


def _report(predictor: Predictor, table: pd.DataFrame, patients: pd.DataFrame, skipped: list[dict], tta: bool,
            checkpoint: str, files: dict) -> None:
    c = predictor.config
    n_all = int(table["predicted_label"].sum())
    print(f"predicted {len(table)} images with {c.model} {checkpoint} (epoch {predictor.epoch}, {predictor.size} px)"
          f"{', 8-view TTA' if tta else ''}: {n_all} all, {len(table) - n_all} hem")
    if "label" in table:
        known = table[table["label"] >= 0]
        print(f"accuracy {(known['label'] == known['predicted_label']).mean():.4f} on {len(known)} labelled images")
    if skipped:
        print(f"skipped {len(skipped)} unusable images (listed in {files['skipped']}):", file=sys.stderr)
        for s in skipped:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
    if len(patients):
        print(f"patients ({files['patients']}):")
        print(patients.to_string(index=False))
        unknown = int((table["patient"] == UNKNOWN_PATIENT).sum())
        if unknown:
            print(f"({unknown} images without a patient id are not in the patients table)")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = resolve_device(args.device)
        check_out(args.out)
        predictor = load_predictor(args.run_dir, args.checkpoint, device)
        batch_size = args.batch_size or (max(1, predictor.batch_size // VIEWS) if args.tta else predictor.batch_size)
        entries, skipped = gather(args.inputs, args.on_error)
        kept, probs, bad = predict_images(predictor, entries, batch_size, args.tta, args.on_error, args.progress)
        skipped += bad
        if not kept:
            raise PredictError(f"no usable image: all {len(skipped)} were left out ({skipped[0]['path']}: "
                               f"{skipped[0]['reason']}; ...); nothing was written")
        table = prediction_table(kept, probs)
        patients = patient_table(kept, probs)
        patients_path, skipped_path = companions(args.out)
        files = [(patients_path, patients)] if len(patients) else []
        files += [(skipped_path, pd.DataFrame(skipped, columns=["path", "reason"]))] if skipped else []
        write_outputs(files + [(args.out, table)])
    except ValueError as err:  # PredictError, SourceError, CheckpointError, CacheError; a size not in the record
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the CSVs are written whole at the end, so none exists yet; not a traceback
        print(f"\ninterrupted; nothing was written ({args.out} and its companions are written only when every image "
              f"is predicted)", file=sys.stderr)
        return 130
    _report(predictor, table, patients, skipped, args.tta, predictor.checkpoint,
            {"patients": patients_path, "skipped": skipped_path})
    print(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
