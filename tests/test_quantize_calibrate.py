"""Calibration statistics (opc.calibrate): streaming histograms, ranges, parameters."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from opc import calibrate as cal


def identity_model():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4] x) => (float[N, 4] y) {
        h = Relu(x)
        y = Neg(h)
    }""")
    onnx.checker.check_model(m)
    return m


def test_histogram_streaming_merge_equals_all_at_once():
    rng = np.random.default_rng(0)
    # growing scales force several regrids (width doubling) along the way
    batches = [rng.standard_normal(1000) * s for s in (0.01, 0.5, 3.0, 0.2, 40.0, 1.0)]
    h = cal.Histogram(256)
    for b in batches:
        h.update(b)
    whole = cal.Histogram(256)
    whole.update(np.concatenate(batches))
    assert whole.exp == h.exp
    np.testing.assert_array_equal(whole.counts, h.counts)
    assert h.counts.sum() == 6000
    # and the counts are those of numpy's histogram with the final edges
    ref, _ = np.histogram(np.concatenate(batches).astype(np.float32).astype(np.float64), bins=h.edges())
    np.testing.assert_array_equal(ref, h.counts)


def test_histogram_merge_of_two_equals_combined():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(500) * 0.1, rng.standard_normal(700) * 9
    ha, hb, hab = cal.Histogram(128), cal.Histogram(128), cal.Histogram(128)
    ha.update(a)
    hb.update(b)
    hab.update(np.concatenate([a, b]))
    ha.merge(hb)
    assert ha.exp == hab.exp
    np.testing.assert_array_equal(ha.counts, hab.counts)


def test_outlier_in_first_batch_stays_in_range():
    m = identity_model()
    rng = np.random.default_rng(2)
    first = rng.standard_normal((8, 4)).astype(np.float32)
    first[3, 2] = 1000.0  # the outlier is only in the first batch
    batches = [{"x": first}] + [{"x": rng.standard_normal((8, 4)).astype(np.float32)} for _ in range(20)]
    st = cal.collect(m, ["h", "y"], batches, histogram=True, bins=256)
    assert st["h"].max == 1000.0
    assert st["y"].min == -1000.0
    assert cal.compute_range(st["h"], "minmax") == (0.0, 1000.0)
    assert st["h"].hist.edges()[-1] > 1000.0
    assert st["h"].count == 21 * 32


def test_statistics_do_not_grow_with_samples():
    m = identity_model()
    rng = np.random.default_rng(3)
    few = cal.collect(m, ["h"], [{"x": rng.standard_normal((16, 4)).astype(np.float32)}], bins=512,
                      channel_axes={"h": -1})
    many = cal.collect(m, ["h"], ({"x": rng.standard_normal((16, 4)).astype(np.float32)} for _ in range(200)),
                       bins=512, channel_axes={"h": -1})
    for a, b in ((few["h"], many["h"]),):
        assert a.hist.counts.nbytes == b.hist.counts.nbytes == 512 * 8
        assert a.channel_sum.shape == b.channel_sum.shape == (4,)
    assert many["h"].channel_count == 200 * 16
    np.testing.assert_allclose(many["h"].channel_mean, np.full(4, 1 / math.sqrt(2 * math.pi)), atol=0.03)


def _stats(x, bins=2048):
    st = cal.TensorStats(hist=cal.Histogram(bins))
    st.update(x)
    return st


def test_percentile_matches_numpy():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(200_000).astype(np.float32)
    lo, hi = cal.compute_range(_stats(x), "percentile", percentile=99.0)
    assert hi == pytest.approx(np.percentile(x, 99.0), abs=0.01)
    assert lo == pytest.approx(np.percentile(x, 1.0), abs=0.01)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_search_clips_heavy_tails_and_keeps_bounded_data(method):
    rng = np.random.default_rng(5)
    tailed = rng.exponential(size=100_000).astype(np.float32)
    tailed[:5] = 1000.0  # rare outliers, fewer than the 0.01% percentile tail
    lo, hi = cal.compute_range(_stats(tailed), method)
    assert lo == 0.0
    assert hi < 0.5 * tailed.max()  # a real search, not the min/max range
    uniform = rng.uniform(-1, 1, 100_000).astype(np.float32)
    lo, hi = cal.compute_range(_stats(uniform), method)
    assert -1.0 <= lo < -0.9 and 0.9 < hi <= 1.0


