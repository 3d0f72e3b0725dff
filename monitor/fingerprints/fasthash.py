"""The fast path's hashes of a greyscale image in one compiled call.

The four 64-bit hashes (dHash, pHash and their mirrors) need two tiny grids of
the picture (9x8 for dHash, 32x32 for pHash), their DCT, medians and
comparisons; the 256-bit verification hashes (:data:`FINE_WORDS`) a 17x16
grid and more of the same DCT: a dozen numpy and Pillow calls whose Python
overhead costs more than their arithmetic at these sizes. Here it is one numba
call on the decoded array.

The grids use Pillow's Lanczos-3 resampling (libImaging/Resample.c: double
weights normalised per output pixel, rounded to 22-bit fixed point, 8-bit
rounding and clipping after each pass), horizontal pass first. Each pass is
identical to Pillow's; Pillow 13 picks the pass order from the image's shape, so
a 2-D result can differ from ``Image.resize`` by one grey level in a few pixels.
That is why the exact path (``fast=False``, bit-identical to imagehash) keeps
Pillow, and this one is measured like any fast path: its drift against the
exact path (bench/fingerprint.py, tests/test_fingerprint.py).

Pure and I/O-free; compiled once (``cache=True``) and warmed at start-up.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

PRECISION_BITS = 32 - 8 - 2  # Resample.c: room for 8-bit values times weights
HALF = float(1 << (PRECISION_BITS - 1))
INV_ONE = 1.0 / (1 << PRECISION_BITS)
LANCZOS_SUPPORT = 3.0


@njit(cache=True, nogil=True)
def _lanczos(x):
    # Resample.c's lanczos_filter: sinc(x) * sinc(x / 3) on [-3, 3).
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3.0)
    return 0.0


@njit(cache=True, nogil=True)
def _sinc(x):
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


@njit(cache=True, nogil=True)
def _weights(in_size, out_size):
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    kk = np.zeros((out_size, ksize), np.int32)  # C's int, as in Resample.c
    one = float(1 << PRECISION_BITS)
    w = np.empty(ksize)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates, as int() does
        xmax = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for x in range(xmax):
            w[x] = _lanczos((x + xmin - center + 0.5) * ss)
            total += w[x]  # summed in order, as the C loop does
        for x in range(xmax):
            v = w[x] / total if total != 0.0 else w[x]
            kk[xx, x] = int(-0.5 + v * one) if v < 0 else int(0.5 + v * one)
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, kk


@functools.lru_cache(maxsize=4096)
def weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(bounds[out, 2] = first input, count), fixed-point weights[out, ksize] for
    one axis: Resample.c's precompute_coeffs + normalize_coeffs_8bpc (compiled:
    crops of every size reach here, and a Python loop cost more than hashing)."""
    bounds, kk = _weights(in_size, out_size)
    bounds.setflags(write=False)
    kk.setflags(write=False)
    return bounds, kk


@njit(cache=True, nogil=True)
def _dense(bounds, kk, in_size):
    m = np.zeros((in_size, bounds.shape[0]))
    for xx in range(bounds.shape[0]):
        for x in range(bounds[xx, 1]):
            m[bounds[xx, 0] + x, xx] = kk[xx, x]
    return m


@functools.lru_cache(maxsize=4096)
def dense_weights(in_size: int, out_size: int) -> np.ndarray:
    """:func:`weights` as a dense float64 matrix [in_size, out_size] (zeros
    outside each window), so a pass is one BLAS product: the products and sums
    of 8-bit values and 22-bit weights are integers far below 2**53, so float64
    holds them exactly and the result equals C's integer loop."""
    m = _dense(*weights(in_size, out_size), in_size)
    m.setflags(write=False)
    return m


@njit(cache=True, nogil=True)
def _round_clip8(t):
    """Resample.c's clip8 in place: add half, shift out the fraction, clip to 0..255."""
    flat = t.ravel()
    for i in range(flat.size):
        v = np.floor((flat[i] + HALF) * INV_ONE)  # exact: a power-of-two scale
        flat[i] = min(max(v, 0.0), 255.0)
    return t


