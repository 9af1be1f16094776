import numpy as np
import pytest

from microdecon import _backend
from microdecon._backend import Backend, get_backend


def fft_libraries():
    libraries = ["pocketfft"]
    if _backend._pyfftw() is not None:
        libraries.append("fftw")
    return libraries


def test_auto_never_fails_and_cpu_is_numpy():
    backend = get_backend(np.zeros(3), device="auto")
    assert backend.name == ("gpu" if _backend.gpu_available() else "cpu")
    cpu = get_backend(device="cpu")
    assert cpu.xp is np and cpu.name == "cpu"


@pytest.mark.parametrize("bad", ["tpu", "gpu:x", "", "cuda:-"])
def test_unknown_device_names_the_argument(bad):
    with pytest.raises(ValueError, match="device"):
        get_backend(device=bad)


def test_device_must_be_a_string():
    with pytest.raises(TypeError, match="device"):
        get_backend(device=0)


@pytest.mark.skipif(_backend.gpu_available(), reason="a GPU is present")
def test_gpu_request_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CuPy"):
        get_backend(device="gpu")


@pytest.mark.parametrize("library", fft_libraries())
@pytest.mark.parametrize("shape", [(30,), (31,), (12, 15), (12, 16), (6, 10, 9), (6, 10, 8)])
def test_fft_plan_is_unnormalized_roundtrip(library, shape):
    backend = Backend("cpu", fft_library=library)
    plan = backend.fft_plan(shape)
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    spectrum = plan.forward(x)
    np.testing.assert_allclose(spectrum, np.fft.rfftn(x), rtol=1e-4, atol=1e-4)
    back = plan.inverse(spectrum.copy())
    np.testing.assert_allclose(back / np.prod(shape), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("library", fft_libraries())
def test_each_plan_has_its_own_buffers(library):
    # two operators of one shape (two threads, two tiles) must never share scratch memory
    backend = Backend("cpu", fft_library=library)
    first, second = backend.fft_plan((8, 12)), backend.fft_plan((8, 12))
    x = np.ones((8, 12), np.float32)
    a = first.forward(x)
    b = second.forward(2 * x)
    assert not np.shares_memory(a, b)
    assert a[0, 0] == 96 and b[0, 0] == 192


def kernel_inputs(shape, seed=1):
    rng = np.random.default_rng(seed)
    f32 = lambda offset=0.0: (rng.random(shape) - offset).astype(np.float32)  # noqa: E731
    return rng, f32


@pytest.mark.parametrize("shape", [(50,), (7, 300, 301), (3, 5)])  # one slab, many slabs, tiny
def test_numpy_kernels_match_their_formulas(shape):
    be = get_backend(device="cpu")
    rng, f32 = kernel_inputs(shape)
    image, blurred = f32(), f32(0.5)
    expected = image / np.maximum(blurred + 0.1, 0.05)
    np.testing.assert_allclose(
        be.rl_ratio(image, blurred, np.float32(0.1), np.float32(0.05)), expected, rtol=1e-6
    )
    background = f32()
    image, blurred = f32(), f32(0.5)
    expected = image / np.maximum(blurred + background, 0.05)
    np.testing.assert_allclose(be.rl_ratio(image, blurred, background, np.float32(0.05)), expected, rtol=1e-6)

    estimate, correction, normalization = f32(0.5), f32(), f32()
    got = be.rl_update(estimate, correction, normalization, np.empty_like(estimate))
    np.testing.assert_allclose(got, np.maximum(estimate * correction * normalization, 0), rtol=1e-6)
    got = be.rl_update(estimate, correction, None, np.empty_like(estimate))
    np.testing.assert_allclose(got, np.maximum(estimate * correction, 0), rtol=1e-6)

    current, step = f32(), _backend.to_bfloat16(f32(0.5)).copy()
    expected = np.maximum(current + 0.7 * _backend.from_bfloat16(step), 0)
    np.testing.assert_allclose(be.predict(current, step, 0.7, np.empty_like(current)), expected, rtol=1e-6)
    np.testing.assert_array_equal(be.predict(current, None, 0.7, np.empty_like(current)), current)
    assert np.array_equal(be.copy(np.empty_like(current), current), current)


def _conjugate_reference(correction, estimate, inverse, previous):
    """The conjugate-gradient kernels' outputs, written out with NumPy (float64)."""
    c, x = correction.astype(np.float64), estimate.astype(np.float64)
    inv = np.ones_like(c) if inverse is None else inverse.astype(np.float64)
    w = np.where(inv > 0, c * inv - 1, 0)
    gradient = np.where(inv > 0, w / np.where(inv > 0, inv, 1), 0)
    update = x * w
    return update, float(np.sum(gradient * update)), float(np.sum(gradient * previous))


def _stored(values, step_type):
    """``values`` as a step buffer of ``step_type`` keeps them, and those values back in float32."""
    bits = values.astype(np.float32) if step_type == np.float32 else _backend.to_bfloat16(values)
    return bits, (_backend.from_bfloat16(bits) if step_type == np.uint16 else bits.copy())


@pytest.mark.parametrize("shape", [(50,), (7, 300, 301), (2, 600, 500)])  # planes past a slab
@pytest.mark.parametrize("step_type", [np.uint16, np.float32])
@pytest.mark.parametrize("normalization", ["float32", "compact", None])
def test_conjugate_gradient_kernels_match_their_formulas(shape, step_type, normalization):
    be = get_backend(device="cpu")
    rng, f32 = kernel_inputs(shape, seed=5)
    correction, estimate = f32() + 0.5, f32()
    inverse = inverse_values = None
    if normalization is not None:
        inverse_values = f32() + 0.8
        inverse_values.reshape(-1)[::7] = 0  # voxels the data do not see: the estimate is 0 there
        estimate.reshape(-1)[::7] = 0
        inverse = inverse_values
        if normalization == "compact":  # H^T 1 in uint16 units
            visible = np.zeros_like(inverse_values)
            np.divide(1, inverse_values, out=visible, where=inverse_values > 0)
            inverse = be.compact_visibility(visible, 1e-3)
            inverse_values = np.where(
                inverse > _backend.UNSEEN, _backend.VISIBLE_UNITS / inverse.astype(float), 0
            )
    previous = f32(0.5) * 0.1
    if normalization is not None:  # RL's last update x w is 0 where the estimate is
        previous.reshape(-1)[::7] = 0
    update, previous_values = _stored(previous, step_type)
    own, cross = be.cg_gradient(correction, estimate, inverse, update, True)
    expected_update, expected_own, expected_cross = _conjugate_reference(
        correction, estimate, inverse_values, previous_values
    )
    assert own == pytest.approx(expected_own, rel=1e-4) and cross == pytest.approx(expected_cross, rel=1e-3)
    stored = _backend.from_bfloat16(update) if step_type == np.uint16 else update
    digits = 2**-7 if step_type == np.uint16 else 1e-6
    np.testing.assert_allclose(stored, expected_update, rtol=digits, atol=1e-7)
    # the direction u + beta d, stored as the update is; the transform's input gets exactly what
    # is stored, here in a strided view (as an in-place FFT's real grid is)
    last_direction = f32(0.5)
    if normalization is not None:  # a sum of updates: 0 where the estimate is
        last_direction.reshape(-1)[::7] = 0
    direction, direction_values = _stored(last_direction, step_type)
    stage = np.full(shape[:-1] + (shape[-1] + 2,), np.nan, np.float32)[..., : shape[-1]]
    be.cg_direction(update, direction, 0.7, False, stage)
    followed = _backend.from_bfloat16(direction) if step_type == np.uint16 else direction
    np.testing.assert_array_equal(stage, followed)
    np.testing.assert_allclose(followed, stored + np.float32(0.7) * direction_values, rtol=digits, atol=1e-7)
    # the step along it, clipped at the floor (0 where unseen), and what the clip added
    advanced = estimate.copy()
    clipped, stepped = be.cg_advance(advanced, direction, 2.5, inverse, np.float32(1e-3))
    moved = estimate + np.float32(2.5) * followed
    expected = np.maximum(moved, 1e-3)
    seen = np.ones(shape, bool) if inverse is None else inverse_values > 0
    expected[~seen] = 0
    np.testing.assert_allclose(advanced, expected, rtol=1e-5, atol=1e-6)
    assert clipped == pytest.approx(float(np.maximum(1e-3 - moved, 0)[seen].sum()), rel=1e-4, abs=1e-6)
    assert stepped == pytest.approx(float(np.abs(2.5 * followed)[seen].sum()), rel=1e-5)
    unmeasured = estimate.copy()
    assert be.cg_advance(unmeasured, direction, 2.5, inverse, np.float32(1e-3), False) == (0, 0)
    np.testing.assert_array_equal(unmeasured, advanced)
    be.cg_direction(update, direction, 0.7, True, stage)  # a fresh start: RL's update
    np.testing.assert_array_equal(stage, stored)


def test_compact_visibility_keeps_h_transpose_one_to_half_a_unit():
    rng = np.random.default_rng(0)
    visible = rng.uniform(1e-3, 1, 3_000_000)  # H^T 1 down to the support's edge; slabs
    visible[1::5] = 1  # inside the image: kept exactly
    visible[::5] = rng.uniform(0, 1e-3, visible[::5].size)  # unseen: the data see too little
    visible = visible.astype(np.float32)
    compact = get_backend(device="cpu").compact_visibility(visible.reshape(3, -1), 1e-3).ravel()
    assert compact.dtype == np.uint16 and compact.shape == visible.shape
    seen = visible > np.float32(1e-3)
    assert np.all((compact == _backend.UNSEEN) == ~seen)  # never 0: finite quotients
    assert np.all(compact[1::5] == _backend.VISIBLE_UNITS)
    stored = compact[seen] / _backend.VISIBLE_UNITS
    exact = visible[seen].astype(np.float64)
    # half a unit of 1 / VISIBLE_UNITS: 0.8% at H^T 1 = 1e-3, 6e-5 at 1/8, 0 at 1
    assert np.abs(stored - exact).max() <= 0.5 / _backend.VISIBLE_UNITS + 1e-7
    assert np.abs(stored / exact - 1)[exact >= 0.125].max() < 6.2e-5
    assert 4e-3 < np.abs(stored / exact - 1).max() < 8e-3
    assert np.all(_backend.seen_by_data(compact) == seen)
    # H^T 1 over 1 ("reflect" with an asymmetric PSF) cannot be kept: it is stored as 1
    assert get_backend(device="cpu").compact_visibility(np.float32([1.5]), 1e-3)[0] == _backend.VISIBLE_UNITS


def test_floors_where_asked_and_bounded_constants():
    from microdecon._backend import _CONSTANTS, _MAX_CONSTANTS, _at_least, _constant

    rng = np.random.default_rng(4)
    for shape in ((5, 40), (3, 400, 500)):  # one slab of constants, and a loop over several
        values = rng.normal(size=shape).astype(np.float32)
        where = rng.random(shape) > 0.3
        out = np.full(shape, 7.0, np.float32)
        _at_least(values, 0.25, out=out, where=where)
        np.testing.assert_array_equal(out, np.where(where, np.maximum(values, 0.25), 7.0))
        strided, out = values[:, ::2], np.full(values[:, ::2].shape, 7.0, np.float32)
        _at_least(strided, 0.25, out=out, where=where[:, ::2])
        np.testing.assert_array_equal(out, np.where(where[:, ::2], np.maximum(strided, 0.25), 7.0))
    for value in np.linspace(1, 2, 3 * _MAX_CONSTANTS):  # conjugate-gradient floors depend on data
        assert np.all(_constant(value) == np.float32(value))
    assert len(_CONSTANTS) <= _MAX_CONSTANTS


def test_model_ratio_and_combination_kernels():
    be = get_backend(device="cpu")
    rng, f32 = kernel_inputs((6, 300, 301), seed=6)
    image, model, step, other = (f32() * 100).astype(np.uint16), f32() + 0.2, f32(0.5), f32()
    carried, ratio = model.copy(), step.copy()
    be.cg_model_ratio(image, carried, ratio, 0.3, np.float32(0.1), np.float32(1e-6), 0.01, False)
    np.testing.assert_allclose(carried, model + 0.3 * step, rtol=1e-6)
    np.testing.assert_allclose(ratio, image * 0.01 / np.maximum(model + 0.3 * step + 0.1, 1e-6), rtol=1e-5)
    combined = step.copy()
    be.combine(combined, 0.4, 1.0, model, other)
    np.testing.assert_allclose(combined, 0.4 * step + model - other, rtol=1e-6, atol=1e-7)
    be.combine(combined, 0.0, 2.0, model)
    np.testing.assert_allclose(combined, 2 * model, rtol=1e-6)


def test_accelerated_update_fuses_prediction_step_update_and_dots():
    be = get_backend(device="cpu")
    rng, f32 = kernel_inputs((9, 200, 150), seed=3)
    current, correction, normalization = f32(), f32(), f32()
    step = _backend.to_bfloat16(f32(0.5) * 0.1).copy()
    update_prev = _backend.to_bfloat16(f32(0.5)).copy()
    old_prev = _backend.from_bfloat16(update_prev).astype(np.float64)
    predicted = np.maximum(current + 0.6 * _backend.from_bfloat16(step), 0)
    new = np.maximum(predicted * correction * normalization, 0)
    work = current.copy()
    cross, norm = be.rl_accelerated_update(work, step, 0.6, correction, normalization, update_prev, True)
    np.testing.assert_allclose(work, new, rtol=1e-6, atol=1e-7)
    update = (new - predicted).astype(np.float64)
    bf16_error = 2**-7  # 8 significant bits
    assert np.all(np.abs(_backend.from_bfloat16(update_prev) - update) <= bf16_error * np.abs(update) + 1e-30)
    new_step = (new - current).astype(np.float64)
    assert np.all(np.abs(_backend.from_bfloat16(step) - new_step) <= bf16_error * np.abs(new_step) + 1e-30)
    assert abs(cross - np.dot(update.ravel(), old_prev.ravel())) < 1e-4 * abs(cross)
    assert abs(norm - np.dot(old_prev.ravel(), old_prev.ravel())) < 1e-4 * norm


def test_bfloat16_roundtrip_keeps_range_and_three_digits():
    values = np.array([1e-30, -3e-8, 1.0, 123.456, -6e5, 1e30], np.float32)
    back = _backend.from_bfloat16(_backend.to_bfloat16(values).copy())
    np.testing.assert_allclose(back, values, rtol=2**-7)


def test_spectrum_multiplication_complex_and_real_otf():
    be = get_backend(device="cpu")
    rng = np.random.default_rng(4)
    spectrum = (rng.random((40, 30, 16)) + 1j * rng.random((40, 30, 16))).astype(np.complex64)
    otf = (rng.random((40, 30, 16)) + 1j * rng.random((40, 30, 16))).astype(np.complex64)
    np.testing.assert_allclose(
        be.multiply_spectrum(spectrum.copy(), otf, True), spectrum * otf.conj(), rtol=1e-6
    )
    np.testing.assert_allclose(be.multiply_spectrum(spectrum.copy(), otf, False), spectrum * otf, rtol=1e-6)
    real = otf.real.copy()
    np.testing.assert_allclose(be.multiply_spectrum(spectrum.copy(), real, True), spectrum * real, rtol=1e-6)


@pytest.mark.parametrize("size", [1, 2047, 2048, 5 * 2048 + 3])
def test_sum_by_rows_adds_every_element_once(size):
    # the GPU's two-pass reduction, driven here by a NumPy reduction with CuPy's call signature
    def reduction(a, b, axis=None):
        return np.sum(a.astype(np.float64) * b + 1j * b.astype(np.float64) ** 2, axis=axis)

    rng = np.random.default_rng(size)
    a, b = rng.random(size).astype(np.float32), rng.random(size).astype(np.float32)
    total = _backend._sum_by_rows(reduction, a.reshape(1, -1), b.reshape(1, -1))
    assert total.real == pytest.approx(float(np.dot(a.astype(np.float64), b)), rel=1e-12)
    assert total.imag == pytest.approx(float(np.dot(b.astype(np.float64), b)), rel=1e-12)
    # a strided view (the reflect boundary's correction is one) is summed as it is
    grid = rng.random((6, size + 4)).astype(np.float32)
    view, full = grid[1:5, 2:-2], np.ascontiguousarray(grid[1:5, 2:-2])
    total = _backend._sum_by_rows(reduction, view, full)
    assert total.real == pytest.approx(float(np.sum(full.astype(np.float64) * full)), rel=1e-12)

    # a minimum the same way, contiguous or strided, and on request without the wait for it
    def smallest(a, axis=None):
        return np.min(a, axis=axis)

    assert _backend._sum_by_rows(smallest, grid, combine="min").real == float(grid.min())
    assert _backend._sum_by_rows(smallest, view, combine="min").real == float(view.min())
    kept = _backend._sum_by_rows(smallest, a, rows=7, combine="min", to_host=False)
    assert np.ndim(kept) == 0 and float(kept) == float(a.min())

    # scalars pass through; a rows-sized multiple takes one pass, the rest its own
    def scaled(a, factor, axis=None):
        return np.sum(a.astype(np.float64) * factor, axis=axis)

    assert _backend._sum_by_rows(scaled, a, 3.0, rows=7).real == pytest.approx(
        3 * float(a.sum(dtype=np.float64))
    )


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("background", ["scalar", "per column"])
def test_divergence_kernel_equals_the_metric_on_strided_views(device, xp_for, dtype, background):
    from microdecon.metrics import i_divergence

    rng = np.random.default_rng(4)
    data = rng.poisson(3.0, (9, 40, 37)).astype(dtype)  # zeros among them: 0 log 0 counts as 0
    blurred = (rng.random((9, 40, 37)) * 4).astype(np.float32)
    offset = np.float32(0.5) if background == "scalar" else (rng.random(37) + 0.1).astype(np.float32)
    part = (slice(1, None, 2), slice(None, None, 2), slice(1, None, 2))  # a hold-out colour
    expected = i_divergence(
        data[part].astype(np.float32) * 0.25, blurred[part] + np.broadcast_to(offset, data.shape)[part]
    )
    be = get_backend(device=device)
    offset_on_device = (
        offset if np.ndim(offset) == 0 else xp_for.broadcast_to(xp_for.asarray(offset), data.shape)[part]
    )
    got = be.i_divergence(
        xp_for.asarray(data)[part], xp_for.asarray(blurred)[part], offset_on_device, np.float32(1e-6), 0.25
    )
    assert got == pytest.approx(expected, rel=1e-5)
    assert be.i_divergence(
        xp_for.asarray(data), xp_for.asarray(data, dtype=np.float32), np.float32(0), np.float32(1e-6)
    ) == pytest.approx(0, abs=1e-3)


@pytest.mark.gpu
def test_gpu_kernels_match_numpy(device):
    if device != "gpu":
        pytest.skip("GPU-only comparison")
    import cupy

    cpu, gpu = get_backend(device="cpu"), get_backend(device="gpu")
    rng, f32 = kernel_inputs((6, 70, 90), seed=2)
    image, blurred = f32(), f32(0.5)
    expected = cpu.rl_ratio(image, blurred.copy(), np.float32(0.1), np.float32(0.05))
    got = gpu.rl_ratio(cupy.asarray(image), cupy.asarray(blurred), np.float32(0.1), np.float32(0.05))
    np.testing.assert_allclose(got.get(), expected, rtol=1e-6)

    estimate, correction, normalization = f32(0.5), f32(), f32()
    expected = cpu.rl_update(estimate, correction, normalization, np.empty_like(estimate))
    got = gpu.rl_update(
        *(cupy.asarray(a) for a in (estimate, correction, normalization)),
        cupy.empty(estimate.shape, np.float32),
    )
    np.testing.assert_allclose(got.get(), expected, rtol=1e-6)

    current, step = f32(), _backend.to_bfloat16(f32(0.5) * 0.1).copy()
    update_prev = _backend.to_bfloat16(f32(0.5)).copy()
    expected = cpu.predict(current, step, 0.6, np.empty_like(current))
    got = gpu.predict(cupy.asarray(current), cupy.asarray(step), 0.6, cupy.empty(current.shape, np.float32))
    np.testing.assert_allclose(got.get(), expected, rtol=1e-6, atol=1e-7)  # the GPU fuses multiply-adds
    current_cpu, step_cpu, prev_cpu = current.copy(), step.copy(), update_prev.copy()
    dots_cpu = cpu.rl_accelerated_update(  # the correction is scratch: the kernel overwrites it
        current_cpu, step_cpu, 0.6, correction.copy(), normalization, prev_cpu, True
    )
    current_gpu, step_gpu, prev_gpu = (cupy.asarray(a) for a in (current, step, update_prev))
    dots_gpu = gpu.rl_accelerated_update(
        current_gpu, step_gpu, 0.6, cupy.asarray(correction), cupy.asarray(normalization), prev_gpu, True
    )
    np.testing.assert_allclose(current_gpu.get(), current_cpu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        _backend.from_bfloat16(prev_gpu.get()), _backend.from_bfloat16(prev_cpu), rtol=2**-6, atol=1e-6
    )
    np.testing.assert_allclose(
        _backend.from_bfloat16(step_gpu.get()), _backend.from_bfloat16(step_cpu), rtol=2**-6, atol=1e-6
    )
    np.testing.assert_allclose(dots_gpu, dots_cpu, rtol=1e-4)

    spectrum = (rng.random((8, 33)) + 1j * rng.random((8, 33))).astype(np.complex64)
    otf = (rng.random((8, 33)) + 1j * rng.random((8, 33))).astype(np.complex64)
    got = gpu.multiply_spectrum(cupy.asarray(spectrum), cupy.asarray(otf), True).get()
    np.testing.assert_allclose(got, spectrum * otf.conj(), rtol=1e-6)

    # conjugate-gradient RL's kernels
    inverse = f32() + 0.8
    inverse.reshape(-1)[::7] = 0
    estimate = f32()
    estimate.reshape(-1)[::7] = 0
    correction = f32() + 0.5
    last_update = f32(0.5) * 0.1
    last_update.reshape(-1)[::7] = 0
    bits = _backend.to_bfloat16(last_update)
    cpu_bits, gpu_bits = bits.copy(), cupy.asarray(bits)
    on_gpu = [cupy.asarray(a) for a in (correction, estimate, inverse)]
    expected = cpu.cg_gradient(correction, estimate, inverse, cpu_bits, True)
    got = gpu.cg_gradient(*on_gpu, gpu_bits, True)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # w = c inv - 1 cancels where RL has converged: fused multiply-adds round it otherwise there
    gpu_update, cpu_update = _backend.from_bfloat16(gpu_bits.get()), _backend.from_bfloat16(cpu_bits)
    np.testing.assert_allclose(gpu_update, cpu_update, rtol=2**-6, atol=1e-6)
    # the compact normalization (H^T 1 in 16 bits), made on each, then used by each
    visible = np.divide(1, inverse, out=np.zeros_like(inverse), where=inverse > 0)
    compact = cpu.compact_visibility(visible, 1e-3)
    np.testing.assert_array_equal(gpu.compact_visibility(cupy.asarray(visible), 1e-3).get(), compact)
    cpu_bits, gpu_bits = bits.copy(), cupy.asarray(bits)
    expected = cpu.cg_gradient(correction, estimate, compact, cpu_bits, True)
    got = gpu.cg_gradient(on_gpu[0], on_gpu[1], cupy.asarray(compact), gpu_bits, True)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    compact_update = _backend.from_bfloat16(gpu_bits.get())
    np.testing.assert_allclose(compact_update, _backend.from_bfloat16(cpu_bits), rtol=2**-6, atol=1e-6)
    gpu_bits = cupy.asarray(cpu_bits)  # the same update on both, so that only what follows is compared
    for step_type in (np.uint16, np.float32):
        update = _stored(cpu_update, step_type)[0]
        last_direction = f32(0.5)
        last_direction.reshape(-1)[::7] = 0  # 0 where the estimate is, as RL's updates are
        direction = _stored(last_direction, step_type)[0]
        cpu_direction, gpu_direction = direction.copy(), cupy.asarray(direction)
        cpu_stage, gpu_stage = np.empty_like(estimate), cupy.empty(estimate.shape, np.float32)
        cpu.cg_direction(update, cpu_direction, 0.7, False, cpu_stage)
        gpu.cg_direction(cupy.asarray(update), gpu_direction, 0.7, False, gpu_stage)
        np.testing.assert_allclose(gpu_stage.get(), cpu_stage, rtol=2**-6, atol=1e-6)
        # the GPU's stage holds what its direction stores, as the CPU's does
        stored = gpu_direction.get()
        stored = _backend.from_bfloat16(stored) if step_type == np.uint16 else stored
        np.testing.assert_array_equal(gpu_stage.get(), stored)
        gpu_direction = cupy.asarray(cpu_direction)  # the same direction on both
        for normalization in (inverse, compact):
            cpu_estimate, gpu_estimate = estimate.copy(), cupy.asarray(estimate)
            args = (2.5, np.float32(1e-3))
            clip_cpu = cpu.cg_advance(cpu_estimate, cpu_direction, args[0], normalization, args[1])
            clip_gpu = gpu.cg_advance(
                gpu_estimate, gpu_direction, args[0], cupy.asarray(normalization), args[1]
            )
            np.testing.assert_allclose(clip_gpu, clip_cpu, rtol=1e-4)
            np.testing.assert_allclose(gpu_estimate.get(), cpu_estimate, rtol=1e-5, atol=1e-6)
    data, model, step = (f32() * 100).astype(np.uint16), f32() + 0.2, f32(0.5)
    for length, bound in ((0.0, True), (1.5, False)):
        args = (np.float32(0.1), np.float32(1e-6), 0.01, length, bound)
        expected = cpu.poisson_line(data, model, step, *args)
        got = gpu.poisson_line(cupy.asarray(data), cupy.asarray(model), cupy.asarray(step), *args)
        np.testing.assert_allclose(got, expected, rtol=1e-4)
    # a per-column background and strided views (the hold-out's checkerboard)
    column = (rng.random(model.shape[-1]) * 0.2).astype(np.float32)
    part = (slice(None), slice(1, None, 2), slice(None))
    offset_cpu = np.broadcast_to(column, model.shape)[part]
    offset_gpu = cupy.broadcast_to(cupy.asarray(column), model.shape)[part]
    args = (np.float32(1e-6), 0.01, 0.0, True)
    expected = cpu.poisson_line(data[part], model[part], step[part], offset_cpu, *args)
    on_device = (cupy.asarray(a)[part] for a in (data, model, step))
    got = gpu.poisson_line(*on_device, offset_gpu, *args)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # the step is H d in the operator's grid: a strided view, which takes the ratio in place
    grid = np.zeros(step.shape[:-1] + (step.shape[-1] + 3,), np.float32)
    grid[..., 1:-2] = step
    cpu_model, gpu_model = model.copy(), cupy.asarray(model)
    cpu_grid, gpu_grid = grid.copy(), cupy.asarray(grid)
    scalars = (np.float32(0.1), np.float32(1e-6), 0.01)
    cpu.cg_model_ratio(data, cpu_model, cpu_grid[..., 1:-2], 0.3, *scalars)
    gpu.cg_model_ratio(cupy.asarray(data), gpu_model, gpu_grid[..., 1:-2], 0.3, *scalars)
    np.testing.assert_allclose(gpu_model.get(), cpu_model, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gpu_grid.get(), cpu_grid, rtol=1e-5)
    np.testing.assert_array_equal(cpu_grid[..., [0, -2, -1]], 0)  # only the view was written
    combined = cupy.asarray(step)
    gpu.combine(combined, 0.4, 1.0, cupy.asarray(model), cupy.asarray(data).astype(np.float32))
    np.testing.assert_allclose(combined.get(), 0.4 * step + model - data, rtol=1e-5, atol=1e-5)


def test_import_does_not_load_cupy_or_dask():
    import subprocess
    import sys

    code = "import sys, microdecon; print('cupy' in sys.modules, 'dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.skipif(_backend._pyfftw() is None, reason="needs pyFFTW")
def test_fftw_wisdom_is_kept_for_the_next_process():
    import pickle
    import subprocess
    import sys

    plan = (
        "from microdecon._backend import Backend; Backend('cpu', fft_library='fftw').fft_plan((48, 60, 62))"
    )
    subprocess.run([sys.executable, "-c", plan], check=True)
    with open(_backend._wisdom_path(), "rb") as stored:
        saved = pickle.load(stored)
    assert saved[1]  # single-precision plans were measured and stored
    load = (
        "import pyfftw; from microdecon import _backend; _backend._load_wisdom(pyfftw);"
        "print(pyfftw.export_wisdom()[1].decode())"
    )
    loaded = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True).stdout
    assert set(saved[1].decode().split("\n")) <= set(loaded.split("\n"))  # FFTW may reorder entries


