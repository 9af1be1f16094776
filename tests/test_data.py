import numpy as np

import microdecon as md


def test_sample_loads_with_metadata():
    sample = md.data.sample()
    assert sample.image.shape == sample.truth.shape == (40, 128, 128)
    assert sample.spacing == (0.2, 0.1, 0.1) and sample.background == 100.0
    assert abs(float(sample.psf.sum()) - 1) < 1e-4


def test_phantom_is_deterministic_and_nonnegative():
    a = md.data.phantom((8, 32, 32), seed=1)
    np.testing.assert_array_equal(a, md.data.phantom((8, 32, 32), seed=1))
    assert a.min() >= 0 and a.max() > 0
    assert not np.array_equal(a, md.data.phantom((8, 32, 32), seed=2))
