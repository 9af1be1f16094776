"""The one place that knows NumPy from CuPy.

Everything else asks :func:`get_backend` for a :class:`Backend` and uses its ``xp`` (the array
module), its FFT plans and its fused elementwise kernels. CuPy is imported lazily, only when a
GPU is asked for or a CuPy array arrives, so ``import microdecon`` works on any machine.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import threading
from typing import Any

import numpy as np

__all__ = ["Backend", "get_backend", "gpu_available", "is_device_array", "is_out_of_memory"]


# --------------------------------------------------------------------------------------------
# What is installed and present
# --------------------------------------------------------------------------------------------
@functools.cache
def _cupy() -> Any | None:
    """Return the cupy module when it imports and sees at least one GPU, else None."""
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # no cupy, no driver, no device: all mean "no GPU here"
        return None
    return cupy


@functools.cache
def _pyfftw() -> Any | None:
    try:
        return importlib.import_module("pyfftw")
    except ImportError:
        return None


def gpu_available() -> bool:
    """Whether CuPy is installed and a CUDA GPU is usable.

    Examples
    --------
    >>> from microdecon._backend import gpu_available
    >>> isinstance(gpu_available(), bool)
    True
    """
    return _cupy() is not None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says a device ran out of memory: CuPy's OutOfMemoryError, cuFFT failing
    to allocate its work area, or the CPU's MemoryError.

    Examples
    --------
    >>> is_out_of_memory(MemoryError()), is_out_of_memory(ValueError("no"))
    (True, False)
    """
    if isinstance(error, MemoryError):
        return True
    name = type(error).__name__
    return name == "OutOfMemoryError" or (name == "CuFFTError" and "ALLOC_FAILED" in str(error))


def is_device_array(array: Any) -> bool:
    """True for a CuPy array, without importing CuPy when it is not already loaded."""
    return type(array).__module__.split(".")[0] == "cupy"


def array_module(array: Any):
    """``cupy`` for a CuPy array, else ``numpy``."""
    return importlib.import_module("cupy") if is_device_array(array) else np