def test_thread_count_follows_the_environment(monkeypatch):
    from microdecon._backend import cpu_count

    monkeypatch.delenv("MICRODECON_THREADS", raising=False)
    cores = cpu_count()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # Dask's workers set it: not ours to follow
    assert cpu_count() == cores
    monkeypatch.setenv("MICRODECON_THREADS", "1")
    assert cpu_count() == 1
    monkeypatch.setenv("MICRODECON_THREADS", str(cores + 5))  # capped at the cores
    assert cpu_count() == cores
    monkeypatch.setenv("MICRODECON_THREADS", "two")
    with pytest.raises(ValueError, match="MICRODECON_THREADS"):
        cpu_count()


def test_kernels_follow_a_thread_count_set_after_the_first_call(monkeypatch):
    # A script may set MICRODECON_THREADS after microdecon has run once (a notebook cell, a
    # batch job that shares its cores later): the elementwise kernels heed it from then on.
    import threading

    from microdecon import _backend

    monkeypatch.setattr(_backend, "cpu_count", lambda: 2)  # as on a 2-core machine or larger
    backend = _backend.Backend("cpu")
    big = np.zeros((64, 512, 512), np.float32)  # 64 slabs of 2^18 elements

    def threads_used():
        seen = set()
        backend._slabs.map(lambda s: seen.add(threading.get_ident()), big)
        return seen

    used = threads_used()
    assert threading.get_ident() not in used and 1 <= len(used) <= 2  # a pool of 2 did the work
    monkeypatch.setattr(_backend, "cpu_count", lambda: 1)
    assert threads_used() == {threading.get_ident()}  # now all in the caller's thread
    monkeypatch.setattr(_backend, "cpu_count", lambda: 3)
    assert threading.get_ident() not in threads_used() and sorted(backend._slabs._pools) == [2, 3]
    backend._slabs.shutdown()


