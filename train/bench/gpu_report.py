"""Markdown tables of a GPU check's result (the gpu part), ready to paste into the README.

A failed row shows its error in place of its figures; a failed or skipped part says so under its heading.
"""
from __future__ import annotations


def _num(value, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _pct(value) -> str:
    return "-" if value is None or value == "" else f"{value * 100:.1f}%"


def _status_line(stage: dict) -> list[str]:
    if stage["status"] == "skipped":
        return [f"skipped: {stage['skipped']}", ""]
    lines = [f"({stage['seconds']:.0f} s)"]
    if "error" in stage:
        lines.append(f"**FAILED**: {stage['error']}")
    return lines + [""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _figures(row: dict, cells) -> list[str]:
    """The row's figure cells, or its error (or skip reason) in the first of them."""
    if "error" in row:
        return [f"**error**: {row['error']}"] + [""] * (len(cells) - 1)
    if "skipped" in row:
        return [f"skipped: {row['skipped']}"] + [""] * (len(cells) - 1)
    return [c(row) for c in cells]


def _tests(s: dict) -> list[str]:
    lines = ["### CUDA tests (`pytest -q -m gpu tests`)", ""] + _status_line(s)
    for row in s.get("rows", []):
        lines += _table(["passed", "failed", "skipped", "errors", "exit code"],
                        [[str(row["passed"]), str(row["failed"]), str(row["skipped"]), str(row["errors"]),
                          str(row["returncode"]) + (" **FAILED**" if row["returncode"] else "")]])
    return lines


def _augmentation(s: dict) -> list[str]:
    lines = ["### Augmentation (GpuAugment training mode, torch backend; uint8 channels_last batch resident on the "
             "device, parameters drawn per call)", ""] + _status_line(s)
    cells = [lambda r: _num(r["imgs_per_s"]), lambda r: _num(r["ms_per_batch"], ".2f"),
             lambda r: _num(r["compile_s"], ".1f")]
    rows = [[str(r["size"]), str(r["batch_size"]), "compiled" if r["compiled"] else "eager", *_figures(r, cells)]
            for r in s.get("rows", [])]
    return lines + (_table(["size px", "batch", "mode", "imgs/s", "ms/batch", "compile s"], rows) if rows else [])


def _loader(s: dict) -> list[str]:
    lines = [f"### Cached loader alone (train split, {s.get('size', '?')} px, batch {s.get('batch_size', '?')}, "
             f"{s.get('images', '?')} images per measurement)", ""] + _status_line(s)
    cells = [lambda r: r["loader"], lambda r: _num(r["imgs_per_s"])]
    rows = [[r["asked"], *_figures(r, cells)] for r in s.get("rows", [])]
    return lines + (_table(["asked for", "loader mode/placement", "imgs/s"], rows) if rows else [])


def _training(s: dict) -> list[str]:
    amp = next((r["amp_dtype"] for r in s.get("rows", []) if "amp_dtype" in r), None)
    lines = [f"### Training step (AMP {amp or 'off'}, channels_last, {s.get('size', '?')} px, batch "
             f"{s.get('batch_size', '?')}; fed by the loader ({s.get('loader', '?')}) + augmentation "
             f"({s.get('augment_backend', '?')})); data share = 1 - fed / resident", ""] + _status_line(s)
    rounds = next((r["rounds"] for r in s.get("rows", []) if "rounds" in r), "?")
    lines[0] += (f"; medians of {rounds} alternating rounds, resident spread = (slowest - fastest) / median of the "
                 f"resident rounds, the noise a data share must exceed")
    cells = [lambda r: _num(r["resident_imgs_per_s"]), lambda r: _num(r["fed_imgs_per_s"]),
             lambda r: _pct(r["data_share"]), lambda r: _pct(r["resident_spread"])]
    rows = [[r["model"], *_figures(r, cells)] for r in s.get("rows", [])]
    return lines + (_table(["model", "resident batch imgs/s", "fed imgs/s", "data share", "resident spread"], rows)
                    if rows else [])


def _demo(s: dict) -> list[str]:
    lines = [f"### Demo run: `{s.get('command', 'python -m train.run ...')}`", ""] + _status_line(s)
    if "run_wall_s" in s:
        lines += [f"exit code {s['run_returncode']}, {s['run_wall_s']:.0f} s wall (build {s['build_wall_s']:.0f} s)",
                  ""]
    if s.get("output_tail"):
        lines += ["```", s["output_tail"][-1500:], "```", ""]
    rows = [[_num(r.get("epoch"), ".0f"), _num(r.get("size"), ".0f"), _num(r.get("epoch_s"), ".2f"),
             _num(r.get("imgs_per_s")), _pct(r.get("data_wait")), _pct(r.get("augment_share")),
             _num(r.get("valid_acc"), ".3f")] for r in s.get("rows", [])]
    if rows:
        lines += _table(["epoch", "size px", "epoch s", "imgs/s", "data_wait", "augment_share", "valid acc"], rows)
    if s.get("summary"):
        m = s["summary"]
        lines += [f"summary.json: best valid acc {_num(m['best_valid_acc'], '.3f')}, test acc "
                  f"{_num(m['test_acc'], '.3f')}, test F1 (weighted) {_num(m['test_f1_weighted'], '.3f')}, "
                  f"{m['epochs']} epochs, {_num(m['train_seconds'], '.1f')} s training, "
                  f"{_num(m['seconds_per_epoch'], '.2f')} s/epoch", ""]
    return lines


def report(r: dict) -> str:
    st = r["stages"]
    versions = f"torch {r['torch']}" + (f", CUDA {r['cuda']}, cuDNN {r['cudnn']}" if r.get("cuda") else "")
    lines = [f"## GPU check on {r['device_name']} ({versions}){' --quick' if r['quick'] else ''}", "",
             f"{'all parts ok' if r['ok'] else '**FAILED**: ' + ', '.join(r['failed'])}; {r['seconds']:.0f} s in all",
             ""]
    lines += _tests(st["tests"]) + _augmentation(st["augmentation"])
    cache = st["cache"]
    lines += ["### Benchmark cache", ""] + _status_line(cache)
    if cache["status"] == "ok":
        lines += [f"{cache['images']} images ({cache['origin']})", ""]
    lines += _loader(st["loader"]) + _training(st["training"]) + _demo(st["demo"])
    return "\n".join(lines).rstrip() + "\n"