@functools.cache
def _glibc() -> Any:
    """The C library, where it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


@functools.cache
def return_freed_memory() -> None:
    """Have glibc's allocator give large freed blocks back to the system (once per process).

    Tiles allocate and free arrays of tens of megabytes one after another. glibc raises its
    mmap threshold to the size of each large block freed (up to 32 MB), so the next ones come
    from the heap, which fragments and keeps growing: a batch of tiles measured 30% over its
    plan in resident memory, and ran slower on the page faults of a churning heap. With blocks
    from 4 MB up always mapped, and the heap trimmed past 4 MB, memory stays at the plan. Not
    lower: the kernels' slab temporaries (1-2 MB, made and freed in every pass) then went to
    and from the system each time, and conjugate-gradient RL ran 28% slower (at 1 MB). Does
    nothing where glibc is not the allocator.
    """
    mallopt = getattr(_glibc(), "mallopt", None)
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 4 << 20)
    mallopt(m_trim_threshold, 4 << 20)


def release_freed_memory() -> None:
    """Give the pages of freed heap blocks back to the system now (glibc's ``malloc_trim``).

    Arrays up to 32 MB come from glibc's heap once one that large has been freed (its mmap
    threshold follows the largest block freed), and freed heap pages stay resident until the
    heap is trimmed. An algorithm that frees its working arrays and then makes its result would
    otherwise peak at both: on the benchmark problem (64x256x256) RL's resident peak was its
    result's 1x the input over its working set. Unlike :func:`return_freed_memory` this changes
    no setting of the allocator. Does nothing where glibc is not the allocator.
    """
    trim = getattr(_glibc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def cpu_count() -> int:
    """Threads for the CPU transforms and kernels: the cores this process may use (affinity
    masks set by batch schedulers are respected), or fewer where ``MICRODECON_THREADS`` says so.
    Read by every elementwise kernel and whenever an FFT plan is made, so a change holds from
    the next call on (a plan already made keeps its threads). Fewer threads serve when other
    jobs share the cores: a transform split over every core waits for its slowest part.
    (``OMP_NUM_THREADS`` is not
    read: Dask's workers set it to 1 for libraries that parallelize on their own, while a
    worker restores one tile at a time and should give it its cores.)

    Examples
    --------
    >>> import os
    >>> os.environ["MICRODECON_THREADS"] = "1"
    >>> cpu_count()
    1
    >>> del os.environ["MICRODECON_THREADS"]
    """
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        cores = max(1, os.cpu_count() or 1)
    value = os.environ.get("MICRODECON_THREADS", "").strip()
    if not value:
        return cores
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"the environment variable MICRODECON_THREADS must be a whole number >= 1, got {value!r}"
        )
    return min(cores, int(value))


# --------------------------------------------------------------------------------------------
# FFT plans: real-to-complex and back, unnormalized both ways, cached per shape
# --------------------------------------------------------------------------------------------
class _ScipyStylePlan:
    """Real FFTs through a scipy.fft-compatible module (scipy.fft on CPU, cupyx.scipy.fft on GPU).

    Both directions are unnormalized (the inverse returns ``n`` times the true inverse); the
    caller folds ``1 / n`` into its OTF once instead of paying a scaling pass per transform.
    CuPy caches its cuFFT plans per shape by itself, so nothing is planned here. Every call
    returns a new array (``reuses_buffers`` is False): callers may keep results.
    """

    reuses_buffers = False

    def __init__(
        self, fft_module: Any, shape: tuple[int, ...], workers: int | None, *, by_stages: bool = False
    ):
        self.shape = shape
        self._fft = fft_module
        self._kw = {} if workers is None else {"workers": workers}
        # scipy's n-d inverse real FFT copies its input once more; done as a complex FFT over
        # the leading axes (in place) and then a real one over the last, it needs no copy.
        self._leading = tuple(range(len(shape) - 1)) if by_stages else None

    def forward(self, real):
        if self._leading is None:
            return self._fft.rfftn(real, s=self.shape, **self._kw)
        spectrum = self._fft.rfft(real, axis=-1, **self._kw)
        if self._leading:
            spectrum = self._fft.fftn(spectrum, axes=self._leading, overwrite_x=True, **self._kw)
        return spectrum

    def inverse(self, spectrum):
        if self._leading is None:
            return self._fft.irfftn(spectrum, s=self.shape, norm="forward", overwrite_x=True, **self._kw)
        if self._leading:
            spectrum = self._fft.ifftn(
                spectrum, axes=self._leading, norm="forward", overwrite_x=True, **self._kw
            )
        return self._fft.irfft(
            spectrum, n=self.shape[-1], axis=-1, norm="forward", overwrite_x=True, **self._kw
        )


class _InPlaceRealPlan:
    """Real FFTs with scipy.fft, in place in one buffer, for an even last axis.

    scipy.fft has no in-place real transform and no ``out=``: each call would allocate its
    output, and on large grids the allocator then holds on to several grids' worth of freed
    memory. Here the real grid is a view into the (padded) spectrum buffer, as with FFTW: a row
    of n reals is read as n/2 complex numbers, transformed in place by a half-length complex
    FFT, and untangled in place into the n/2 + 1 coefficients of the real FFT (the classic
    even/odd split); the leading axes then get complex FFTs in place. The inverse runs the same
    steps backwards. Both directions are unnormalized; ``reuses_buffers`` is True.
    """

    reuses_buffers = True

    def __init__(self, fft_module: Any, shape: tuple[int, ...], workers: int, slabs: _Slabs):
        n = shape[-1]
        if n % 2:
            raise ValueError("the in-place real FFT needs an even last axis")
        half = n // 2
        self.shape = shape
        self.spectrum = np.empty(shape[:-1] + (half + 1,), np.complex64)
        self.real = self.spectrum.view(np.float32)[..., :n]
        twiddle = np.exp(-2j * np.pi * np.arange(half) / n)  # W_n^k
        # X[k] = a Z[k] + b conj Z[half - k] untangles the half-length FFT Z; its inverse is
        # Z[k] = c X[k] + d conj X[half - k] (times 2: an unnormalized inverse gives n x)
        self._a = (0.5 * (1 - 1j * twiddle)).astype(np.complex64)
        self._b = (0.5 * (1 + 1j * twiddle)).astype(np.complex64)
        self._c = (1 + 1j * np.conj(twiddle)).astype(np.complex64)
        self._d = (1 - 1j * np.conj(twiddle)).astype(np.complex64)
        self._leading = tuple(range(len(shape) - 1))
        self._fft = fft_module
        self._workers = workers
        self._slabs = slabs

    def forward(self, real):
        if real is not self.real:
            self.real[...] = real
        spectrum, half = self.spectrum, self.spectrum.shape[-1] - 1
        self._fft.fft(spectrum[..., :half], axis=-1, overwrite_x=True, workers=self._workers)
        a, b = self._a, self._b

        def untangle(s):
            z = spectrum[s]
            mirror = np.empty(z.shape[:-1] + (half,), np.complex64)
            mirror[..., 0] = z[..., 0]
            mirror[..., 1:] = z[..., half - 1 : 0 : -1]
            np.conjugate(mirror, out=mirror)
            mirror *= b
            z[..., half] = z[..., 0].real - z[..., 0].imag
            head = z[..., :half]
            head *= a
            head += mirror

        self._slabs.map(untangle, spectrum)
        if self._leading:
            self._fft.fftn(spectrum, axes=self._leading, overwrite_x=True, workers=self._workers)
        return spectrum

    def inverse(self, spectrum):
        if spectrum is not self.spectrum:
            self.spectrum[...] = spectrum
        spectrum, half = self.spectrum, self.spectrum.shape[-1] - 1
        if self._leading:
            self._fft.ifftn(
                spectrum, axes=self._leading, norm="forward", overwrite_x=True, workers=self._workers
            )
        c, d = self._c, self._d

        def tangle(s):
            x = spectrum[s]
            mirror = np.conj(x[..., half:0:-1])
            mirror *= d
            head = x[..., :half]
            head *= c
            head += mirror

        self._slabs.map(tangle, spectrum)
        self._fft.ifft(spectrum[..., :half], axis=-1, norm="forward", overwrite_x=True, workers=self._workers)
        return self.real


_WISDOM = {"loaded": False}


def _wisdom_path():
    from pathlib import Path

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "microdecon" / "fftw-wisdom.pickle"


def _load_wisdom(pyfftw: Any) -> None:
    """Import the FFTW plans measured by earlier processes (once per process; best effort)."""
    if _WISDOM["loaded"]:
        return
    _WISDOM["loaded"] = True
    try:
        import pickle

        with open(_wisdom_path(), "rb") as stored:
            pyfftw.import_wisdom(pickle.load(stored))
    except Exception:  # no cache yet, another FFTW version, a read-only home: plan afresh
        pass


def _save_wisdom(pyfftw: Any) -> None:
    """Keep what FFTW measured for the next process (atomic; silently skipped when unwritable)."""
    try:
        import pickle
        import tempfile

        path = _wisdom_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(handle, "wb") as out:
            pickle.dump(pyfftw.export_wisdom(), out)
        os.replace(temporary, path)
    except Exception:
        pass


class _FFTWPlan:
    """Real FFTs through pyFFTW with plans measured once per shape and reused.

    The transforms run in place: the real grid is a view into the (padded) spectrum buffer,
    which halves the plan's memory. ``forward`` copies its input into that grid when it is not
    the grid already; both methods return the plan's own buffer, which the next call overwrites
    (``reuses_buffers`` is True).
    """

    reuses_buffers = True

    def __init__(self, pyfftw: Any, shape: tuple[int, ...], threads: int):
        import time

        _load_wisdom(pyfftw)
        started = time.perf_counter()
        self.shape = shape
        spectral = shape[:-1] + (shape[-1] // 2 + 1,)
        self.spectrum = pyfftw.empty_aligned(spectral, dtype=np.complex64)
        self.real = self.spectrum.view(np.float32)[..., : shape[-1]]
        axes = tuple(range(len(shape)))
        flags = ("FFTW_MEASURE", "FFTW_DESTROY_INPUT")
        self._forward = pyfftw.FFTW(
            self.real, self.spectrum, axes=axes, direction="FFTW_FORWARD", flags=flags, threads=threads
        )
        self._inverse = pyfftw.FFTW(
            self.spectrum, self.real, axes=axes, direction="FFTW_BACKWARD", flags=flags, threads=threads
        )
        if time.perf_counter() - started > 0.1:  # FFTW measured something new: keep it
            _save_wisdom(pyfftw)

    def forward(self, real):
        if real is not self.real:
            self.real[...] = real
        self._forward.execute()
        return self.spectrum

    def inverse(self, spectrum):
        if spectrum is not self.spectrum:
            self.spectrum[...] = spectrum
        self._inverse.execute()  # execute() does not normalize: what the caller expects
        return self.real


# --------------------------------------------------------------------------------------------
# Fused elementwise kernels: CuPy kernels built once per device; NumPy fallbacks that work slab
# by slab along the first axis, in a thread pool (NumPy releases the GIL), with slab-sized
# temporaries only: several steps per pass while the slab is in cache, every core busy, and no
# grid-sized temporary.
# --------------------------------------------------------------------------------------------
#: The kernels every backend offers, under the same names and signatures.
KERNEL_NAMES = (
    "rl_ratio",
    "rl_update",
    "predict",
    "rl_accelerated_update",
    "multiply_spectrum",
    "copy",
    "i_divergence",
    "compact_visibility",
    "cg_gradient",
    "cg_direction",
    "poisson_line",
    "cg_advance",
    "cg_model_ratio",
    "combine",
)

#: Where the data are 0 the I-divergence's term ``y log(y / m)`` is 0: the ratio is raised to this
#: before its logarithm, which the factor 0 then cancels (no 0 * -inf).
_TINY_RATIO = np.float32(1e-30)

_SLAB_ELEMENTS = 1 << 18  # ~1 MB of float32 per slab: stays in a core's cache


class _Slabs:
    """Runs a function over slabs of the first axis, on a thread pool when the work is large.

    The pool has :func:`cpu_count` threads as it reads at each call, like the FFT plans, so
    that ``MICRODECON_THREADS`` set after the first call still holds. One pool is kept per
    count and none is shut down while the process runs: a thread may be using it.
    """

    def __init__(self):
        self._pools: dict = {}
        self._lock = threading.Lock()

    def map(self, fn, array) -> list:
        rows = array.shape[0] if array.ndim else 1
        per_row = max(1, array.size // max(rows, 1))
        step = max(1, _SLAB_ELEMENTS // per_row)
        slabs = [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
        workers = cpu_count()
        if workers == 1 or len(slabs) == 1:
            return [fn(s) for s in slabs]
        with self._lock:
            pool = self._pools.get(workers)
            if pool is None:
                from concurrent.futures import ThreadPoolExecutor

                pool = self._pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="microdecon")
        return list(pool.map(fn, slabs))

    def shutdown(self) -> None:
        """End the pools' threads (for tests; the next call makes a new pool)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True)


def to_bfloat16(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16): the upper half of each float, i.e. rounding toward zero.

    Float32's range with 2-3 significant digits: enough for the extrapolation's dot products and
    step, at half the memory. A shift, not a conversion: float16 costs three times as much, and
    small updates would fall into its subnormals.
    """
    if out is None:
        out = np.empty(values.shape, np.uint16)
    np.right_shift(values.view(np.uint32), 16, out=out, casting="unsafe")
    return out


def from_bfloat16(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 (into ``out``, a float32 array, when given)."""
    if out is None:
        out = np.empty(bits.shape, np.float32)
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


#: A compact normalization (the kernel ``compact_visibility``) holds ``H^T 1`` in these units,
#: and UNSEEN where the data see too little of a voxel: a seen voxel's ``H^T 1`` is over 1e-3 (RL's
#: MIN_VISIBLE_FRACTION), so at least 66. Not 0: its quotients stay finite, and meet the
#: estimate's 0 there without a test.
VISIBLE_UNITS = 65535
UNSEEN = 1


