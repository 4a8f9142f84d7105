"""Gram matrices kept as one packed triangle: half the memory of a full matrix, symmetric by
construction.

A symmetric C x C matrix is stored as the Tensor[C (C + 1) / 2] of its lower triangle, row by
row: entry (j, i), i <= j, at ``j (j + 1) / 2 + i`` - the order of ``torch.tril_indices(C, C)``
(LAPACK's upper packed storage, read column by column). :class:`icprune.ChannelStats` keeps its
double-double Gram total ``(gram_packed, gram_packed_lo)`` this way (see
:mod:`icprune.stats.compensated`); a matrix term is added from its *upper* triangle only, so
whatever a BLAS left in the other triangle is never read.

On the CPU with the C++ extension every routine here is one pass of ``icprune._C``
(csrc/gram.cpp); elsewhere (CUDA, no extension) the same IEEE operations run as torch code on the
tensors' device, so both give the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

from icprune.extension import HAVE_EXT, ext
from icprune.stats.compensated import add_


def packed_size(c: int) -> int:
    """Entries of the packed triangle of a C x C matrix: ``C (C + 1) / 2``."""
    return c * (c + 1) // 2


def _fused(*tensors: torch.Tensor) -> bool:
    """True when the C++ pass can work on these tensors in place (CPU, contiguous float64)."""
    return HAVE_EXT and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float64 for t in tensors
    )


def zeros(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Tensor[size] float64 of zeros on ``device`` (default CPU) for a packed total. On the CPU
    the memory comes zeroed from the allocator (``calloc``: the OS zeroes each page when it is
    first written), so creating the statistics of a large net makes no pass over its 100s of
    MiB of Gram totals; the first batch's add is the first write."""
    if torch.device("cpu" if device is None else device).type == "cpu":
        return torch.from_numpy(np.zeros(size, dtype=np.float64))
    return torch.zeros(size, dtype=torch.float64, device=device)


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The packed triangle (Tensor[C (C + 1) / 2], same dtype and device) of the symmetric matrix
    whose upper triangle is ``matrix``'s (Tensor[C, C]; the lower triangle is not read)."""
    c = matrix.shape[-1]
    j, i = torch.tril_indices(c, c, device=matrix.device)
    return matrix[i, j]


def unpack(packed: torch.Tensor, c: int) -> torch.Tensor:
    """The full symmetric Tensor[C, C] float64 of a packed triangle (a new tensor, exactly
    symmetric: both triangles are the same bits)."""
    out = torch.empty(c, c, dtype=torch.float64, device=packed.device)
    if _fused(packed):
        ext.gram_unpack(packed.numpy(), out.numpy())
        return out
    j, i = torch.tril_indices(c, c, device=packed.device)
    out[j, i] = packed
    out[i, j] = packed
    return out


def diagonal(packed: torch.Tensor, c: int) -> torch.Tensor:
    """Tensor[C], the diagonal of a packed triangle (a view-free gather)."""
    j = torch.arange(c, device=packed.device)
    return packed[j * (j + 3) // 2]


def add_upper_(
    hi: torch.Tensor, lo: torch.Tensor, matrix: torch.Tensor | np.ndarray, two_e: int = 0
) -> None:
    """Add the upper triangle of ``matrix * 2**two_e`` to the packed double-double total
    ``(hi, lo)`` in place, exactly as :func:`icprune.stats.compensated.add_` adds each entry.

    Args:
        hi, lo: Tensor[C (C + 1) / 2] float64 packed total and its remainder.
        matrix: Tensor[C, C] or ndarray[C, C] of float32 or float64, any strides (e.g. the
            column-major result of a BLAS syrk); only ``matrix[i, j]`` with ``i <= j`` is read.
            A Tensor must be on ``hi``'s device, an ndarray means CPU memory.
        two_e: power of two undone exactly (``matrix`` holds the Gram matrix times
            ``2**-two_e``; |two_e| <= 300).
    """
    if isinstance(matrix, np.ndarray):
        if _fused(hi, lo):
            ext.gram_add_packed(matrix, two_e, hi.numpy(), lo.numpy())
            return
        matrix = torch.from_numpy(matrix)
    if (
        _fused(hi, lo)
        and matrix.device.type == "cpu"
        and matrix.dtype
        in (
            torch.float32,
            torch.float64,
        )
    ):
        ext.gram_add_packed(matrix.numpy(), two_e, hi.numpy(), lo.numpy())
        return
    term = pack_upper(matrix).to(torch.float64)
    if two_e:
        term = torch.ldexp(term, torch.tensor(float(two_e), dtype=torch.float64))
    add_(hi, lo, term.to(hi.device))


#: torch runs an elementwise sqrt of more than this many values on its thread pool (its
#: vectorised kernels' grain); :func:`_serial_sqrt_` keeps matrices up to SERIAL_SQRT_MAX values
#: on the calling thread.
SQRT_GRAIN = 2048
#: Largest matrix whose square roots are taken in runs of :data:`SQRT_GRAIN` values on the
#: calling thread (C = 128); larger ones are worth the thread pool.
SERIAL_SQRT_MAX = 2**14


def _serial_sqrt_(t: torch.Tensor) -> torch.Tensor:
    """``t.sqrt_()`` of a contiguous CPU tensor, on the calling thread for up to
    :data:`SERIAL_SQRT_MAX` values: in runs of :data:`SQRT_GRAIN`, each below torch's parallel
    grain. Waking the thread pool for a 64 x 64 matrix cost ~7 ms on a loaded 2-core machine
    (the second thread waits for a core), against microseconds for the roots themselves. The
    root is elementwise, so the bits are those of one ``sqrt_`` call (torch splits it between
    its threads the same way)."""
    flat = t.view(-1)
    n = flat.numel()
    if n <= SQRT_GRAIN or n > SERIAL_SQRT_MAX:
        return t.sqrt_()
    for start in range(0, n, SQRT_GRAIN):
        flat[start : start + SQRT_GRAIN].sqrt_()
    return t


def distance(packed: torch.Tensor, c: int) -> torch.Tensor:
    """Euclidean distances between the rows of the C x M matrix A whose Gram matrix ``A A^T`` is
    ``packed``: Tensor[C, C] float64 ``sqrt(max(G_jj + G_ii - 2 G_ji, 0))``, exactly symmetric
    with a zero diagonal."""
    if _fused(packed):
        sq = torch.empty(c, c, dtype=torch.float64)
        ext.gram_squared_distance(packed.numpy(), sq.numpy())
        return _serial_sqrt_(sq)  # torch's sqrt, as the torch code below
    gram = unpack(packed, c)
    diag = gram.diagonal()
    sq = (diag[:, None] + diag[None, :] - 2 * gram).clamp(min=0)
    sq.fill_diagonal_(0.0)
    return sq.sqrt()
