"""benchmarks/roofline.py: the bandwidth-roofline prediction (no engine, no GPU)."""

import json

import pytest

from conftest import PROFILES
from vllm_heterocache.budget import Budgeter
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.head_profile.schema import HeadProfile, load_profile


@pytest.fixture(scope="module")
def roofline():
    import roofline

    return roofline


@pytest.fixture(scope="module")
def llama():
    return load_profile(PROFILES / "Llama-3.1-8B-Instruct.json")


def _predict(roofline, profile, config, context, batch, **kw):
    h200 = roofline.GPUS["h200"]
    kw.setdefault("hbm_tbs", h200["hbm_tbs"])
    kw.setdefault("link_gbs", h200["link_gbs"])
    kw.setdefault("memory_bytes", h200["memory_bytes"])
    kw.setdefault("efficiency", 0.8)
    return roofline.predict(profile, config, context, batch, **kw)


def test_parameter_counts(roofline, llama):
    params, read = roofline.weight_counts(llama)
    assert params == 8_030_261_248  # Llama-3.1-8B: 8.03 B, 16.06 GB in bf16
    assert params - read == 128256 * 4096  # the input embedding table is gathered, not read whole
    qwen, _ = roofline.weight_counts(load_profile(PROFILES / "Qwen2.5-14B-Instruct.json"))
    assert qwen == 14_770_033_664  # includes the q/k/v biases


@pytest.mark.parametrize("batch", [1, 16])
def test_keep_everything_predicts_no_speedup(roofline, llama, batch):
    row = _predict(roofline, llama, HeteroCacheConfig(compression_ratio=1.0), 32768, batch, drift_rate=0.5)
    assert row["kept_fraction"] == 1.0
    assert row["drift_check_bytes_per_check"] == 0 and row["refill_bytes_per_check"] == 0
    assert row["speedup_overlapped"] == pytest.approx(1.0, abs=1e-12)
    assert row["speedup_serialized"] == pytest.approx(1.0, abs=1e-12)


def test_all_full_profile_predicts_no_speedup(roofline, llama):
    data = llama.to_json()
    data["head_types"] = [["volatile"] * len(row) for row in data["head_types"]]
    data["clusters"] = []
    data["budget_ratios"] = [[None] * len(row) for row in data["budget_ratios"]]
    all_full = HeadProfile.from_json(data)
    row = _predict(roofline, all_full, HeteroCacheConfig(compression_ratio=0.25), 131072, 16)
    assert row["speedup_overlapped"] == pytest.approx(1.0, abs=1e-12)
    assert row["hc_kv_peak_bytes"] == row["stock_kv_bytes"]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_kept_fraction_is_the_planners(roofline, llama, ratio):
    config = HeteroCacheConfig(compression_ratio=ratio)
    for context in (4096, 32768, 131072):
        row = _predict(roofline, llama, config, context, 1, generated=1)  # no generated token yet
        assert row["kept_fraction"] == Budgeter(llama, config).budgets(context).kept_fraction()
        assert row["kept_fraction"] == pytest.approx(ratio, abs=0.01)
        assert row["hc_kv_read_bytes"] == pytest.approx(row["kept_fraction"] * row["stock_kv_read_bytes"])


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("batch", [1, 16])
def test_speedup_grows_with_context(roofline, llama, ratio, batch):
    """Without refill traffic (it grows with the budgets, i.e. with the context, too)."""
    for config, rate in ((HeteroCacheConfig(compression_ratio=ratio, refill=False), 0.2),
                         (HeteroCacheConfig(compression_ratio=ratio), 0.0)):
        speedups = [_predict(roofline, llama, config, L, batch, drift_rate=rate)["speedup_overlapped"]
                    for L in (4096, 32768, 131072)]
        assert 1.0 < speedups[0] < speedups[1] < speedups[2], speedups


def test_refills_cost_time(roofline, llama):
    config = HeteroCacheConfig(compression_ratio=0.5)
    rows = [_predict(roofline, llama, config, 131072, 16, drift_rate=r) for r in (0.0, 0.1, 0.4)]
    assert rows[0]["hc_overlapped_ms"] == pytest.approx(rows[0]["hc_serialized_ms"])
    for a, b in zip(rows, rows[1:]):
        assert a["hc_serialized_ms"] < b["hc_serialized_ms"] and a["hc_overlapped_ms"] <= b["hc_overlapped_ms"]
    for row in rows:
        assert row["hc_overlapped_ms"] <= row["hc_serialized_ms"]


def test_capacity_batch16_128k_on_h200(roofline, llama):
    row = _predict(roofline, llama, HeteroCacheConfig(compression_ratio=0.25), 131072, 16)
    assert row["stock_kv_bytes"] / 2**30 > 256 and not row["stock_fits"]
    assert row["hc_kv_decode_bytes"] < row["hc_kv_peak_bytes"] < row["stock_kv_bytes"] and row["hc_fits"]


def test_cli_writes_json(roofline, tmp_path, capsys):
    out = tmp_path / "roofline.json"
    rows = roofline.main(["--gpu", "h200", "--contexts", "32k", "--batches", "1,16", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "not a measurement" in printed and "4.80 TB/s" in printed
    data = json.loads(out.read_text())
    assert "not a measurement" in data["note"] and len(data["rows"]) == len(rows) == 4
    assert {r["ratio"] for r in data["rows"]} == {0.25, 0.5}