def seen_by_data(normalization: Any) -> Any:
    """Where RL's normalization says the data see a voxel (NumPy or CuPy, a boolean array): a
    float32 ``1 / H^T 1`` over 0, or a compact one (``compact_visibility``) over UNSEEN.

    Examples
    --------
    >>> seen_by_data(np.float32([0.0, 1.5])).tolist(), seen_by_data(np.uint16([UNSEEN, 2000])).tolist()
    ([False, True], [False, True])
    """
    return normalization > (UNSEEN if normalization.dtype == np.uint16 else 0)


def _load_step(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A step buffer's values as float32 (a new array, or ``out``): bfloat16 bits or float32."""
    if bits.dtype == np.uint16:
        return from_bfloat16(bits, out)
    if out is None:
        return bits.astype(np.float32, copy=True)
    np.copyto(out, bits)
    return out


def _store_step(values: np.ndarray, out: np.ndarray) -> None:
    if out.dtype == np.uint16:
        to_bfloat16(values, out=out)
    else:
        out[...] = values


_CONSTANTS: dict[float, np.ndarray] = {}  # value -> read-only float32 array of it
_MAX_CONSTANTS = 16  # conjugate-gradient RL's floor depends on the data: the oldest make room
#: A constant's length: half a slab, which the clips and sums below go through in parts. They
#: last as long as the process, and conjugate-gradient RL uses four: a slab long, they were
#: 0.25x the benchmark problem's input in resident memory (its peak 9.8-9.9x, against the 10x
#: allowed; now 9.6x). Half a slab ran as fast side by side; a quarter, 1-2% slower.
_CONSTANT_ELEMENTS = _SLAB_ELEMENTS // 2


_CONSTANTS_LOCK = threading.Lock()


def _constant(value: float) -> np.ndarray:
    """A read-only float32 array of ``value``, _CONSTANT_ELEMENTS long (made once per value)."""
    constant = _CONSTANTS.get(float(value))
    if constant is None:
        constant = np.full(_CONSTANT_ELEMENTS, value, np.float32)
        constant.flags.writeable = False
        with _CONSTANTS_LOCK:  # the kernels' threads ask at once: one evicts at a time
            while len(_CONSTANTS) >= _MAX_CONSTANTS:
                del _CONSTANTS[next(iter(_CONSTANTS))]
            _CONSTANTS[float(value)] = constant
    return constant


def _total(values: np.ndarray) -> float:
    """``values.sum()`` of a float32 slab, as a dot product with ones: BLAS sums three times
    faster than NumPy's pairwise sum, to float32's precision, which the step sizes and clips it
    adds up need."""
    ones = _constant(1.0)
    # a strided view is copied first: still faster than NumPy's strided sum
    flat = np.ascontiguousarray(values).reshape(-1)
    total = 0.0
    for start in range(0, flat.size, ones.size):
        part = flat[start : start + ones.size]
        total += float(np.dot(part, ones[: part.size]))
    return total


def _add_scaled(values: np.ndarray, factor: float, out: np.ndarray) -> np.ndarray:
    """``out += factor * values`` (float32; ``values`` is scratch: it is scaled in place).

    Not BLAS's saxpy: called from the kernels' threads it ran the conjugate-gradient iteration
    50% slower, its own threads contending with them."""
    values *= np.float32(factor)
    out += values
    return out


def _at_least(values: np.ndarray, floor: float, out: np.ndarray, where: Any = True) -> np.ndarray:
    """``out <- max(values, floor)`` (only ``where`` it is True; elsewhere ``out`` is left as
    it is), against a constant array of ``floor`` (see :func:`_constant`).

    NumPy (2.4, x86) has no vector loop for maximum against a broadcast scalar: it runs three
    to four times slower than against an array, and the RL iteration clips several times per
    pass. Larger inputs go in parts of the constant's length: contiguous ones flat, strided
    ones a block of rows along the first axis at a time (a row longer than the constant, row
    by row).
    """
    constant = _constant(floor)
    if values.size <= constant.size:
        return np.maximum(values, constant[: values.size].reshape(values.shape), out=out, where=where)
    masked = where is not True
    result = target = out
    if values.flags.c_contiguous and out.flags.c_contiguous and (not masked or where.flags.c_contiguous):
        values, target = values.reshape(-1, 1), out.reshape(-1, 1)  # rows of one: parts of any length
        where = where.reshape(-1, 1) if masked else True
    if values.ndim == 0:
        return np.maximum(values, np.float32(floor), out=out, where=where)
    rows = values.shape[0]
    if values.size // rows > constant.size:  # rows longer than the constant: one at a time
        for row in range(rows):
            _at_least(values[row], floor, target[row], where[row] if masked else True)
        return result
    step = constant.size // (values.size // rows)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        block = values[part]
        mask = where[part] if masked else True
        np.maximum(block, constant[: block.size].reshape(block.shape), out=target[part], where=mask)
    return result


def _divide_data(
    image: np.ndarray, denominator: np.ndarray, offset: Any, floor, image_scale, clip_image
) -> None:
    """RL's ratio on one slab, in place: ``denominator <- max(image * image_scale, 0) /
    max(denominator + offset, floor)`` (the clip at 0 only with ``clip_image``)."""
    denominator += offset
    _at_least(denominator, floor, out=denominator)
    # a large negative value may overflow to -inf here: harmless, as it is clipped next
    with np.errstate(over="ignore"):
        numerator = np.multiply(image, image_scale, dtype=np.float32)
    if clip_image:
        _at_least(numerator, 0, out=numerator)
    np.divide(numerator, denominator, out=denominator)


def _numpy_kernels(slabs: _Slabs):

    def rl_ratio(image, blurred, background, floor, image_scale=1.0, clip_image=True):
        """blurred <- max(image, 0) * image_scale / max(blurred + background, floor), in place.

        ``image`` may have any real dtype: each slab is converted as it is read. ``clip_image``
        False skips the max with 0 for images known to be non-negative.
        """
        per_voxel = isinstance(background, np.ndarray) and background.ndim
        if per_voxel:
            background = np.broadcast_to(background, image.shape)
        image_scale = np.float32(image_scale)

        def slab(s):
            # the blurred estimate is scratch: the denominator is made where it lies, and the
            # numerator is the only temporary (each one a slab per thread counts in peak memory)
            offset = background[s] if per_voxel else background
            _divide_data(image[s], blurred[s], offset, floor, image_scale, clip_image)

        slabs.map(slab, image)
        return blurred

    def rl_update(estimate, correction, normalization, out, also=None):
        """out <- max(estimate * correction * normalization, 0); ``normalization`` may be None.

        ``also``, when given, receives the same values (the next FFT's input: saves a copy).
        """

        def slab(s):
            value = correction[s] * estimate[s]
            if normalization is not None:
                value *= normalization[s]
            _at_least(value, 0, out=out[s])
            if also is not None:
                also[s] = out[s]

        slabs.map(slab, estimate)
        return out

    def _predicted(current, step, alpha, s, out=None):
        """max(x_k + alpha * h_k, 0) on one slab, into ``out`` (a new array when None); ``step``
        None means alpha = 0."""
        if step is None:
            if out is None:
                return current[s].copy()
            np.copyto(out, current[s])
            return out
        value = _load_step(step[s], out)
        value *= alpha
        value += current[s]
        return _at_least(value, 0, out=value)

    def predict(current, step, alpha, out):
        """out <- max(current + alpha * step, 0): the Biggs–Andrews predicted point.

        ``step`` (h_k = x_k - x_{k-1}, bfloat16 bits) may be None on the first iteration.
        ``out`` (float32, any strides) must not overlap ``current``: it is written first.
        """
        alpha = np.float32(alpha)

        def slab(s):
            _predicted(current, step, alpha, s, out=out[s])

        slabs.map(slab, current)
        return out

    def rl_accelerated_update(current, step, alpha, correction, normalization, update_prev, have_prev):
        """One accelerated RL step after the correction, in one pass over the data.

        With y = max(x + alpha h, 0) recomputed from ``current`` (x) and ``step`` (h, or None):
        new = y * correction * normalization replaces ``current`` (not clipped: it is >= 0 up to
        FFT rounding, and the next prediction clips); the RL update
        g = new - y replaces ``update_prev`` and new - x replaces ``step`` (both bfloat16 bits,
        see :func:`to_bfloat16`, or both float32). Returns <g, g_prev> and <g_prev, g_prev>, from
        before. ``correction`` is scratch: it is overwritten (here with the new estimate).
        """
        alpha = np.float32(alpha)

        def slab(s):
            # One temporary per thread (it counts in peak memory): the correction is scratch (the
            # transform's output) and takes the new estimate, and x_k's slab, once its step is
            # stored, holds g_{k-1} for the dot products.
            estimate = current[s]  # x_k, contiguous
            work = _predicted(current, step if have_prev else None, alpha, s)  # y
            # No clip at zero here: y >= 0 and the correction is >= 0 up to FFT rounding
            # (~1e-7); the next prediction and the final result clip, which saves a pass.
            new = np.multiply(correction[s], work, out=correction[s])
            if normalization is not None:
                new *= normalization[s]
            update = np.subtract(new, work, out=work)  # g_k
            _store_step(np.subtract(new, estimate, out=estimate), step[s])  # h_{k+1} = new - x_k
            cross = norm = 0.0
            if have_prev:
                previous = _load_step(update_prev[s], out=estimate).ravel()
                cross = float(np.dot(update.ravel(), previous))
                norm = float(np.dot(previous, previous))
            _store_step(update, update_prev[s])
            np.copyto(estimate, new)
            return cross, norm

        parts = slabs.map(slab, current)
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def compact_visibility(visible, least):
        """``H^T 1`` (float32, ``visible``) as RL's compact normalization (uint16): in units of
        ``1 / VISIBLE_UNITS``, UNSEEN where it is at most ``least`` (the data see too little of
        the voxel, and RL's normalization is 0 there). A new array.

        Half the memory of RL's float32 ``1 / H^T 1``, for a relative error in ``H^T 1`` of at
        most ``0.5 / (VISIBLE_UNITS H^T 1)``: none where it is 1, 6e-5 at 1/8, 0.8% at the
        support's edge (RL's MIN_VISIBLE_FRACTION, 1e-3); bfloat16 would be off by up to 0.4%
        everywhere. ``H^T 1`` must be at most 1 (as for "non-circulant"): larger values are
        stored as 1. The conjugate-gradient kernels take either form.
        """
        out = np.empty(visible.shape, np.uint16)
        least = np.float32(least)

        def slab(s):
            part = visible[s]
            units = np.multiply(part, np.float32(VISIBLE_UNITS))
            np.rint(units, out=units)
            np.minimum(units, np.float32(VISIBLE_UNITS), out=units)
            np.copyto(units, np.float32(UNSEEN), where=~(part > least))
            out[s] = units

        slabs.map(slab, visible)
        return out

    def cg_gradient(correction, estimate, normalization, update, has_prev):
        """RL's update and the inner products conjugate-gradient RL weighs its next direction
        by, in one pass.

        With ``w = c / H^T 1 - 1`` (``normalization``: ``1 / H^T 1`` in float32, or
        ``compact_visibility``'s uint16, or None for ``H^T 1 = 1``), RL's update is
        ``u = x w`` and the log-likelihood's gradient ``grad = H^T 1 w = c - H^T 1``. Returns
        ``<grad, u>`` and ``<grad, update>`` (the last update, read before ``u`` replaces it:
        bfloat16 bits or float32; 0 unless ``has_prev``). Where the normalization is 0 the
        estimate is too, and so is every term.
        """
        compact = normalization is not None and normalization.dtype == np.uint16

        def slab(s):
            c = correction[s]
            if normalization is None:
                w = np.subtract(c, np.float32(1))
                gradient = w.copy()
            elif compact:  # see compact_visibility: H^T 1, for now; never 0
                gradient = np.multiply(normalization[s], np.float32(1 / VISIBLE_UNITS), dtype=np.float32)
                w = np.divide(c, gradient)
                w -= np.float32(1)
                np.subtract(c, gradient, out=gradient)
            else:
                gradient = np.multiply(c, normalization[s])
                w = np.subtract(gradient, np.float32(1))
                # w / (1 / H^T 1); where the normalization is 0 the huge quotient meets x = 0
                _at_least(normalization[s], _TINY_RATIO, out=gradient)
                np.divide(w, gradient, out=gradient)
            own_update = np.multiply(w, estimate[s], out=w)
            own = float(np.dot(gradient.ravel(), own_update.ravel()))
            cross = 0.0
            if has_prev:
                cross = float(np.dot(gradient.ravel(), _load_step(update[s]).ravel()))
            _store_step(own_update, update[s])
            return own, cross

        parts = slabs.map(slab, estimate)
        return math.fsum(p[0] for p in parts), math.fsum(p[1] for p in parts)

    def cg_direction(update, direction, beta, fresh, stage):
        """The search direction ``d <- u + beta d`` (``fresh``: ``d <- u``; ``u`` is RL's update
        as :func:`cg_gradient` stored it), stored as ``direction`` is (bfloat16 bits or
        float32), and its stored values as float32 into ``stage`` (the next transform's input;
        any strides): the transform then blurs exactly the direction the step will follow."""
        beta = np.float32(beta)

        def slab(s):
            value = _load_step(update[s])
            if not fresh:
                _add_scaled(_load_step(direction[s]), beta, value)
            _store_step(value, direction[s])
            _load_step(direction[s], out=stage[s])

        slabs.map(slab, update)
        return stage

    def poisson_line(image, model, step, background, floor, image_scale, length, first_pass, clip_image=True):
        """Sums for Newton's and Halley's steps on the Poisson log-likelihood along
        ``model + t step``.

        With ``y = max(image * image_scale, 0)``, ``m = max(model + background, floor)`` and
        ``q = max(m + length * step, floor)``: ``sum(y step / q)``, ``sum(y (step / q)^2)``, and,
        on the ``first_pass``, ``sum(y (step / q)^3)``, ``sum(step)`` and the largest ``t`` that
        keeps ``m + t step`` positive (``min(m / -step)`` where ``step < 0``; inf if none); on
        the others 0, 0 and inf. Views may be strided. ``clip_image`` False skips the max with 0
        for data known to be non-negative.
        """
        per_voxel = isinstance(background, np.ndarray) and background.ndim
        if per_voxel:
            background = np.broadcast_to(background, model.shape)
        image_scale, length = np.float32(image_scale), np.float32(length)

        def slab(s):
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                m = np.add(model[s], background[s] if per_voxel else background, dtype=np.float32)
                _at_least(m, floor, out=m)
                h = step[s]
                if length:
                    m += np.multiply(h, length)  # its temporary goes before the data's is made
                    _at_least(m, floor, out=m)
                np.divide(h, m, out=m)
                bound, total, third = math.inf, 0.0, 0.0
                if first_pass:  # (m + t h) / m = 1 + t h / m: positive for t < -1 / min(h / m)
                    steepest = float(m.min()) if m.size else 0.0
                    bound = -1.0 / steepest if steepest < 0 else math.inf
                    total = _total(h)
                # the data's scale leaves the sums: float32 data are read as they are (a copy
                # only to convert, to clip or to gather a strided view), in any dtype alike;
                # data past 1e20 or under 1e-20 are scaled first: float32 sums of them could
                # overflow, or lose digits to subnormal numbers
                data, scale = image[s], float(image_scale)
                if not 1e-20 <= scale <= 1e20:
                    data, scale = np.multiply(data, image_scale, dtype=np.float32), 1.0
                if clip_image:
                    data = data.astype(np.float32)  # a copy: clipped in place
                    _at_least(data, 0, out=data)
                data = np.ascontiguousarray(data, dtype=np.float32)
                first = float(np.dot(data.ravel(), m.ravel())) * scale
                power = np.multiply(m, m) if first_pass else np.multiply(m, m, out=m)
                second = float(np.dot(data.ravel(), power.ravel())) * scale
                if first_pass:
                    power *= m
                    third = float(np.dot(data.ravel(), power.ravel())) * scale
                return first, second, third, total, bound

        parts = slabs.map(slab, model)
        return (*(math.fsum(p[k] for p in parts) for k in range(4)), min(p[4] for p in parts))

    def cg_advance(estimate, direction, length, normalization, floor, measure=True):
        """``x <- max(x + length d, floor)`` (``d`` as :func:`cg_direction` stored it), and 0
        where the normalization is 0 (the gradient's terms there are 0 only because ``x`` is).
        Returns how much the clip at the floor added, ``sum(max(floor - x - length d, 0))``,
        and the step's size, ``sum(|length d|)`` (where the normalization is not 0); both 0
        unless ``measure``."""
        length = np.float32(length)

        def slab(s):
            d = _load_step(direction[s])
            x = estimate[s]
            clipped = stepped = 0.0
            if measure:
                magnitude = np.abs(d)
                stepped = _total(magnitude) * abs(float(length))  # d is 0 where the data see nothing
            _add_scaled(d, length, x)  # in place: the estimate's slab is contiguous
            if measure:
                short = np.subtract(floor, x, out=magnitude)
                clipped = _total(_at_least(short, 0, out=short))
            if normalization is None:
                _at_least(x, floor, out=x)
            else:  # unseen voxels were 0 and stay 0 (a masked maximum: a product would cost more)
                seen = seen_by_data(normalization[s])
                _at_least(x, floor, out=x, where=seen)
                if measure:  # what the sum gave them at the floor is not clipping
                    clipped -= float(floor) * (seen.size - np.count_nonzero(seen))
            return max(clipped, 0.0), stepped

        parts = slabs.map(slab, estimate)
        return math.fsum(p[0] for p in parts), math.fsum(p[1] for p in parts)

    def cg_model_ratio(image, model, step, length, background, floor, image_scale=1.0, clip_image=True):
        """``model <- model + length step``, then RL's ratio of the data to it in place of
        ``step`` (as :func:`rl_ratio`), in one pass: conjugate-gradient RL carries its model so,
        and the blurred direction's memory is the next adjoint's input."""
        per_voxel = isinstance(background, np.ndarray) and background.ndim
        if per_voxel:
            background = np.broadcast_to(background, image.shape)
        image_scale, length = np.float32(image_scale), np.float32(length)

        def slab(s):
            denominator = step[s]
            denominator *= length
            denominator += model[s]
            model[s] = denominator
            offset = background[s] if per_voxel else background
            _divide_data(image[s], denominator, offset, floor, image_scale, clip_image)

        slabs.map(slab, image)
        return step

    def combine(out, keep, add, plus, minus=None):
        """out <- keep * out + add * plus - minus (``keep`` 0 ignores what ``out`` held)."""
        keep, add = np.float32(keep), np.float32(add)

        def slab(s):
            target = out[s]
            if keep == 0:
                np.multiply(plus[s], add, out=target)
            else:
                if keep != 1:
                    target *= keep
                target += plus[s] * add if add != 1 else plus[s]
            if minus is not None:
                target -= minus[s]

        slabs.map(slab, out)
        return out

    def i_divergence(image, blurred, background, floor, image_scale=1.0):
        """``sum(y log(y / m) - y + m)``, ``y = max(image * image_scale, 0)`` and
        ``m = max(blurred + background, floor)``: the data's I-divergence from the model, in one
        pass of cache-sized slabs (any real ``image`` dtype; views may be strided), summed in
        float64. It is RL's misfit (see :func:`microdecon.metrics.i_divergence`) without a
        temporary of the image's size."""
        per_voxel = isinstance(background, np.ndarray) and background.ndim
        if per_voxel:
            background = np.broadcast_to(background, blurred.shape)
        image_scale = np.float32(image_scale)

        def slab(s):
            with np.errstate(over="ignore", invalid="ignore"):
                y = np.multiply(image[s], image_scale, dtype=np.float32)
                _at_least(y, 0, out=y)
                m = np.add(blurred[s], background[s] if per_voxel else background, dtype=np.float32)
                _at_least(m, floor, out=m)
                total = float(m.sum(dtype=np.float64)) - float(y.sum(dtype=np.float64))
                np.divide(y, m, out=m)
                _at_least(m, _TINY_RATIO, out=m)
                np.log(m, out=m)
                m *= y
                return total + float(m.sum(dtype=np.float64))

        return math.fsum(slabs.map(slab, blurred))

    def multiply_spectrum(spectrum, otf, conjugate):
        """spectrum *= otf (or its conjugate); ``otf`` may be real (a symmetric PSF)."""
        conjugate = conjugate and np.iscomplexobj(otf)

        def slab(s):
            if conjugate:  # s conj(o) = conj(conj(s) o): in place, with no temporary
                part = spectrum[s]
                np.conjugate(part, out=part)
                part *= otf[s]
                np.conjugate(part, out=part)
            else:
                spectrum[s] *= otf[s]

        slabs.map(slab, spectrum)
        return spectrum

    def copy(destination, source):
        def slab(s):
            destination[s] = source[s]

        slabs.map(slab, source)
        return destination

    kernels = locals()
    return {name: kernels[name] for name in KERNEL_NAMES}


def _sum_by_rows(
    reduction: Any, *args: Any, rows: int = 2048, combine: str = "sum", to_host: bool = True
) -> Any:
    """``reduction(*args)`` over all elements, computed as partial sums and their sum.

    CuPy reduces a whole array to one value with a single thread block (when CUB does not take
    the kernel). On an H200 that made accelerated RL's two dot products cost 25 times the rest
    of its iteration: 37 ms per iteration at 256^3, against 1.7 ms with rows of partial sums,
    which spread the work over every multiprocessor. When the array arguments are contiguous
    and of one shape they are cut into ``rows`` rows (the remainder that fills no row is
    reduced on its own); otherwise (strided views, broadcasting) they are reduced along their
    last axis, which needs no copy. Arguments that are not arrays (scalars) pass unchanged. The
    partial sums are added on the device, so the caller waits once. ``combine="min"`` serves a
    minimum-reduction the same way (its partial minima are reduced by ``min``). ``to_host=False``
    returns the result on the device (a 0-d array), for callers that fetch several at once.

    Examples
    --------
    >>> import numpy as np
    >>> def dot(a, b, axis=None):
    ...     return np.sum(a * b, axis=axis)
    >>> x = np.arange(10.0)
    >>> _sum_by_rows(dot, x, x, rows=4), _sum_by_rows(dot, x[::2], x[::2], rows=4)
    ((285+0j), (120+0j))
    """
    arrays = [i for i, arg in enumerate(args) if getattr(arg, "ndim", 0)]
    first = args[arrays[0]]
    if not all(args[i].flags.c_contiguous and args[i].shape == first.shape for i in arrays):
        result = getattr(reduction(*args, axis=-1), combine)()
        return complex(result) if to_host else result
    whole = first.size - first.size % rows
    flat = list(args)
    for i in arrays:
        flat[i] = args[i].reshape(-1)  # views of contiguous arrays

    def part(select: slice, shape: tuple[int, ...], **axis: int) -> Any:
        sliced = [arg[select].reshape(shape) if i in arrays else arg for i, arg in enumerate(flat)]
        return reduction(*sliced, **axis)

    parts = []
    if whole:
        parts.append(getattr(part(slice(0, whole), (rows, -1), axis=1), combine)())
    if whole < first.size:
        parts.append(part(slice(whole, None), (-1,)))
    if len(parts) == 1:
        result = parts[0]
    elif combine == "min":
        result = np.minimum(parts[0], parts[1])  # CuPy's own, for device values
    else:
        result = parts[0] + parts[1]
    return complex(result) if to_host else result


def _bfloat16_code(type_name: str) -> tuple[str, str]:
    """CUDA expressions (format strings) that load a buffer of ``type_name`` as float32 and keep
    a float32 in it: "uint16" holds bfloat16 bits (see :func:`to_bfloat16`), "float32" values."""
    if type_name == "uint16":
        return "__uint_as_float(((unsigned int)({})) << 16)", "(unsigned short)(__float_as_uint({}) >> 16)"
    return "({})", "({})"


def _cupy_kernels(cupy: Any):
    ratio = cupy.ElementwiseKernel(
        "I image, T background, T floor_value, T image_scale",
        "T blurred",
        "T y = (T)image * image_scale; y = y > (T)0 ? y : (T)0; T d = blurred + background;"
        " blurred = y / (d > floor_value ? d : floor_value)",
        "microdecon_rl_ratio",
    )
    update = cupy.ElementwiseKernel(
        "T estimate, T correction",
        "T out",
        "T v = estimate * correction; out = v > (T)0 ? v : (T)0",
        "microdecon_rl_update",
    )
    update_normalized = cupy.ElementwiseKernel(
        "T estimate, T correction, T normalization",
        "T out",
        "T v = estimate * correction * normalization; out = v > (T)0 ? v : (T)0",
        "microdecon_rl_update_normalized",
    )

    def step_kernels(step_type: str):
        """The accelerated-RL kernels for step buffers of ``step_type``: "uint16" holds
        bfloat16 bits (the upper half of a float32's), "float32" the values themselves."""
        load, keep = _bfloat16_code(step_type)
        name = f"microdecon_{step_type}"
        predicted_point = (
            "T y = has_step ? current + alpha * "
            + load.format("step")
            + " : current; y = y > (T)0 ? y : (T)0;"
        )
        predict_kernel = cupy.ElementwiseKernel(
            f"T current, {step_type} step, T alpha, bool has_step",
            "T out",
            predicted_point + " out = y;",
            f"{name}_predict",
        )
        # new estimate in place of x; the RL update g into the correction's scratch; the step h
        accelerated = cupy.ElementwiseKernel(
            "T alpha, bool has_step, T normalization",
            f"T current, {step_type} step, T correction",
            predicted_point
            + f"""
            T v = y * correction * normalization;
            correction = v - y;
            step = {keep.format("v - current")};
            current = v;
            """,
            f"{name}_rl_accelerated",
        )
        # <g, p> and <p, p> in one pass over both arrays, as the real and imaginary parts of
        # one complex sum (a ReductionKernel has one output).
        dot_and_square = cupy.ReductionKernel(
            f"float32 g, {step_type} p",
            "complex128 y",
            "complex<double>((double)g * (double)"
            + load.format("p")
            + ", (double)"
            + load.format("p")
            + " * (double)"
            + load.format("p")
            + ")",
            "a + b",
            "y = a",
            "complex<double>(0, 0)",
            f"{name}_dot_and_square",
        )
        store = cupy.ElementwiseKernel(
            "float32 g", f"{step_type} b", "b = " + keep.format("g"), f"{name}_store"
        )
        return predict_kernel, accelerated, dot_and_square, store

    by_step_type = {
        np.dtype(np.uint16): step_kernels("uint16"),
        np.dtype(np.float32): step_kernels("float32"),
    }

    compact = cupy.ElementwiseKernel(
        "float32 visible, float32 least",
        "uint16 units",
        f"units = visible > least"
        f" ? (unsigned short)fminf(rintf(visible * {VISIBLE_UNITS}.f), {VISIBLE_UNITS}.f) : {UNSEEN}",
        "microdecon_compact_visibility",
    )

    def cg_kernels(step_type: str, inverse_type: str):
        """Conjugate-gradient RL's kernels for step buffers (RL's update, the direction) of
        ``step_type`` ("uint16": bfloat16 bits, as above; or "float32") and a normalization of
        ``inverse_type`` ("float32": ``1 / H^T 1``; "uint16": ``compact_visibility``'s)."""
        load, keep = _bfloat16_code(step_type)
        name = f"microdecon_cg_{step_type}_{inverse_type}"
        c_inverse = "unsigned short" if inverse_type == "uint16" else "float"
        # RL's relative update w and the gradient g from the correction c and the normalization:
        # 1 / H^T 1 in float32, or H^T 1 in units of 1 / VISIBLE_UNITS (compact_visibility)
        seen = f"inv > {UNSEEN}" if inverse_type == "uint16" else "inv > 0"
        if inverse_type == "uint16":
            terms = (
                f"float v = (float)inv * {1 / VISIBLE_UNITS:.10e}f; bool seen = {seen};"
                " float w = seen ? c / v - 1.f : 0.f; double g = seen ? (double)c - (double)v : 0.0;"
            )
        else:
            terms = (
                "bool seen = inv > 0.f; float w = seen ? c * inv - 1.f : 0.f;"
                " double g = seen ? (double)w / (double)inv : 0.0;"
            )
        # <grad, u> and <grad, u_prev> in one pass, as one complex sum (see dot_and_square)
        gradient = cupy.ReductionKernel(
            f"float32 c, float32 x, {inverse_type} inv, {step_type} prev, bool has_prev",
            "complex128 y",
            f"{name}_terms(c, x, inv, {load.format('prev')}, has_prev)",
            "a + b",
            "y = a",
            "complex<double>(0, 0)",
            f"{name}_gradient",
            preamble=f"""
            __device__ complex<double> {name}_terms(float c, float x, {c_inverse} inv, float prev,
                                                    bool has_prev) {{
                {terms}
                return complex<double>(g * (double)(w * x), has_prev ? g * (double)prev : 0.0);
            }}
            """,
        )
        store = cupy.ElementwiseKernel(
            f"float32 c, float32 x, {inverse_type} inv",
            f"{step_type} update",
            f"{terms} update = {keep.format('w * x')};",
            f"{name}_store",
        )
        # d <- u + beta d (fresh: u), stored; the transform's input gets the stored values
        direction = cupy.ElementwiseKernel(
            f"{step_type} update, float32 beta, bool fresh",
            f"{step_type} d, float32 stage",
            f"float v = {load.format('update')}; if (!fresh) v += beta * {load.format('d')};"
            f" d = {keep.format('v')}; stage = {load.format('d')};",
            f"{name}_direction",
        )
        advance = cupy.ElementwiseKernel(
            f"{step_type} d, float32 length, {inverse_type} inv, float32 floor_value",
            "float32 x",
            f"float v = x + length * {load.format('d')}; v = v > floor_value ? v : floor_value;"
            f" x = {seen} ? v : 0.f",
            f"{name}_advance",
        )
        # what the advance's clip at the floor will add, and the step's size (before it runs)
        clip_sums = cupy.ReductionKernel(
            f"float32 x, {step_type} d, float32 length, {inverse_type} inv, float32 floor_value",
            "complex128 y",
            f"{name}_clip(x, {load.format('d')}, length, {seen}, floor_value)",
            "a + b",
            "y = a",
            "complex<double>(0, 0)",
            f"{name}_clip_sums",
            preamble=f"""
            __device__ complex<double> {name}_clip(float x, float d, float length, bool seen,
                                                   float floor_value) {{
                if (!seen) return complex<double>(0, 0);
                float step = length * d;
                float v = x + step;
                return complex<double>(v < floor_value ? (double)(floor_value - v) : 0.0, fabs((double)step));
            }}
            """,
        )
        return gradient, store, direction, advance, clip_sums

    cg_by_types = {
        (np.dtype(step), np.dtype(inverse)): cg_kernels(np.dtype(step).name, np.dtype(inverse).name)
        for step in (np.uint16, np.float32)
        for inverse in (np.uint16, np.float32)
    }
    # at t = length: sum(y t) and sum(y t^2), with t = step / q; the ``opening`` (first) pass
    # also asks for sum(y t^3) and sum(step). One complex sum each (see dot_and_square)
    line_terms = cupy.ReductionKernel(
        "I image, T model, T step, T background, T floor_value, T image_scale, T length, bool opening",
        "complex128 y",
        "microdecon_line_terms(image, model, step, background, floor_value, image_scale, length, opening)",
        "a + b",
        "y = a",
        "complex<double>(0, 0)",
        "microdecon_poisson_line",
        preamble="""
        template <typename I, typename T>
        __device__ complex<double> microdecon_line_terms(I image, T model, T step, T background,
                                                          T floor_value, T image_scale, T length,
                                                          bool opening) {
            T y = (T)image * image_scale; y = y > (T)0 ? y : (T)0;
            T m = model + background; m = m > floor_value ? m : floor_value;
            T q = m + length * step; q = q > floor_value ? q : floor_value;
            double t = (double)step / (double)q;
            if (opening) return complex<double>((double)y * t * t * t, (double)step);
            return complex<double>((double)y * t, (double)y * t * t);
        }
        """,
    )
    line_bound = cupy.ReductionKernel(
        "T model, T step, T background, T floor_value",
        "float64 y",
        "microdecon_line_bound(model, step, background, floor_value)",
        "min(a, b)",
        "y = a",
        "1e300",
        "microdecon_line_bound",
        preamble="""
        template <typename T>
        __device__ double microdecon_line_bound(T model, T step, T background, T floor_value) {
            T m = model + background; m = m > floor_value ? m : floor_value;
            return step < (T)0 ? (double)m / -(double)step : 1e300;
        }
        """,
    )
    model_ratio = cupy.ElementwiseKernel(
        "I image, T length, T background, T floor_value, T image_scale",
        "T model, T step",
        "model = model + length * step; T y = (T)image * image_scale; y = y > (T)0 ? y : (T)0;"
        " T d = model + background; step = y / (d > floor_value ? d : floor_value)",
        "microdecon_cg_model_ratio",
    )
    linear = cupy.ElementwiseKernel(
        "T keep, T add, T plus, T minus",
        "T target",
        "target = (keep == (T)0 ? (T)0 : keep * target) + add * plus - minus",
        "microdecon_combine",
    )
    divergence = cupy.ReductionKernel(
        "I image, T blurred, T background, T floor_value, T image_scale",
        "float64 total",
        "microdecon_divergence_term(image, blurred, background, floor_value, image_scale)",
        "a + b",
        "total = a",
        "0",
        "microdecon_i_divergence",
        preamble="""
        template <typename I, typename T>
        __device__ double microdecon_divergence_term(I image, T blurred, T background, T floor_value,
                                                     T image_scale) {
            T y = (T)image * image_scale; y = y > (T)0 ? y : (T)0;
            T m = blurred + background; m = m > floor_value ? m : floor_value;
            T log_term = y > (T)0 ? y * log(y / m) : (T)0;
            return (double)log_term - (double)y + (double)m;
        }
        """,
    )
    mul_conj = cupy.ElementwiseKernel(
        "C otf", "C spectrum", "spectrum = spectrum * conj(otf)", "microdecon_multiply_conj"
    )

    def rl_ratio(image, blurred, background, floor, image_scale=1.0, clip_image=True):
        return ratio(image, background, floor, cupy.float32(image_scale), blurred)  # the clip is free here

    def rl_update(estimate, correction, normalization, out, also=None):
        if normalization is None:
            update(estimate, correction, out)
        else:
            update_normalized(estimate, correction, normalization, out)
        if also is not None:
            also[...] = out
        return out

    def predict(current, step, alpha, out):
        has_step = step is not None
        placeholder = step if has_step else cupy.zeros(1, cupy.uint16)  # not read when has_step is False
        predict_kernel = by_step_type[placeholder.dtype][0]
        return predict_kernel(current, placeholder, cupy.float32(alpha), has_step, out)

    def rl_accelerated_update(current, step, alpha, correction, normalization, update_prev, have_prev):
        _, accelerated, dot_and_square, store = by_step_type[step.dtype]
        factor = normalization if normalization is not None else cupy.float32(1)
        accelerated(cupy.float32(alpha), have_prev, factor, current, step, correction)
        cross = norm = 0.0
        if have_prev:
            both = _sum_by_rows(dot_and_square, correction, update_prev)
            cross, norm = both.real, both.imag
        store(correction, update_prev)
        return cross, norm

    def _inverse(normalization):
        return normalization if normalization is not None else cupy.float32(1)

    def compact_visibility(visible, least):
        return compact(visible, cupy.float32(least))

    def cg_gradient(correction, estimate, normalization, update, has_prev):
        inverse = _inverse(normalization)
        gradient, store, *_ = cg_by_types[update.dtype, inverse.dtype]
        both = _sum_by_rows(gradient, correction, estimate, inverse, update, bool(has_prev))
        store(correction, estimate, inverse, update)  # after the sums: they read the last
        return both.real, both.imag

    def cg_direction(update, direction, beta, fresh, stage):
        make = cg_by_types[update.dtype, np.dtype(np.float32)][2]
        make(update, cupy.float32(beta), bool(fresh), direction, stage)
        return stage

    def poisson_line(image, model, step, background, floor, image_scale, length, first_pass, clip_image=True):
        floor, scale = cupy.float32(floor), cupy.float32(image_scale)
        args = (image, model, step, background, floor, scale, cupy.float32(length))
        terms = _sum_by_rows(line_terms, *args, False, to_host=False)
        values = [terms.real, terms.imag]
        if first_pass:
            opening = _sum_by_rows(line_terms, *args, True, to_host=False)
            values += [opening.real, opening.imag]
            values.append(
                _sum_by_rows(line_bound, model, step, background, floor, combine="min", to_host=False)
            )
        first, second, *rest = (float(v) for v in cupy.stack(values).get())  # one wait
        if not rest:
            return first, second, 0.0, 0.0, math.inf
        third, total, bound = rest
        return first, second, third, total, math.inf if bound >= 1e299 else bound

    def cg_advance(estimate, direction, length, normalization, floor, measure=True):
        inverse = _inverse(normalization)
        *_, advance, clip_sums = cg_by_types[direction.dtype, inverse.dtype]
        scalars = (cupy.float32(length), inverse, cupy.float32(floor))
        sums = _sum_by_rows(clip_sums, estimate, direction, *scalars) if measure else 0j
        advance(direction, *scalars, estimate)
        return sums.real, sums.imag

    def cg_model_ratio(image, model, step, length, background, floor, image_scale=1.0, clip_image=True):
        scalars = (cupy.float32(length), background, cupy.float32(floor), cupy.float32(image_scale))
        model_ratio(image, *scalars, model, step)
        return step

    def combine(out, keep, add, plus, minus=None):
        subtracted = minus if minus is not None else cupy.float32(0)
        return linear(cupy.float32(keep), cupy.float32(add), plus, subtracted, out)

    def i_divergence(image, blurred, background, floor, image_scale=1.0):
        scalars = (cupy.float32(floor), cupy.float32(image_scale))
        return _sum_by_rows(divergence, image, blurred, background, *scalars).real

    def multiply_spectrum(spectrum, otf, conjugate):
        if conjugate and otf.dtype.kind == "c":
            return mul_conj(otf, spectrum)
        spectrum *= otf
        return spectrum

    def copy(destination, source):
        destination[...] = source
        return destination

    kernels = locals()
    return {name: kernels[name] for name in KERNEL_NAMES}


# --------------------------------------------------------------------------------------------
# The backend object
# --------------------------------------------------------------------------------------------
class Backend:
    """Array module, FFT plans and fused kernels of one device.

    Attributes
    ----------
    name : {"cpu", "gpu"}
    xp : module
        ``numpy`` or ``cupy``.
    device_id : int or None
        The CUDA device for ``"gpu"``.
    fft_library : str
        ``"pocketfft"`` (scipy.fft), ``"fftw"`` (pyFFTW) or ``"cufft"``.

    Examples
    --------
    >>> be = get_backend(device="cpu")
    >>> be.name, be.xp.__name__
    ('cpu', 'numpy')
    """

    def __init__(self, name: str, device_id: int | None = None, fft_library: str | None = None):
        self.name = name
        self.device_id = device_id
        if name == "gpu":
            cupy = _cupy()
            self.xp = cupy
            self._fft_module = importlib.import_module("cupyx.scipy.fft")
            self.fft_library = "cufft"
            kernels = _cupy_kernels(cupy)
        else:
            self.xp = np
            if fft_library is None:
                fft_library = "fftw" if _pyfftw() is not None else "pocketfft"
            self.fft_library = fft_library
            self._fft_module = importlib.import_module("scipy.fft")
            self._slabs = _Slabs()
            kernels = _numpy_kernels(self._slabs)
        for kernel_name, kernel in kernels.items():
            setattr(self, kernel_name, kernel)

    def __repr__(self) -> str:
        where = f"gpu:{self.device_id}" if self.name == "gpu" else "cpu"
        return f"Backend({where}, fft={self.fft_library})"

    # ---- device context -------------------------------------------------------------------
    def activate(self):
        """Context manager that makes this backend's GPU current (a no-op on the CPU)."""
        if self.name == "gpu":
            return self.xp.cuda.Device(self.device_id)
        import contextlib

        return contextlib.nullcontext()

    # ---- moving data ----------------------------------------------------------------------
    def asarray(self, array: Any, dtype: Any = np.float32):
        """A ``dtype`` array on this device (``dtype=None``: the input's own); copies only when the
        input is elsewhere or of another type."""
        if self.name == "gpu":
            return self.xp.asarray(array, dtype=dtype)
        if is_device_array(array):
            array = array.get()
        return np.asarray(array, dtype=dtype)

    def to_host(self, array: Any) -> np.ndarray:
        """The array as NumPy (one device-to-host copy on the GPU)."""
        return array.get() if is_device_array(array) else np.asarray(array)

    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32):
        if self.name == "cpu" and self.fft_library == "fftw":
            return _pyfftw().empty_aligned(shape, dtype=dtype)  # SIMD-aligned: FFTW copies nothing
        return self.xp.empty(shape, dtype=dtype)

    def synchronize(self) -> None:
        if self.name == "gpu":
            self.xp.cuda.Device(self.device_id).synchronize()

    def free_memory(self) -> int:
        """Bytes this device can still give: GPU free memory plus CuPy's pool, or available RAM."""
        if self.name == "gpu":
            with self.activate():
                free, _total = self.xp.cuda.runtime.memGetInfo()
                pool = self.xp.get_default_memory_pool()
                return int(free + pool.free_bytes())
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:  # pragma: no cover - not Linux
            pass
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))

    # ---- FFT ------------------------------------------------------------------------------
    def fft_plan(self, shape: tuple[int, ...]):
        """A real FFT plan for ``shape``, with buffers of its own.

        ``plan.forward(x)`` gives the half spectrum (``rfftn``), ``plan.inverse(spectrum)`` the
        real array; both are unnormalized, so an inverse after a forward multiplies by
        ``prod(shape)``. Each caller gets its own plan, so threads never share buffers and the
        memory goes when the caller lets go. Making one is cheap after the first of a shape:
        FFTW keeps what it measured (its wisdom) for the process, and cuFFT and scipy cache theirs.
        """
        shape = tuple(int(n) for n in shape)
        if self.fft_library == "fftw":
            return _FFTWPlan(_pyfftw(), shape, threads=cpu_count())
        if self.name == "gpu":
            return _ScipyStylePlan(self._fft_module, shape, workers=None)
        if shape[-1] % 2 == 0:
            return _InPlaceRealPlan(self._fft_module, shape, cpu_count(), self._slabs)
        return _ScipyStylePlan(self._fft_module, shape, workers=cpu_count(), by_stages=True)

    def next_fast_len(self, n: int, *, even: bool = False) -> int:
        """Smallest length >= n that the FFT library transforms fast (and even, if asked).

        Real-input lengths of 2^a 3^b 5^c: fast in pocketfft, FFTW and cuFFT alike. An even last
        axis lets the CPU transform in place.
        """
        import scipy.fft

        length = int(scipy.fft.next_fast_len(int(n), real=True))
        while even and length % 2:
            length = int(scipy.fft.next_fast_len(length + 1, real=True))
        return length


