"""Greedy decoding's argmax over a float32 output head, found from a bfloat16 product and
certified against the float32 logits.

Greedy evaluation spends most of a CPU decode step in the head: (B, H) x (H, V) in float32.
On a CPU with bfloat16 instructions the same product in bfloat16 runs about 3x faster. Its
result is only an estimate, but one with a known error: with u = 2^-9 (bfloat16's unit
roundoff) and fp32 accumulation,

    |z~_v - z_v| <= (3u + O(u^2) + 2 H 2^-24) sum_i |h_i| |W_vi| <= c |h| |W_v| = delta,

c = `ERROR_FACTOR` (about 2.7x that first-order bound, so blockwise rounding inside the kernel
is covered too). Every id whose estimate is within 2 delta of the best estimate is a
candidate; any other id v has z_v <= z~_v + delta < max z~ - delta <= z of the best estimate's
id, so the argmax of the float32 logits is among the candidates. The candidates (usually a
handful) are scored exactly in float32 and the best is taken, the lowest id on a tie as
`torch.argmax` does. A row whose candidates are too many (hidden states so large the bound
says little) or whose logits are not finite is projected in float32 in full.

The result is the float32 argmax up to the order of summation inside a dot product, which any
other GEMM layout changes too. Shapes: B rows, H hidden size, V vocabulary, N candidates.
"""

from __future__ import annotations

import weakref

import torch

ERROR_FACTOR = 2.0 ** -6  # c above
MAX_CANDIDATE_SHARE = 1 / 16  # more candidates than this share of V: the row goes float32
BLOCK = 1024  # ids per block of the candidate search

_LOW: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # head -> (key, bf16 W, |W_v| max)


def usable(head: torch.nn.Linear) -> bool:
    """Whether `head` gains from the bfloat16 estimate: float32 weights on a CPU with native
    bfloat16 matrix instructions (elsewhere bfloat16 GEMMs are emulated and slower)."""
    w = head.weight
    if w.dtype != torch.float32 or w.device.type != "cpu" or w.shape[0] < 4096:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _low_precision(head: torch.nn.Linear) -> tuple[torch.Tensor, float]:
    """(W in bfloat16, max_v |W_v|), kept per head until its weight changes."""
    w = head.weight
    key = (w.data_ptr(), w._version, tuple(w.shape))
    held = _LOW.get(head)
    if held is None or held[0] != key:
        with torch.no_grad():
            held = _LOW[head] = (key, w.detach().to(torch.bfloat16), float(w.detach().norm(dim=1).max()))
    return held[1], held[2]


@torch.no_grad()
def argmax_logits(h_BH: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """(B,) argmax over the vocabulary of head(h), the logits in float32 (see the module text)."""
    w_low_VH, w_norm = _low_precision(head)
    weight_VH, bias_V = head.weight.detach(), head.bias
    h_BH = h_BH.to(torch.float32)
    z_BV = torch.mm(h_BH.to(torch.bfloat16), w_low_VH.T)
    if bias_V is not None:
        z_BV = z_BV.float().add_(bias_V.detach())
    B, V = z_BV.shape
    rows_N, ids_N, redo_B = _candidates(z_BV, ERROR_FACTOR * h_BH.norm(dim=-1) * w_norm)
    exact_N = (h_BH[rows_N] * weight_VH[ids_N]).sum(-1)
    if bias_V is not None:
        exact_N = exact_N + bias_V.detach()[ids_N]
    top_B = torch.full((B,), float("-inf")).scatter_reduce(0, rows_N, exact_N, "amax")
    at_top_N = exact_N == top_B[rows_N]
    out_B = torch.full((B,), V, dtype=torch.long).scatter_reduce(0, rows_N[at_top_N], ids_N[at_top_N],
                                                                 "amin")
    redo_B |= ~torch.isfinite(top_B) | (out_B >= V)
    if bool(redo_B.any()):
        redo = redo_B.nonzero().squeeze(-1)
        out_B[redo] = torch.nn.functional.linear(h_BH[redo], weight_VH, bias_V).argmax(-1)
    return out_B


def _candidates(z_BV: torch.Tensor, delta_B: torch.Tensor):
    """(rows (N,), ids (N,), rows to redo in float32 (B,)): every id whose estimate is within
    2 delta of its row's best, found block by block (one max per block of BLOCK ids, then only
    the blocks that reach the floor are searched), so the (B, V) estimate is read once."""
    B, V = z_BV.shape
    K = min(BLOCK, V)
    V0 = V - V % K
    parts = [z_BV[:, :V0].reshape(B, V0 // K, K).amax(-1)]
    if V0 < V:
        parts.append(z_BV[:, V0:].amax(-1, keepdim=True))
    block_max_BM = torch.cat(parts, 1).float()
    best_B = block_max_BM.amax(-1)
    floor_B = best_B - 2 * delta_B
    redo_B = ~torch.isfinite(floor_B)
    rows_n, blocks_n = torch.nonzero((block_max_BM >= floor_B[:, None]) & ~redo_B[:, None], as_tuple=True)
    ids_nK = blocks_n[:, None] * K + torch.arange(K)
    inside_nK = ids_nK < V
    ids_nK = ids_nK.clamp_(max=V - 1)
    vals_nK = z_BV[rows_n[:, None], ids_nK].float()
    r, c = torch.nonzero((vals_nK >= floor_B[rows_n][:, None]) & inside_nK, as_tuple=True)
    rows_N, ids_N = rows_n[r], ids_nK[r, c]
    redo_B |= torch.bincount(rows_N, minlength=B) > MAX_CANDIDATE_SHARE * V
    if bool(redo_B.any()):
        keep_N = ~redo_B[rows_N]
        rows_N, ids_N = rows_N[keep_N], ids_N[keep_N]
    return rows_N, ids_N, redo_B
