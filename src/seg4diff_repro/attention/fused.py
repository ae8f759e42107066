"""One fused kernel for the head-mean attention map of a slice of the joint attention (Triton, CUDA only).

The recorder's map is mean_h exp(scale · q_h[rows] · k_h[columns]ᵀ − lse_h[rows]), with the row log-sum-exp
taken from the attention kernel itself. Done with torch ops, each layer casts q and k to float32, writes the
[batch, heads, rows, columns] scores, their exponent and then the head mean: four passes over tensors 24 times
larger than the result, a quarter of a forward pass when every layer is recorded. The kernel reads q and k once
in their own dtype (products of half-precision numbers are exact in float32, which accumulates them), keeps the
scores in registers, and writes only the [batch, rows, columns] mean.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship no Triton: the recorder keeps its torch path
    triton = None

BLOCK_ROWS = 64
BLOCK_COLUMNS = 64


def fused_head_mean_supported(query: torch.Tensor) -> bool:
    """Whether `head_mean_map` can run on these inputs: Triton on a CUDA device, half precision (float32 inputs
    would go through TF32 in the kernel's dot product), a head size that is a power of two, at least 16."""
    head_dim = query.shape[-1]
    return (
        triton is not None
        and query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
    )


if triton is not None:

    @triton.jit
    def _head_mean_map_kernel(
        q_ptr, k_ptr, lse_ptr, out_ptr,
        q_stride_b, q_stride_h, q_stride_n, q_stride_d,
        k_stride_b, k_stride_h, k_stride_n, k_stride_d,
        lse_stride_b, lse_stride_h, lse_stride_n,
        out_stride_b, out_stride_r, out_stride_c,
        row_start, column_start, n_rows, n_columns, scale,
        N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        block_r, block_c, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = block_r * BLOCK_R + tl.arange(0, BLOCK_R)
        columns = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
        dims = tl.arange(0, HEAD_DIM)
        row_ok, column_ok = rows < n_rows, columns < n_columns
        q_rows = q_ptr + batch * q_stride_b + (row_start + rows)[:, None] * q_stride_n + dims[None, :] * q_stride_d
        k_columns = (k_ptr + batch * k_stride_b + (column_start + columns)[:, None] * k_stride_n
                     + dims[None, :] * k_stride_d)
        lse_rows = lse_ptr + batch * lse_stride_b + (row_start + rows) * lse_stride_n
        total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for head in range(N_HEADS):  # a compile-time count: one kernel per model
            q = tl.load(q_rows + head * q_stride_h, mask=row_ok[:, None], other=0.0)
            k = tl.load(k_columns + head * k_stride_h, mask=column_ok[:, None], other=0.0)
            lse = tl.load(lse_rows + head * lse_stride_h, mask=row_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            total += tl.exp(scores - lse[:, None])
        out = out_ptr + batch * out_stride_b + rows[:, None] * out_stride_r + columns[None, :] * out_stride_c
        tl.store(out, total / N_HEADS, mask=row_ok[:, None] & column_ok[None, :])


def head_mean_map(
    query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, rows: slice, columns: slice, scale: float
) -> torch.Tensor:
    """[B, 1, n_rows, n_columns] float32: the head mean of exp(scale · q[rows] · k[columns]ᵀ − lse[rows]).

    query, key: [B, H, N, D] (any strides); lse: [B, H, N] float32. Call only where
    `fused_head_mean_supported(query)`.
    """
    batch, heads, n_tokens, head_dim = query.shape
    row_start, row_stop, _ = rows.indices(n_tokens)
    column_start, column_stop, _ = columns.indices(key.shape[2])
    n_rows, n_columns = row_stop - row_start, column_stop - column_start
    out = torch.empty(batch, 1, n_rows, n_columns, device=query.device, dtype=torch.float32)
    grid = (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(n_columns, BLOCK_COLUMNS), batch)
    _head_mean_map_kernel[grid](
        query, key, lse, out,
        *query.stride(), *key.stride(), *lse.stride(),
        out.stride(0), out.stride(2), out.stride(3),
        row_start, column_start, n_rows, n_columns, scale,
        N_HEADS=heads, HEAD_DIM=head_dim, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLUMNS,
    )
    return out