@njit(cache=True, nogil=True)
def _resample(src, wh, wv):
    """Lanczos downscale of a float64 picture: horizontal pass, then vertical
    (Resample.c's order); a pass is skipped where that side keeps its size."""
    t = src
    if wh.shape[0] != wh.shape[1]:
        t = _round_clip8(np.ascontiguousarray(t) @ wh)
    if wv.shape[0] != wv.shape[1]:
        t = _round_clip8(np.ascontiguousarray(wv.T) @ t)
    return t


# scipy.fftpack.dct (type II, unnormalised) as a matrix: rows k = 0..15 of
# 2 cos(pi k (2n + 1) / 64); pHash keeps the 8x8 lowest coefficients, the
# 256-bit pHash the 16x16 lowest.
_DCT16x32 = 2.0 * np.cos(np.pi * np.arange(16)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)

# The fine (verification) hashes: a 256-bit pHash (16x16 DCT block against its
# median) and a 256-bit dHash (16 rows of 16 steps of a 17x16 grid), 4 words
# each, most significant bit first; FINE_WORDS words in all, then as many for
# the mirrored picture. Four times the bits of the 64-bit hashes at finer
# detail: unrelated pictures sit near 256 of 512 bits with a spread of ~11,
# so a candidate from the 64-bit pass is verified on evidence it was not
# found by (bench/quality.py measures the gain).
FINE_WORDS = 8


@njit(cache=True, nogil=True)
def _pack(bits):
    """64 booleans, row-major, first = most significant bit (imagehash's order)."""
    v = np.uint64(0)
    for i in range(64):
        v = (v << np.uint64(1)) | np.uint64(bits[i])
    return v


@njit(cache=True, nogil=True)
def median(values):
    """np.median of a 1-D float64 array, by a Shell sort of a copy: for the few
    hundred values it meets as fast as np.sort, and far less to compile
    (np.sort's quicksort is over a second of a cold start)."""
    s = values.copy()
    n = s.size
    for gap in (132, 57, 23, 10, 4, 1):  # Ciura's gaps
        for i in range(gap, n):
            v = s[i]
            j = i
            while j >= gap and s[j - gap] > v:
                s[j] = s[j - gap]
                j -= gap
            s[j] = v
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


