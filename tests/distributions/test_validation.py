"""Bad input raises ValueError with a message that says what is wrong."""

import pytest
import torch

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform, TruncatedNormal


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TruncatedNormal(0.0, -1.0, -1.0, 1.0), "scale"),
        (lambda: TruncatedNormal(0.0, 0.0, -1.0, 1.0), "scale"),
        (lambda: TruncatedNormal(0.0, 1.0, 1.0, 1.0), "low must be less than high"),
        (lambda: TruncatedNormal(0.0, 1.0, 2.0, 1.0), "low must be less than high"),
        (lambda: TruncatedNormal(0.0, 1.0, -float("inf"), 1.0), "finite"),
        (lambda: TruncatedLogNormal(0.0, -1.0, 0.1, 1.0), "scale"),
        (lambda: TruncatedLogNormal(0.0, 1.0, 0.0, 1.0), "low"),
        (lambda: TruncatedLogNormal(0.0, 1.0, -0.1, 1.0), "low"),
        (lambda: TruncatedLogNormal(0.0, 1.0, 1.0, 0.5), "low must be less than high"),
        (lambda: TruncatedLogUniform(0.0, 1.0), "low"),
        (lambda: TruncatedLogUniform(1.0, 1.0), "low must be less than high"),
        (lambda: TruncatedNormal(float("nan"), 1.0, -1.0, 1.0), "loc"),
    ],
)
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "d, value",
    [
        (TruncatedNormal(0.0, 1.0, -1.0, 1.0), 1.5),
        (TruncatedLogNormal(0.0, 1.0, 0.1, 1.0), 0.05),
        (TruncatedLogUniform(0.1, 1.0), 2.0),
    ],
)
def test_value_outside_support(d, value):
    with pytest.raises(ValueError, match="support"):
        d.log_prob(torch.tensor(value))
    with pytest.raises(ValueError, match="support"):
        d.cdf(torch.tensor(value))


def test_icdf_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match="probabilities"):
        TruncatedNormal(0.0, 1.0, -1.0, 1.0).icdf(torch.tensor(1.5))


def test_without_validation_outside_support_is_minus_infinity():
    d = TruncatedLogNormal(0.0, 1.0, 0.1, 1.0, validate_args=False)
    assert d.log_prob(torch.tensor(0.05)) == -float("inf")
