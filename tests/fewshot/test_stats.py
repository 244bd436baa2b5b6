import math

import pytest

from sarjepa_dist.fewshot.stats import mean_interval, t_cdf, t_quantile


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (5, 2.5706), (9, 2.2622),
                                         (29, 2.0452), (1000, 1.9623)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_inverts_cdf_and_is_symmetric():
    for df in (1, 3, 7.5, 40):
        for p in (0.6, 0.9, 0.99):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
            assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df), abs=1e-9)


def test_interval_matches_hand_computation():
    iv = mean_interval([0.5, 0.6, 0.7])
    # mean 0.6, sd 0.1, t_{0.975,2} = 4.3027 → half width 4.3027 · 0.1 / √3 = 0.2484
    assert iv.mean == pytest.approx(0.6)
    assert iv.sd == pytest.approx(0.1)
    assert iv.half_width == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    assert iv.half_width == pytest.approx(0.2484, abs=1e-4)
    assert (iv.low, iv.high) == pytest.approx((0.6 - 0.2484, 0.6 + 0.2484), abs=1e-4)


def test_one_seed_has_no_interval():
    iv = mean_interval([0.8])
    assert iv.mean == 0.8 and iv.sd is None and iv.half_width is None and iv.low is None


def test_empty_is_an_error():
    with pytest.raises(ValueError):
        mean_interval([])