@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 600, 500)])  # the last beyond one slab
@pytest.mark.parametrize("strided", [False, True])  # padded rows, as in the FFT's own buffer
def test_clip_against_a_constant_array_equals_numpy_maximum(shape, strided):
    from microdecon import _backend

    rng = np.random.default_rng(1)
    padded = rng.standard_normal(shape[:-1] + (shape[-1] + 2,)).astype(np.float32)
    values = padded[..., : shape[-1]] if strided else np.ascontiguousarray(padded[..., : shape[-1]])
    values.flat[::7] = np.nan  # NaN stays NaN, as with np.maximum
    where = rng.random(shape) < 0.5
    for floor in (0.0, 1e-6, 2.5):
        out = np.empty_like(padded)[..., : shape[-1]] if strided else np.empty_like(values)
        assert _backend._at_least(values, floor, out=out) is out
        np.testing.assert_array_equal(out, np.maximum(values, np.float32(floor)))
        before = out.copy()  # masked: left as it was where the mask is False
        _backend._at_least(values - 1, floor, out=out, where=where)
        np.testing.assert_array_equal(out, np.where(where, np.maximum(values - 1, np.float32(floor)), before))
    assert not _backend._CONSTANTS[0.0].flags.writeable
    # bounded, whatever the input: half a slab, which inputs beyond it go through in parts
    assert _backend._CONSTANTS[0.0].size == _backend._CONSTANT_ELEMENTS == _backend._SLAB_ELEMENTS // 2
    clean = np.where(np.isnan(values), np.float32(1), values)  # sums too go in parts of it
    exact = float(clean.sum(dtype=np.float64))
    assert abs(_backend._total(clean) - exact) <= 1e-5 * float(np.abs(clean).sum(dtype=np.float64))


def test_bfloat16_round_trip_into_a_given_array():
    from microdecon._backend import from_bfloat16, to_bfloat16

    values = np.array([1.0, -3.5, 1e-30, 3e38, 0.0, 1.2345678], np.float32)
    out = np.full(values.shape, np.nan, np.float32)
    back = from_bfloat16(to_bfloat16(values), out=out)
    assert back is out
    np.testing.assert_allclose(back, values, rtol=2**-7)  # 8 significant bits, truncated
    assert np.all(np.abs(back) <= np.abs(values))  # truncation rounds toward zero
