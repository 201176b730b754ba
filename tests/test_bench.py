"""`bench`'s weight-drift measurement on the tiny random OPT (no timing is asserted)."""

from __future__ import annotations

import bench


def test_weight_drift_cap_and_order(tiny_model_dir, sst2_dir):
    cfg = bench.BenchConfig(model=tiny_model_dir, data_dir=sst2_dir, template="mezo", tuning="ft", device="cpu",
                            pool_size=8, steps=1, warmup=0)
    rows = {row["dtype"]: row for row in bench.weight_drift(cfg, cycles=20, max_elements=1000)}
    assert set(rows) == {"fp32", "fp16", "bf16"}
    # The cap is exact even when the first tensor is larger than it.
    assert all(row["elements"] == 1000 for row in rows.values())
    # Restoring by regenerating z is exact to fp32 rounding; half precision rounds away more.
    assert rows["fp32"]["relative_l2_drift"] < 1e-5
    assert rows["bf16"]["relative_l2_drift"] > rows["fp32"]["relative_l2_drift"]
    assert rows["fp16"]["relative_l2_drift"] > rows["fp32"]["relative_l2_drift"]
