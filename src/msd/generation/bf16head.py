"""The decode loop's output head in bfloat16, with float32 results: greedy ids certified
against the float32 logits, and samples drawn exactly from the float32 distribution.

A CPU decode step with a large vocabulary spends most of its time in the head, (B, H) x (H, V)
in float32. On a CPU with bfloat16 instructions the same product in bfloat16 runs 2-3x
faster. Its result z~ is an estimate with a known error: with u = 2^-9 (bfloat16's unit
roundoff) and float32 accumulation,

    |z~_v - z_v| <= (3u + O(u^2) + 2 H 2^-24) sum_i |h_i| |W_vi| <= c |h| max_v |W_v| = delta,

c = `ERROR_FACTOR` (about 2.7x that first-order bound, so blockwise rounding inside the kernel
is covered too). Two uses:

- greedy (`argmax`): every id whose estimate is within 2 delta of the best estimate is a
  candidate; any other id v has z_v <= z~_v + delta < max z~ - delta <= z of the best
  estimate's id, so the float32 argmax is among the candidates. They (usually a handful) are
  scored exactly in float32 and the best is taken, the lowest id on a tie as `torch.argmax`
  does. A row with too many candidates, or not finite, is projected in float32 in full.
- sampling at temperature T (`sample`, no top-k / top-p): propose v with weight
  q_v = exp((z~_v - m) / T) (the two-level inverse-CDF draw of `msd.generation.sampler`),
  score z_v exactly, accept with probability exp((z_v - m - delta) / T) / q_v <= 1, else
  propose again. An accepted id has probability proportional to exp(z_v / T): the float32
  distribution, exactly (rejection sampling); a proposal is accepted with probability at
  least exp(-2 delta / T). A row whose delta / T exceeds `MAX_SAMPLING_DELTA` is sampled from
  its float32 logits instead.

"Float32 logits" means each dot product in float32; its summation order is not that of any
particular GEMM, as with any other layout. The bfloat16 copy of W lives as long as the
`Bf16Head` (one generate call): a trained head changes between rollouts.
Shapes: B rows, H hidden size, V vocabulary, N candidates, K ids per block.
"""

from __future__ import annotations

import torch

from msd import machine
from msd.generation.sampler import draw
from msd.memory import trim_heap

ERROR_FACTOR = 2.0 ** -6  # c above
MAX_CANDIDATE_SHARE = 1 / 16  # greedy: more candidates than this share of V: the row goes float32
MAX_SAMPLING_DELTA = 0.5  # sampling: delta / T above this (acceptance < e^-1): the row goes float32
MAX_PROPOSALS = 64  # sampling: rows still rejected after this many proposals go float32
BLOCK = 1024  # ids per block of the candidate search
PACK_BLOCK_BYTES = 16 << 20  # the packed bfloat16 weight is built in vocabulary blocks of this size


def usable(head: torch.nn.Linear) -> bool:
    """Whether `head` gains from the bfloat16 estimate: float32 weights on a CPU with native
    bfloat16 matrix instructions (elsewhere bfloat16 GEMMs are emulated and slower)."""
    w = head.weight
    if w.dtype != torch.float32 or w.device.type != "cpu" or w.shape[0] < 4096:
        return False
    return machine.native_bf16()


