"""The Gram matrix of one batch on the CPU: a fixed block decomposition, one BLAS thread per block.

:func:`gram_syrk` computes the upper triangle of ``A @ A.T`` for the C x M samples of a CPU
Tensor[N, C, S] - the per-batch Gram term of the ``"cpp"`` backend - on all of
``torch.get_num_threads()`` cores, with bits that do not depend on the thread count:

- the C x C upper triangle is cut into square blocks of :data:`GRAM_BLOCK` channels (the last
  block column narrower when C is not a multiple), a decomposition fixed by the shape alone;
- each block is one BLAS call per operand - ``?syrk`` for a diagonal block, ``?gemm`` for an
  off-diagonal one - on the thread that runs it, accumulated over the operands (images, or runs
  of copied images) in their order, written straight into its place in the result;
- the blocks are spread over a pool of worker threads, largest first; which thread runs a block
  changes nothing in its bits, so 1 worker and 16 give the same matrix.

The BLAS is scipy's (``scipy.linalg.cython_blas``, the library scipy links), called through
``ctypes``, which releases the GIL for the call, so the blocks of one product run in parallel.
While a product runs, the BLAS libraries numpy/scipy load are held at one thread
(:class:`OneBlasThread`): a block is then computed the same way whatever the library's thread
setting. Products too small for blocks to pay (C at most one block, or few samples per operand)
are one ``?syrk`` call, as before.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Fewest channels per block of the block decomposition (:func:`block_edges`). The decomposition,
#: hence every bit of the product, depends on C only, never on the number of threads. 128 keeps
#: ResNet's 256-channel layers in three blocks (two cores busy).
GRAM_BLOCK = 128
#: Most block columns: wider C gets wider blocks (multiples of GRAM_BLOCK), so that the blocks
#: stay large enough for the BLAS to run near the speed of one syrk. Measured on an AVX-512 CPU,
#: one thread, ResNet-50 shapes: all blocks of C = 2048 (392 samples) cost 1.26x one syrk at
#: width 256 (8 columns) and 1.08x at 512 (4 columns); C = 512: 1.27x at 128, 1.07x at 256.
#: Four columns give ten blocks: enough for the 2-4 cores of a small machine.
GRAM_BLOCK_COLUMNS = 4
#: Fewest samples per operand (columns of a BLAS call) for which a product is cut into blocks;
#: thinner products are one syrk (the per-block call overhead would exceed their work).
BLOCK_MIN_SAMPLES = 64
#: NCHW Gram on the CPU: one product per image, in place, when planes hold at least this many
#: values per channel; below, products over (C, k*S) copies of k images (thin products are slow).
PLANE_MIN_VALUES = 32
#: Most samples (columns) of one BLAS call: its sizes are 32-bit ints.
MAX_SAMPLES = 2**30
#: Most values of the transposed copy of k images that feeds one product for short NCHW planes
#: (4 MiB float32).
COPY_VALUES = 2**20


def gram_scale(dtype: torch.dtype, maxabs: float) -> int:
    """The exponent e of the power-of-two scale ``2**-e`` applied to float32 samples before their
    product: 0 for data within ``[2**-40, 2**40]`` (``maxabs``, the largest magnitude), else the
    binary exponent of ``maxabs``, so float32 products neither overflow nor underflow. float64
    samples are never scaled."""
    if dtype == torch.float64 or maxabs == 0 or 2.0**-40 <= maxabs <= 2.0**40:
        return 0
    return math.frexp(maxabs)[1]


class OneBlasThread:
    """Context that runs the BLAS libraries numpy/scipy use (OpenBLAS in their wheels) on the
    calling thread only, restoring their thread counts after. Every product of
    :func:`gram_syrk` runs inside it: each BLAS call then computes its block on the thread that
    made it, with the same bits for any thread setting, and BLAS worker threads never spin
    against torch's OpenMP threads between the forward's layers (measured on a loaded 2-core
    machine: 2 BLAS threads made ResNet-50's syrk calls 1.5-5x slower than 1). The parallelism
    is icprune's own (blocks over threads). The controllers are found once."""

    _libs: list | None = None

    def __enter__(self) -> None:
        if OneBlasThread._libs is None:
            from scipy.linalg import cython_blas  # noqa: F401 - load its BLAS before the scan
            from threadpoolctl import ThreadpoolController

            OneBlasThread._libs = ThreadpoolController().select(user_api="blas").lib_controllers
        self._saved = [(lib, lib.num_threads) for lib in OneBlasThread._libs]
        for lib, threads in self._saved:
            if threads != 1:
                lib.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        for lib, threads in self._saved:
            if threads != 1:
                lib.set_num_threads(threads)


class Blas:
    """``?gemm`` and ``?syrk`` of one precision from ``scipy.linalg.cython_blas``, callable from
    any thread without the GIL (ctypes releases it). Matrices are column-major (Fortran) and
    given by address and leading dimension, so a block of a larger matrix is a pointer offset.
    The scalar arguments are passed by reference to ctypes objects built once per value
    (:func:`_ref`; the BLAS only reads them), so a call costs little more than the product.

    Args:
        prefix: ``"s"`` (float32) or ``"d"`` (float64).
    """

    def __init__(self, prefix: str) -> None:
        from scipy.linalg import cython_blas

        self.real = ctypes.c_float if prefix == "s" else ctypes.c_double
        self.itemsize = ctypes.sizeof(self.real)
        p = ctypes.POINTER
        char, integer, real, addr = p(ctypes.c_char), p(ctypes.c_int), p(self.real), ctypes.c_void_p
        gemm = (char, char, integer, integer, integer, real, addr, integer, addr, integer, real)
        self._gemm = _capsule_function(cython_blas, prefix + "gemm", (*gemm, addr, integer))
        syrk = (char, char, integer, integer, real, addr, integer, real, addr, integer)
        self._syrk = _capsule_function(cython_blas, prefix + "syrk", syrk)

    def gemm(self, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc) -> None:
        """C[m, n] = op(A) @ op(B) + beta * C (``ta``/``tb``: ``b"N"`` or ``b"T"``; a, b, c:
        addresses; ld*: leading dimensions, in elements)."""
        i, r, ch = ctypes.c_int, self.real, ctypes.c_char
        self._gemm(
            _ref(ch, ta), _ref(ch, tb), _ref(i, m), _ref(i, n), _ref(i, k), _ref(r, 1.0),
            a, _ref(i, lda), b, _ref(i, ldb), _ref(r, beta), c, _ref(i, ldc),
        )  # fmt: skip

    def syrk(self, trans, n, k, a, lda, beta, c, ldc) -> None:
        """Upper triangle of C[n, n] = op(A) @ op(A).T + beta * C (``trans`` ``b"N"``: A is
        n x k; ``b"T"``: A is k x n); the strict lower triangle of C is not touched."""
        i, r, ch = ctypes.c_int, self.real, ctypes.c_char
        self._syrk(
            _ref(ch, b"U"), _ref(ch, trans), _ref(i, n), _ref(i, k), _ref(r, 1.0),
            a, _ref(i, lda), _ref(r, beta), c, _ref(i, ldc),
        )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _ref(kind, value):
    """A by-reference argument holding ``kind(value)`` (a ctypes char, int or real), built once
    per value and shared: the BLAS reads its scalar arguments and never writes them."""
    return ctypes.byref(kind(value))


def _capsule_function(module, name: str, argtypes: tuple):
    """The C function ``name`` that a Cython module exports in ``__pyx_capi__``, as a ctypes
    function (no result) taking ``argtypes``."""
    capsule = module.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *argtypes)(address)