def test_mse_search_lowers_the_real_quantization_error():
    rng = np.random.default_rng(5)
    x = rng.laplace(size=100_000).astype(np.float32)

    def mse(lo, hi):
        scale, zp = cal.activation_params(lo, hi, "uint8")
        return float(np.mean((cal.fake_quantize(x, scale, zp) - x) ** 2))

    st = _stats(x)
    lo, hi = cal.compute_range(st, "mse")
    assert hi < x.max() and lo > x.min()
    assert mse(lo, hi) < 0.9 * mse(*cal.compute_range(st, "minmax"))
    uniform = rng.uniform(-1, 1, 100_000).astype(np.float32)
    lo, hi = cal.compute_range(_stats(uniform), "mse")
    assert -1.0 <= lo < -0.9 and 0.9 < hi <= 1.0


def test_entropy_ignores_exact_zero_spike():
    rng = np.random.default_rng(6)
    x = np.maximum(rng.standard_normal(100_000), 0).astype(np.float32)  # half exact zeros
    lo, hi = cal.compute_range(_stats(x), "entropy")
    assert lo == 0.0
    assert 0.5 * x.max() < hi <= x.max()


def test_activation_params_numpy_oracle():
    scale, zp = cal.activation_params(-1.0, 3.0, "uint8")
    assert scale == pytest.approx(4.0 / 255)
    assert zp == round(1.0 / (4.0 / 255))
    scale, zp = cal.activation_params(0.0, 6.0, "uint8")
    assert (scale, zp) == (pytest.approx(6 / 255), 0)
    scale, zp = cal.activation_params(0.0, 6.0, "int8")
    assert (scale, zp) == (pytest.approx(6 / 255), -128)
    scale, zp = cal.activation_params(-2.0, 1.0, "int8", symmetric=True)
    assert (scale, zp) == (pytest.approx(2 / 127), 0)
    scale, zp = cal.activation_params(0.5, 2.0, "uint8")  # the range is widened to hold 0
    assert (scale, zp) == (pytest.approx(2 / 255), 0)
    assert cal.activation_params(0.0, 0.0) == (1.0, 0)
    # 0 is exactly representable and the ends map inside the integer range
    scale, zp = cal.activation_params(-0.37, 5.1, "uint8")
    q = np.round(np.array([-0.37, 0.0, 5.1]) / scale) + zp
    assert q[1] == zp and 0 <= q[0] <= 1 and 254 <= q[2] <= 255


def test_weight_params_per_channel_and_bias():
    w = np.array([[0.5, -1.27, 0.0], [0.02, 0.01, -0.03]], dtype=np.float32)
    s = cal.weight_params(w, axis=0)
    np.testing.assert_allclose(s, [1.27 / 127, 0.03 / 127], rtol=1e-6)
    q = cal.quantize_weight(w, s, axis=0)
    np.testing.assert_array_equal(q, np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8))
    assert q[0, 1] == -127 and q[1, 2] == -127
    s1 = cal.weight_params(w, axis=1)
    np.testing.assert_allclose(s1, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert cal.weight_params(np.zeros((2, 2), np.float32), axis=0).tolist() == [1.0, 1.0]
    qb, clipped = cal.quantize_bias(np.array([1.0, -2.0, 3e10], np.float32), np.array([0.01, 0.01, 1e-3]))
    assert qb.dtype == np.int32 and qb[:2].tolist() == [100, -200] and clipped == 1


def test_layer_error_sqnr():
    e = cal.LayerError()
    ref = np.ones(100)
    e.update(ref, ref + 0.1)
    assert e.sqnr_db == pytest.approx(20.0, abs=1e-6)
    same = cal.LayerError()
    same.update(ref, ref)
    assert same.sqnr_db == 99.0
    bad = cal.LayerError()
    bad.update(ref, np.ones(3))
    assert bad.sqnr_db == -99.0


def test_reservoir_keeps_a_bounded_uniform_sample_of_rows():
    st = cal.TensorStats(channel_axis=-1, reservoir=50)
    data = np.stack([np.arange(2000, dtype=np.float32), -np.arange(2000, dtype=np.float32)], axis=1)
    for start in range(0, 2000, 64):
        st.update(data[start:start + 64])
    assert st.rows.shape == (50, 2) and st.rows_seen == 2000
    assert np.all(st.rows[:, 1] == -st.rows[:, 0])  # whole rows, channel axis last
    assert len(np.unique(st.rows[:, 0])) == 50
    assert 600 < st.rows[:, 0].mean() < 1400  # drawn from the whole stream, not the first rows
    np.testing.assert_array_equal(st.channel_min, [0, -1999])
    np.testing.assert_array_equal(st.channel_max, [1999, 0])