_DEVICE_HELP = "device must be 'auto', 'cpu', 'gpu' or 'gpu:N' (N a CUDA device number)"


_CPU_FFT = {"library": None}  # None: FFTW when pyFFTW is installed, else scipy.fft


def set_cpu_fft(library: str = "auto") -> None:
    """Choose the CPU FFT library: "auto" (pyFFTW when installed), "fftw" or "pocketfft" (scipy.fft).

    Examples
    --------
    >>> set_cpu_fft("pocketfft"); get_backend(device="cpu").fft_library
    'pocketfft'
    >>> set_cpu_fft("auto")
    """
    if library not in ("auto", "fftw", "pocketfft"):
        raise ValueError(f"library must be 'auto', 'fftw' or 'pocketfft', got {library!r}")
    if library == "fftw" and _pyfftw() is None:
        raise ValueError("library='fftw' needs pyFFTW: pip install microdecon[fftw]")
    _CPU_FFT["library"] = None if library == "auto" else library
    _backend_for.cache_clear()


@functools.cache
def _backend_for(name: str, device_id: int | None) -> Backend:
    return Backend(name, device_id, fft_library=_CPU_FFT["library"] if name == "cpu" else None)


def get_backend(*arrays: Any, device: str = "auto") -> Backend:
    """Choose the device that will run the work and return its :class:`Backend`.

    Parameters
    ----------
    *arrays : array_like
        The inputs. A CuPy array among them makes ``"auto"`` pick its GPU.
    device : {"auto", "cpu", "gpu", "gpu:N"}
        ``"auto"`` uses a GPU when CuPy and a GPU are present (or the inputs live on one), else
        the CPU; it never fails for lack of a GPU. ``"gpu"`` insists on one and raises when
        there is none.

    Returns
    -------
    Backend

    Examples
    --------
    >>> import numpy as np
    >>> get_backend(np.ones(3), device="cpu").name
    'cpu'
    """
    if not isinstance(device, str):
        raise TypeError(f"{_DEVICE_HELP}; got {device!r} of type {type(device).__name__}")
    spec = device.strip().lower()
    device_arrays = [a for a in arrays if is_device_array(a)]
    if spec == "cpu":
        return _backend_for("cpu", None)
    if spec == "auto":
        if device_arrays:
            return _backend_for("gpu", int(device_arrays[0].device.id))
        if _cupy() is not None:
            return _backend_for("gpu", int(_cupy().cuda.Device().id))
        return _backend_for("cpu", None)
    if spec in ("gpu", "cuda") or spec.startswith(("gpu:", "cuda:")):
        device_id: int | None = None
        if ":" in spec:
            try:
                device_id = int(spec.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"{_DEVICE_HELP}; got {device!r}") from None
        cupy = _cupy()
        if cupy is None:
            raise ValueError(
                f"device={device!r} asks for a GPU, but CuPy with a CUDA GPU is not available here; "
                "install microdecon[cuda12] or microdecon[cuda13], or use device='auto' or 'cpu'"
            )
        count = cupy.cuda.runtime.getDeviceCount()
        if device_id is None:
            device_id = int(device_arrays[0].device.id) if device_arrays else int(cupy.cuda.Device().id)
        if not 0 <= device_id < count:
            raise ValueError(f"device={device!r}: there are {count} GPU(s), numbered 0 to {count - 1}")
        return _backend_for("gpu", device_id)
    raise ValueError(f"{_DEVICE_HELP}; got {device!r}")


def return_like(result: Any, template: Any, backend: Backend):
    """Give the result back in the kind of array the caller passed: NumPy in, NumPy out; CuPy in, CuPy out."""
    if is_device_array(template):
        if backend.name == "gpu":
            return result
        cupy = importlib.import_module("cupy")
        with cupy.cuda.Device(template.device.id):
            return cupy.asarray(result)
    return backend.to_host(result)
