"""Markdown tables of a GPU check's result (the gpu part), ready to paste into the README.

A failed row shows its error in place of its figures (a consistency row that ran but missed its tolerance keeps its
figures beside the error); a failed or skipped part says so under its heading; a part not asked for (`--part`) has
no heading.
"""
from __future__ import annotations

from train.bench.loader import feed_keys


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
    lines = ["### Augmentation (GpuAugment training mode, torch and Triton backends; uint8 channels_last batch "
             "resident on the device, parameters drawn per call)", ""] + _status_line(s)
    cells = [lambda r: _num(r["imgs_per_s"]), lambda r: _num(r["ms_per_batch"], ".2f"),
             lambda r: _num(r["compile_s"], ".1f")]
    rows = [[str(r["size"]), str(r["batch_size"]), r.get("backend", "torch"),
             "compiled" if r["compiled"] else "eager", r.get("out_dtype", "float32"), *_figures(r, cells)]
            for r in s.get("rows", [])]
    return lines + (_table(["size px", "batch", "backend", "mode", "output", "imgs/s", "ms/batch", "compile s"], rows)
                    if rows else [])


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
    feeds = s.get("feeds", {"fed": "inline"})
    lines[0] += "; feeds: " + ", ".join(f"{name} = {text}" for name, text in feeds.items())
    cells = [lambda r: _num(r["resident_imgs_per_s"])]
    header = ["model", "resident batch imgs/s"]
    for name in feeds:
        rate, share, _ = feed_keys(name)
        cells += [lambda r, rate=rate: _num(r.get(rate)), lambda r, share=share: _pct(r.get(share))]
        header += [f"{name} imgs/s", f"{name} data share"]
    cells.append(lambda r: _pct(r["resident_spread"]))
    rows = [[r["model"], *_figures(r, cells)] for r in s.get("rows", [])]
    return lines + (_table(header + ["resident spread"], rows) if rows else [])


def _demo(s: dict) -> list[str]:
    lines = [f"### Demo run: `{s.get('command', 'python -m train.run ...')}`", ""] + _status_line(s)
    if "run_wall_s" in s:
        lines += [f"exit code {s['run_returncode']}, {s['run_wall_s']:.0f} s wall (build {s['build_wall_s']:.0f} s)",
                  ""]
    if "augment_ahead" in s:
        lines += [f"config.json: augment_ahead {str(s['augment_ahead']).lower()}, compile mode "
                  f"{s.get('compile_mode') or 'not compiled'}", ""]
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


def _compile_modes(s: dict) -> list[str]:
    lines = [f"### Compile modes (training step, AMP, channels_last, {s.get('size', '?')} px, resident batch; medians "
             f"of {s.get('rounds', '?')} alternating rounds of {s.get('steps', '?')} steps; compile s = the untimed "
             f"first steps: compile, CUDA graphs' capture, cuDNN's search)", ""] + _status_line(s)
    cells = [lambda r: _num(r["imgs_per_s"]), lambda r: _num(r.get("ratio_to_eager"), ".2f"),
             lambda r: _pct(r["spread"]), lambda r: _num(r["compile_s"], ".1f"),
             lambda r: _num(r.get("cudagraph_skips"), "d")]
    rows = [[r["model"], str(r["batch_size"]), r["mode"], *_figures(r, cells)] for r in s.get("rows", [])]
    return lines + (_table(["model", "batch", "mode", "imgs/s", "x eager", "spread", "compile s",
                            "graphs run without CUDA graphs"], rows) if rows else [])


def _values(value) -> str:
    if isinstance(value, list):
        return " / ".join(_num(v, ".4f") for v in value)
    return _num(value, ".4f")


def _consistency(s: dict) -> list[str]:
    lines = [f"### Consistency: the device against the CPU (demo cache, stage {s.get('stage', '?')}, batch "
             f"{s.get('batch_size', '?')}, seed {s.get('seed', '?')}; counterpart: {s.get('counterpart', '?')})",
             ""] + _status_line(s)
    rows = []
    for r in s.get("rows", []):
        if "difference" not in r:  # the commands did not get as far as a comparison
            rows.append([r["check"], r["figure"], f"**error**: {r['error']}", "", "", "", "", ""])
            continue
        tolerance = f"{r['tolerance'] * 100:g}% relative" if r["relative"] else f"{r['tolerance']:g} absolute"
        shown = (lambda v: _values(v)) if "device_value" in r else (lambda v: f"{r['values']} values")
        difference = f"{r['difference'] * 100:.2f}%" if r["relative"] else f"{r['difference']:.2e}"
        rows.append([r["check"], r["figure"], shown(r.get("device_value")), shown(r.get("cpu_value")), difference,
                     tolerance, "pass" if r["passed"] else "**FAIL**",
                     f"{_num(r['device_s'])} / {_num(r['cpu_s'])}" if "device_s" in r else ""])
    return lines + (_table(["command", "figure", "device", "CPU", "difference", "tolerance", "result",
                            "seconds (device / CPU)"], rows) if rows else [])


def _kernels(s: dict) -> list[str]:
    from train.bench.kernels import report as kernels_report  # the kernels benchmark's own tables
    lines = ["### Augmentation passes (the kernels part)", ""] + _status_line(s)
    if "triton_compiled" in s:
        s = {**s, "rows": [row for row in s["rows"] if "form" in row]}  # its report prints the compile rows apart
        lines += [kernels_report(s), ""]
    return lines


def report(r: dict) -> str:
    st = r["stages"]
    versions = f"torch {r['torch']}" + (f", CUDA {r['cuda']}, cuDNN {r['cudnn']}" if r.get("cuda") else "")
    lines = [f"## GPU check on {r['device_name']} ({versions}){' --quick' if r['quick'] else ''}", "",
             f"{'all parts ok' if r['ok'] else '**FAILED**: ' + ', '.join(r['failed'])}; {r['seconds']:.0f} s in all",
             ""]
    tables = {"tests": _tests, "augmentation": _augmentation, "cache": _cache, "loader": _loader,
              "training": _training, "demo": _demo, "compile-modes": _compile_modes, "consistency": _consistency, "kernels": _kernels}
    for name, stage in st.items():  # the parts that ran, in the order they ran
        lines += tables[name](stage)
    return "\n".join(lines).rstrip() + "\n"


def _cache(cache: dict) -> list[str]:
    lines = ["### Benchmark cache", ""] + _status_line(cache)
    if cache["status"] == "ok":
        lines += [f"{cache['images']} images ({cache['origin']})", ""]
    return lines