_BLAS: dict[str, Blas] = {}
_BLAS_LOCK = threading.Lock()


def blas_for(dtype: np.dtype) -> Blas:
    """The :class:`Blas` of ``dtype`` (float32 or float64), built once."""
    prefix = "d" if dtype == np.float64 else "s"
    with _BLAS_LOCK:
        if prefix not in _BLAS:
            _BLAS[prefix] = Blas(prefix)
        return _BLAS[prefix]


class _Pool:
    """The helper threads the blocks run on besides the caller's: one pool per process (rebuilt
    after a fork, whose child has no threads) and size."""

    executor: ThreadPoolExecutor | None = None
    key: tuple[int, int] | None = None
    lock = threading.Lock()

    @classmethod
    def get(cls, workers: int) -> ThreadPoolExecutor:
        key = (os.getpid(), workers)
        with cls.lock:
            if cls.key != key:
                if cls.executor is not None and cls.key[0] == key[0]:
                    cls.executor.shutdown(wait=False)
                cls.executor = ThreadPoolExecutor(workers, thread_name_prefix="icprune-gram")
                cls.key = key
            return cls.executor


def block_edges(c: int) -> list[int]:
    """Channel boundaries of the block decomposition of a C x C Gram matrix: ``[0, B, 2B, ...,
    C]`` (the last block narrower when B does not divide C): B is the smallest multiple of
    :data:`GRAM_BLOCK` that cuts C into at most :data:`GRAM_BLOCK_COLUMNS` block columns."""
    width = -(-c // (GRAM_BLOCK * GRAM_BLOCK_COLUMNS)) * GRAM_BLOCK
    return [*range(0, c, width), c]


def gram_syrk(
    x3: torch.Tensor, maxabs: float, workers: int | None = None
) -> tuple[np.ndarray, int]:
    """Upper triangle of ``A @ A.T`` for the C x (N*S) samples of a CPU Tensor[N, C, S], by BLAS
    syrk/gemm blocks (module docstring) on the memory as it is where the layout allows.

    float32 samples (and float16/bfloat16 ones, converted to float32 once) are multiplied in
    float32, float64 ones in float64. Channels-last memory is read in place (the N*S x C rows),
    so are NCHW planes of at least ``PLANE_MIN_VALUES * C`` values (one product per image,
    accumulated in image order); shorter NCHW planes are copied to C x (k*S) for runs of k
    images (at most ``COPY_VALUES`` values each, accumulated in order). Data outside
    ``[2**-40, 2**40]`` is scaled by ``2**-e`` first (:func:`gram_scale`, a scaled copy). The
    bits of the product depend on the shape, strides and data only - not on ``workers`` nor on
    any thread setting; they may differ between BLAS builds and CPUs (docs/method.md).

    Args:
        x3: Tensor[N, C, S] on the CPU, finite.
        maxabs: the largest magnitude in ``x3``.
        workers: threads the blocks are spread over (default ``torch.get_num_threads()``).

    Returns:
        ``(g, two_e)``: ndarray[C, C] in column-major (Fortran) order whose upper triangle
        (``g[i, j]``, i <= j) holds the product - the strict lower triangle is unspecified,
        never read - and the exponent that undoes the scale: the Gram matrix is ``g * 2**two_e``
        there.
    """
    dtype = torch.float64 if x3.dtype == torch.float64 else torch.float32
    e = gram_scale(dtype, maxabs)
    x3 = x3.to(dtype)
    if e:
        x3 = torch.ldexp(x3, torch.tensor(-e, dtype=dtype))
    workers = torch.get_num_threads() if workers is None else workers
    with OneBlasThread():
        return _product(x3, max(1, workers)), 2 * e


def _operand_groups(x3: torch.Tensor):
    """The samples of a Tensor[N, C, S] as groups of 2-D operands whose products sum to the
    Gram matrix, in order: each operand an ndarray[C, K] with unit stride along one axis, given
    as its :func:`_operand` tuple. Groups are produced one at a time (a copy lives only while
    its group is multiplied)."""
    n, c, s = x3.shape
    if x3.stride(1) == 1 and x3.stride(0) == s * c:  # channels last: samples are rows (N*S, C)
        rows = x3.numpy().transpose(0, 2, 1).reshape(n * s, c)  # a view
        # Runs of rows short enough for the BLAS's 32-bit sizes, accumulated in order.
        yield [_operand(rows[i : i + MAX_SAMPLES].T) for i in range(0, n * s, MAX_SAMPLES)]
        return
    if s >= PLANE_MIN_VALUES * c and x3.stride(2) == 1:  # long planes: one product per image
        if x3.stride(1) >= s:  # (C, S) planes with contiguous rows, read in place
            base, step = x3.data_ptr(), x3.stride(0) * x3.element_size()
            yield [(base + i * step, s, x3.stride(1), True, x3) for i in range(n)]
        else:
            yield [_operand(plane) for plane in x3.numpy()]
        return
    # Short planes (late layers) or odd strides: (C, k*S) copies of k images at a time (at most
    # COPY_VALUES values, so the copy stays small next to the statistics). numpy copies: torch's
    # transposing copy was 10-20x slower here (OpenMP threads on a loaded machine).
    k = max(1, COPY_VALUES // max(1, c * s))
    a = x3.numpy()
    for i in range(0, n, k):
        yield [_operand(np.ascontiguousarray(a[i : i + k].transpose(1, 0, 2)).reshape(c, -1))]


def _operand(a: np.ndarray) -> tuple[int, int, int, bool, np.ndarray]:
    """``(address, K, ld, rows, a)`` of ndarray[C, K] ``a`` as a BLAS reads it: in place when it
    can - unit stride along one axis, a leading dimension that covers the other - else from a
    contiguous copy. ``rows`` when the rows are contiguous (then ``ld`` is the row stride, in
    elements), else the columns are (``ld`` the column stride); the returned ``a`` (the copy,
    if one was made) keeps the memory alive while it is used."""
    size, (c, k) = a.itemsize, a.shape
    s0, s1 = a.strides
    if s1 == size and s0 % size == 0 and s0 >= max(1, k) * size:
        return a.ctypes.data, k, s0 // size, True, a
    if s0 == size and s1 % size == 0 and s1 >= max(1, c) * size:
        return a.ctypes.data, k, s1 // size, False, a
    a = np.ascontiguousarray(a)
    return a.ctypes.data, k, max(1, k), True, a


def _product(x3: torch.Tensor, workers: int) -> np.ndarray:
    """The product of :func:`gram_syrk` for float32/float64 ``x3``, its blocks on ``workers``."""
    c = x3.shape[1]
    dtype = np.float64 if x3.dtype == torch.float64 else np.float32
    blas = blas_for(dtype)
    out = np.empty((c, c), dtype=dtype, order="F")
    edges = block_edges(c)
    pairs = [(i, j) for j in range(len(edges) - 1) for i in range(j + 1)]
    # Off-diagonal blocks first (a gemm is twice a syrk's work), then by size: good packing.
    pairs.sort(key=lambda p: (p[0] == p[1], -(edges[p[0] + 1] - edges[p[0]])))
    first = True
    for group in _operand_groups(x3):
        blocked = len(pairs) > 1 and min(op[1] for op in group) >= BLOCK_MIN_SAMPLES
        tasks = pairs if blocked else [(0, 0)]
        bounds = edges if blocked else [0, c]

        def job(pair, group=group, bounds=bounds, first=first):
            _block(blas, group, out, bounds, *pair, first)

        run_parallel(tasks, job, workers)
        first = False
    return out


def run_parallel(tasks: list, job, workers: int) -> None:
    """``job(task)`` for every task, on ``workers`` threads (the caller's and ``workers - 1`` of
    the pool), each taking the next task in list order when it is free; returns when all are
    done (also when one raises: no thread is left writing)."""
    if workers == 1 or len(tasks) == 1:
        for task in tasks:
            job(task)
        return
    pending = iter(tasks)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                task = next(pending, None)
            if task is None:
                return
            job(task)

    helpers = min(workers, len(tasks)) - 1
    futures = [_Pool.get(workers - 1).submit(worker) for _ in range(helpers)]
    try:
        worker()
    finally:
        for future in futures:
            future.result()


def _block(blas: Blas, group, out: np.ndarray, edges, i: int, j: int, first: bool) -> None:
    """Add block (i, j), i <= j, of the product of every operand of ``group`` (:func:`_operand`
    tuples, in order) into ``out`` (column-major C x C; the first operand of all overwrites it:
    beta = 0)."""
    r0, r1, c0, c1 = edges[i], edges[i + 1], edges[j], edges[j + 1]
    size = blas.itemsize
    ldc = out.shape[0]
    dst = out.ctypes.data + (r0 + c0 * ldc) * size
    for address, k, lda, rows_contiguous, _ in group:
        beta = 0.0 if first else 1.0
        first = False
        if rows_contiguous:  # rows of A contiguous: A.T is k x C column-major, ld = row stride
            trans = (b"T", b"N")
            rows, cols = address + r0 * lda * size, address + c0 * lda * size
        else:  # columns contiguous: A is C x k column-major, ld = the column stride
            trans = (b"N", b"T")
            rows, cols = address + r0 * size, address + c0 * size
        if i == j:
            blas.syrk(trans[0], r1 - r0, k, rows, lda, beta, dst, ldc)
        else:
            blas.gemm(*trans, r1 - r0, c1 - c0, k, rows, lda, cols, lda, beta, dst, ldc)