class Bf16Head:
    """A float32 linear head with its bfloat16 copy, for the decode steps of one generate call."""

    def __init__(self, head: torch.nn.Linear, rows: int = 8):
        with torch.no_grad():
            self.weight_VH = head.weight.detach()
            self.bias_V = head.bias.detach() if head.bias is not None else None
            self.w_norm = float(self.weight_VH.norm(dim=1).max())
            self.packed = _packed(self.weight_VH, rows)
            self.low_VH = None if self.packed is not None else self.weight_VH.to(torch.bfloat16)
        self._out = None  # the (B, V) estimate's block

    def estimate(self, h_BH: torch.Tensor):
        """(z~ (B, V), delta (B,)): the bfloat16 logits (float32 with a bias) and their bound."""
        h_low_BH = h_BH.to(torch.bfloat16)
        B, V = len(h_BH), self.weight_VH.shape[0]
        if self._out is None or self._out.shape[0] != B:  # reused while the row count stays
            self._out = torch.empty(B, V, dtype=torch.bfloat16)
        if self.packed is not None:
            z_BV = torch.cat([torch.ops.mkldnn._linear_pointwise(h_low_BH, block, None, "none", [], "")
                              for block in self.packed], 1, out=self._out)
        else:
            z_BV = torch.mm(h_low_BH, self.low_VH.T, out=self._out)
        delta_B = ERROR_FACTOR * h_BH.float().norm(dim=-1) * self.w_norm
        if self.bias_V is not None:  # + the rounding of the float32 sum z~ + b
            z_BV = z_BV.float().add_(self.bias_V)
            delta_B = delta_B + 2.0 ** -22 * (z_BV.abs().amax(-1) + self.bias_V.abs().max())
        return z_BV, delta_B

    def exact(self, h_NH: torch.Tensor, ids_N: torch.Tensor) -> torch.Tensor:
        """(N,) float32 logits of id ids_N[n] for hidden state h_NH[n]."""
        z_N = (h_NH.float() * self.weight_VH[ids_N]).sum(-1)
        return z_N + self.bias_V[ids_N] if self.bias_V is not None else z_N

    def full(self, h_BH: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 logits, the slow way."""
        return torch.nn.functional.linear(h_BH.float(), self.weight_VH, self.bias_V)

    @torch.no_grad()
    def argmax(self, h_BH: torch.Tensor) -> torch.Tensor:
        """(B,) argmax over the vocabulary of the float32 logits (see the module text)."""
        z_BV, delta_B = self.estimate(h_BH)
        B, V = z_BV.shape
        rows_N, ids_N, redo_B = _candidates(z_BV, delta_B)
        exact_N = self.exact(h_BH[rows_N], ids_N)
        top_B = torch.full((B,), float("-inf")).scatter_reduce(0, rows_N, exact_N, "amax")
        at_top_N = exact_N == top_B[rows_N]
        out_B = torch.full((B,), V, dtype=torch.long).scatter_reduce(0, rows_N[at_top_N], ids_N[at_top_N],
                                                                     "amin")
        redo_B |= ~torch.isfinite(top_B) | (out_B >= V)
        if bool(redo_B.any()):
            redo = redo_B.nonzero().squeeze(-1)
            out_B[redo] = self.full(h_BH[redo]).argmax(-1)
        return out_B

    @torch.no_grad()
    def sample(self, h_BH: torch.Tensor, temperature: float, generator: torch.Generator | None,
               out_BV: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) ids drawn from softmax(z / temperature) of the float32 logits z, exactly (see
        the module text). out_BV: a float32 (B, V) buffer for the proposal weights."""
        z_BV, delta_B = self.estimate(h_BH)
        q_BV = out_BV if out_BV is not None else torch.empty(z_BV.shape, dtype=torch.float32)
        m_B1 = z_BV.amax(-1, keepdim=True).float()
        q_BV.copy_(z_BV).sub_(m_B1)  # in float32, with no (B, V) temporary
        if temperature != 1.0:
            q_BV.div_(temperature)
        q_BV.exp_()
        slack_B = delta_B.double() * (1 + 1e-6) + 1e-12  # delta, rounded up
        out_B = torch.full((len(h_BH),), -1, dtype=torch.long)
        todo = (delta_B / temperature <= MAX_SAMPLING_DELTA).nonzero().squeeze(-1)  # NaN: no
        for _ in range(MAX_PROPOSALS):
            if len(todo) == 0:
                break
            v_R = draw(q_BV if len(todo) == len(q_BV) else q_BV[todo], generator)
            z_R = self.exact(h_BH[todo], v_R).double()
            log_accept_R = (z_R - m_B1[todo, 0].double() - slack_B[todo]) / temperature \
                - q_BV[todo, v_R].double().log()
            u_R = torch.rand(len(todo), generator=generator, dtype=torch.float64)
            ok_R = u_R.log() < log_accept_R
            out_B[todo[ok_R]] = v_R[ok_R]
            todo = todo[~ok_R]
        redo = (out_B < 0).nonzero().squeeze(-1)
        if len(redo):
            z_RV = self.full(h_BH[redo]).div_(temperature)
            w_RV = (z_RV - z_RV.amax(-1, keepdim=True)).exp_()
            out_B[redo] = draw(w_RV, generator)
        return out_B


def _packed(weight_VH: torch.Tensor, rows: int):
    """The weight in bfloat16, in oneDNN's blocked layout for its matrix multiply, as a list of
    vocabulary blocks of at most PACK_BLOCK_BYTES each (converted and packed one at a time, so
    building it never holds a second bfloat16 copy); None where torch lacks the operators.
    Packed once, the product runs about 2x faster for a few rows (8 rows of the benchmark head:
    5.8 ms against 11.9 ms) and gives the same values."""
    V, H = weight_VH.shape
    step = max(1024, PACK_BLOCK_BYTES // (2 * H))
    blocks = []
    try:
        for v0 in range(0, V, step):
            low = weight_VH[v0:v0 + step].to(torch.bfloat16)
            blocks.append(torch.ops.mkldnn._reorder_linear_weight(low, rows))
            del low
        trim_heap()  # the conversions' freed blocks
        probe = torch.ops.mkldnn._linear_pointwise(weight_VH[:1].to(torch.bfloat16), blocks[0], None,
                                                   "none", [], "")
        if probe.shape != (1, min(step, V)) or probe.dtype != torch.bfloat16:
            return None
        return blocks
    except (AttributeError, RuntimeError, TypeError):
        return None


def usable_for(head: torch.nn.Linear, temperature: float, top_p: float, top_k: int,
               logprobs: bool) -> bool:
    """Whether a decode loop with these settings can use a `Bf16Head`: greedy or plain
    temperature sampling (no top-k / top-p), no log-probs wanted, and a `usable` head."""
    plain = temperature <= 0 or (top_k <= 0 and top_p >= 1.0)
    return plain and not logprobs and usable(head)


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
