"""`python -m train.bench peers` on the CPU at tiny sizes: every row present, a failing peer recorded without stopping
the others, and the ratio and data-share columns computed from the row figures. No wall-clock thresholds."""
import json

import pytest

from train.bench import __main__ as train_bench
from train.bench import peers as bench_peers


def _rate(row: dict) -> float:
    return row["imgs_per_s"]


def _check_table(table: dict) -> None:
    """Every peer's row, in order, with a positive img/s or an error, and `ratio` = img/s / the reference's img/s."""
    rows = table["rows"]
    assert [r["peer"] for r in rows] == list(bench_peers.PEERS)
    for row in rows:
        assert ("error" in row) != ("imgs_per_s" in row), row
        assert "error" in row or row["imgs_per_s"] > 0, row
    by_name = {r["peer"]: r for r in rows}
    compiled, eager = by_name["gpuaugment-torch-compiled"], by_name["gpuaugment-torch-eager"]
    want = "gpuaugment-torch-compiled" if "imgs_per_s" in compiled else "gpuaugment-torch-eager"
    assert table["reference"] == want
    reference = compiled if want == "gpuaugment-torch-compiled" else eager
    for row in rows:
        if "imgs_per_s" in row:
            assert row["ratio"] == pytest.approx(_rate(row) / _rate(reference))
        else:
            assert row["ratio"] is None


@pytest.mark.slow
def test_quick_cpu_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "peers.json"
    assert train_bench.main(["peers", "--device", "cpu", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    quick = bench_peers.QUICK
    assert (result["plan"]["size"], result["plan"]["batch_size"]) == (quick.size, quick.batch_size)
    _check_table(result["augmentation"])
    _check_table(result["training"])
    for row in result["augmentation"]["rows"]:  # compile seconds only where something was compiled
        compiled = row["peer"] in bench_peers.COMPILED
        assert "error" in row or (row["compile_s"] is not None) == compiled
    resident = result["training"]["resident"]
    assert resident["imgs_per_s"] > 0 and len(resident["rounds"]) == 2
    for row in result["training"]["rows"]:
        if "imgs_per_s" in row:
            assert row["data_share"] == pytest.approx(1 - row["imgs_per_s"] / resident["imgs_per_s"])
    assert list(result["peers"]) == list(bench_peers.PEERS)
    printed = capsys.readouterr().out
    for label, note in bench_peers.PEERS.values():
        assert f"| {label} |" in printed and note in printed


@pytest.mark.slow
def test_a_failing_peer_keeps_its_error_and_the_others_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kornia is not installed here")
    monkeypatch.setattr(bench_peers, "kornia_pipeline", broken)
    result = bench_peers.run(device="cpu", quick=True)
    json.dumps(result)  # the --json file
    for table in (result["augmentation"], result["training"]):
        _check_table(table)
        for row in table["rows"]:
            if row["peer"].startswith("kornia-"):
                assert "kornia is not installed here" in row["error"] and "imgs_per_s" not in row
            else:
                assert "error" not in row, row
    text = bench_peers.report(result)
    assert "error: RuntimeError: kornia is not installed here" in text
    assert "| torchvision v2, per sample in a loop |" in text


def test_ratios_fall_back_to_eager_and_to_none():
    table = bench_peers.add_ratios({"rows": [
        {"peer": "gpuaugment-torch-eager", "imgs_per_s": 200.0},
        {"peer": "gpuaugment-torch-compiled", "error": "RuntimeError: no compiler"},
        {"peer": "kornia-eager", "imgs_per_s": 50.0}]})
    assert table["reference"] == "gpuaugment-torch-eager"
    assert [r["ratio"] for r in table["rows"]] == [1.0, None, 0.25]
    table = bench_peers.add_ratios({"rows": [{"peer": "gpuaugment-torch-eager", "error": "x"},
                                             {"peer": "kornia-eager", "imgs_per_s": 50.0}]})
    assert table["reference"] is None and [r["ratio"] for r in table["rows"]] == [None, None]


def test_peers_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_bench.main(["peers", "--help"])
    assert exit_.value.code == 0 and "python -m train.bench peers" in capsys.readouterr().out
    assert train_bench.main(["peers", "--device", "cpu", "--size", "8"]) == 2
    assert "--size 8" in capsys.readouterr().err
    assert train_bench.main(["peers", "--device", "cpu", "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