@njit(cache=True, nogil=True)
def _pack_above_median(block, out, out_mirrored):
    """A square DCT block's bits (coefficient > the block's median, row-major),
    64 per word, into ``out``, and the mirrored picture's (whose odd DCT-II
    columns have the opposite sign) into ``out_mirrored``. Plain loops, and
    outputs passed as arrays: numba's slice assignment and array comparisons
    bring seconds of compile time on a cold cache (their error paths), and
    constant arguments one compiled copy per constant."""
    n = block.shape[0]
    vals = np.empty(n * n)
    for mirrored in range(2):
        dest = out_mirrored if mirrored else out
        for r in range(n):
            for c in range(n):
                vals[r * n + c] = -block[r, c] if mirrored and c % 2 == 1 else block[r, c]
        median_ = median(vals)
        for w in range(n * n // 64):
            v = np.uint64(0)
            for i in range(w * 64, (w + 1) * 64):
                v = (v << np.uint64(1)) | np.uint64(vals[i] > median_)
            dest[w] = v


@njit(cache=True, nogil=True)
def _fine_bits(grid17, dct16, out):
    """The fine hashes into out[0:8] and the mirrored picture's into out[8:16]."""
    d = np.empty(256, np.bool_)
    dm = np.empty(256, np.bool_)
    for r in range(16):
        for c in range(16):
            d[r * 16 + c] = grid17[r, c + 1] > grid17[r, c]
            dm[r * 16 + c] = grid17[r, 15 - c] > grid17[r, 16 - c]
    _pack_above_median(dct16, out[0:4], out[8:12])
    for w in range(4):
        out[4 + w] = _pack(d[w * 64:(w + 1) * 64])
        out[12 + w] = _pack(dm[w * 64:(w + 1) * 64])


@njit(cache=True, nogil=True)
def _hash_bits(grid9, dct16, grid32, out):
    """dHash, pHash, mirrored dHash, mirrored pHash into out[0:4] from the 9x8
    grid and the 16x16 low DCT block (pHash takes its 8x8 corner); returns the
    degenerate-check statistics (grid32's std, share of flat dHash steps,
    rising steps)."""
    d = np.empty(64, np.bool_)
    dm = np.empty(64, np.bool_)
    flat = 0
    rising = 0
    for r in range(8):
        for c in range(8):
            step = np.int32(grid9[r, c + 1]) - np.int32(grid9[r, c])
            d[r * 8 + c] = step > 0
            # the mirror's row is this row reversed
            dm[r * 8 + c] = grid9[r, 7 - c] > grid9[r, 8 - c]
            flat += abs(step) <= 1
            rising += step > 0
    low = np.empty((8, 8))
    for r in range(8):
        for c in range(8):
            low[r, c] = dct16[r, c]
    out[0] = _pack(d)
    _pack_above_median(low, out[1:2], out[3:4])
    out[2] = _pack(dm)
    return _std(grid32), flat / 64.0, rising


@njit(cache=True, nogil=True)
def _std(a):
    """np.std of a 2-D array (two passes, as numpy; np.std's own compile costs ~1 s)."""
    total = 0.0
    for v in a.ravel():
        total += v
    mean = total / a.size
    squares = 0.0
    for v in a.ravel():
        squares += (v - mean) * (v - mean)
    return math.sqrt(squares / a.size)


# The grids, stacked: pHash's 32x32, the fine dHash's 17x16, dHash's 9x8 (columns x rows).
GRID_COLUMNS = (32, 17, 9)
GRID_ROWS = (32, 16, 8)


@njit(cache=True, nogil=True)
def _grids(grey, h_bounds, h_weights, v_bounds, v_weights):
    """The three grids' Lanczos passes in one go, on the banded weights alone (a window
    of a few dozen pixels per output, where a dense matrix product visits every pixel).

    Each pass is written as multiply-adds of whole input lines into output lines
    (contiguous, so they vectorise; a dot product per output would be one long chain of
    dependent adds): the horizontal passes of all grids at once over the picture
    transposed, four taps per sweep; then each grid's vertical pass over the result
    transposed back. Every product and partial sum is an integer below 2**53, so the
    float64 sums are exact in any order: the grids equal the dense products' (and
    Resample.c's integer loops') bit for bit."""
    in_h, in_w = grey.shape
    columns = np.empty((in_w, in_h))
    for x in range(in_w):  # written in order, read across: the cheap way round
        dest = columns[x]
        for y in range(in_h):
            dest[y] = grey[y, x]
    outputs = h_bounds.shape[0]
    passed = np.zeros((outputs, in_h))
    for c in range(outputs):
        first, count = h_bounds[c, 0], h_bounds[c, 1]
        dest = passed[c]
        x = 0
        while x + 4 <= count:
            k0, k1, k2, k3 = h_weights[c, x], h_weights[c, x + 1], h_weights[c, x + 2], h_weights[c, x + 3]
            s0, s1, s2, s3 = columns[first + x], columns[first + x + 1], columns[first + x + 2], columns[first + x + 3]
            for y in range(in_h):
                dest[y] += (k0 * s0[y] + k1 * s1[y]) + (k2 * s2[y] + k3 * s3[y])
            x += 4
        while x < count:
            k = h_weights[c, x]
            src = columns[first + x]
            for y in range(in_h):
                dest[y] += k * src[y]
            x += 1
    _round_clip8(passed)
    lines = np.empty((in_h, outputs))
    for c in range(outputs):
        src = passed[c]
        for y in range(in_h):
            lines[y, c] = src[y]
    grid32, grid17, grid9 = np.zeros((32, 32)), np.zeros((16, 17)), np.zeros((8, 9))
    col = 0
    row = 0
    for grid in (grid32, grid17, grid9):
        rows, cols = grid.shape
        for r in range(rows):
            first, count = v_bounds[row + r, 0], v_bounds[row + r, 1]
            dest = grid[r]
            for y in range(count):
                k = v_weights[row + r, y]
                src = lines[first + y]
                for c in range(cols):
                    dest[c] += k * src[col + c]
        _round_clip8(grid)
        col += cols
        row += rows
    return grid32, grid17, grid9


def _stacked(in_size: int, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Each output size's :func:`weights` for one axis, stacked (zero-padded to one
    width), as float64. An axis that keeps its size gets identity weights: Pillow
    skips that pass, and weight one (1 << PRECISION_BITS) rounds back to the input."""
    parts = []
    for n in sizes:
        if n == in_size:
            parts.append((np.stack([np.arange(n), np.ones(n, np.int64)], axis=1),
                          np.full((n, 1), 1 << PRECISION_BITS, np.int32)))
        else:
            parts.append(weights(in_size, n))
    bounds = np.concatenate([b for b, _ in parts]).astype(np.int64)
    kk = np.zeros((len(bounds), max(k.shape[1] for _, k in parts)))
    row = 0
    for _, k in parts:
        kk[row:row + len(k), :k.shape[1]] = k
        row += len(k)
    bounds.setflags(write=False)
    kk.setflags(write=False)
    return bounds, kk


@functools.lru_cache(maxsize=1024)
def grid_weights(in_w: int, in_h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The banded weights of the three grids for a picture of this size: (bounds,
    weights) of the horizontal passes, then of the vertical ones."""
    return (*_stacked(in_w, GRID_COLUMNS), *_stacked(in_h, GRID_ROWS))


@njit(cache=True, nogil=True)
def _grids_and_hashes(grey, h_bounds, h_weights, v_bounds, v_weights, dct, out, fine):
    grid32, grid17, grid9 = _grids(grey, h_bounds, h_weights, v_bounds, v_weights)
    dct16 = dct @ grid32 @ dct.T
    _fine_bits(grid17, dct16, fine)
    return _hash_bits(grid9, dct16, grid32, out)


def hashes(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, int]:
    """The four hashes of a 2-D uint8 picture as uint64[4] (dhash, phash, their
    mirrors), the fine hashes as uint64[16] (plain, then mirrored), plus
    grid32's std, the share of flat dHash steps and the number of rising ones
    (for fingerprint.degenerate_reason)."""
    in_h, in_w = grey.shape
    if grey.flags.writeable:
        # As read-only, the type Pillow's arrays have: numba compiles one copy
        # per type, and a second one costs seconds on a cold cache.
        grey = grey.view()
        grey.setflags(write=False)
    out = np.empty(4, np.uint64)
    fine = np.empty(2 * FINE_WORDS, np.uint64)
    stats = _grids_and_hashes(grey, *grid_weights(in_w, in_h), _DCT16x32, out, fine)
    return (out, fine, *stats)


def hashes_of_grids(grid9: np.ndarray, dct16: np.ndarray, grid32: np.ndarray,
                    grid17: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, int]:
    """:func:`hashes` from grids and the 16x16 low DCT block computed elsewhere
    (the exact path's, made the way imagehash makes them)."""
    out = np.empty(4, np.uint64)
    fine = np.empty(2 * FINE_WORDS, np.uint64)
    # As float64, the dtype of the fast path's grids: one compiled version serves both.
    grid9, dct16, grid32, grid17 = (np.ascontiguousarray(a, np.float64) for a in (grid9, dct16, grid32, grid17))
    _fine_bits(grid17, dct16, fine)
    return (out, fine, *_hash_bits(grid9, dct16, grid32, out))


def lanczos(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``np.asarray(Image.fromarray(grey).resize(size, Image.LANCZOS))`` for a 2-D
    uint8 array, without Pillow. ``size`` is (width, height) as in Pillow. By dense
    matrix products: the reference the tests hold Pillow's passes and the hashes' banded
    grids (:func:`_grids`) to."""
    in_h, in_w = grey.shape
    out_w, out_h = size
    grid = _resample(grey.astype(np.float64), dense_weights(in_w, out_w), dense_weights(in_h, out_h))
    return grid.astype(np.uint8)


def warm_up() -> None:
    hashes(np.zeros((40, 36), np.uint8))
    hashes_of_grids(np.zeros((8, 9), np.uint8), np.zeros((16, 16)), np.zeros((32, 32), np.uint8),
                    np.zeros((16, 17), np.uint8))
