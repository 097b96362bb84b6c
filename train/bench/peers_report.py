"""The peers benchmark's printout: markdown tables for the README from `train.bench.peers.run`'s result (which names
each row's peer, label and semantics, so this part needs nothing else)."""
from __future__ import annotations


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _figure(row: dict) -> str:
    return f"error: {row['error'].splitlines()[0]}" if "error" in row else _cell(row.get("imgs_per_s"), ",.0f")


def _ratio(row: dict) -> str:
    return "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"


def report(r: dict) -> str:
    """Both tables (augmentation alone, then feeding training steps), then how each peer's semantics differ."""
    p, peers = r["plan"], r["peers"]
    label = {name: peer["label"] for name, peer in peers.items()}
    ref = {k: label[t["reference"]] if t["reference"] else "none ran" for k, t in
           (("aug", r["augmentation"]), ("train", r["training"]))}
    lines = [f"## Peers on {r['device_name']}: {p['size']} px (stored {r['stored_size']}), batch {p['batch_size']}, "
             f"{r['cpu_threads']} torch threads, {r['workers']} DataLoader workers; {r['origin']}", "",
             f"Augmentation, {p['calls']} timed calls per row; ratio to {ref['aug']}:", "",
             "| peer | img/s | ratio | compile s (graphs) |", "|---|---|---|---|"]
    for row in r["augmentation"]["rows"]:
        graphs = f" ({row['graphs']})" if row.get("graphs") is not None else ""
        lines.append(f"| {label[row['peer']]} | {_figure(row)} | {_ratio(row)} | "
                     f"{_cell(row.get('compile_s'), '.1f')}{graphs} |")
    t = r["training"]
    lines += ["", f"{t['model']} training steps ({t['precision']}), {t['steps']} timed per row; resident batch "
                  f"{_figure(t['resident'])} img/s (spread {_cell(t['resident'].get('spread'), '.1%')}); "
                  f"ratio to fed by {ref['train']}:", "",
              "| fed by | img/s | ratio | data share |", "|---|---|---|---|"]
    for row in t["rows"]:
        lines.append(f"| {label[row['peer']]} | {_figure(row)} | {_ratio(row)} | "
                     f"{_cell(row.get('data_share'), '.1%')} |")
    lines += ["", "How each differs from the report's per-sample transforms:", ""]
    lines += [f"- {peer['label']}: {peer['semantics']}" for peer in peers.values()]
    return "\n".join(lines)
