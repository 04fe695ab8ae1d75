"""Pure-PyTorch specification of every op fastsiglip accelerates.

Same names and signatures as the Triton kernels in `fastsiglip.kernels`. This module is the
CPU path (through `fastsiglip.ops`) and the oracle of every kernel test. It computes in the
dtype of its inputs, as transformers does; tests upcast the inputs to get a float64 (or
float32) reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps=1e-6, residual=None):
    """LayerNorm over the last dimension.

    Without `residual`: returns y = LN(x).
    With `residual`: s = x + residual, returns (LN(s), s), the pre-LN encoder's "add, then
    normalize" (s is the new residual stream).
    """
    if residual is not None:
        s = x + residual
        return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None):
    """fc2(gelu_tanh(fc1(x))) [+ residual]. Weights in nn.Linear layout: fc1 [I, C], fc2 [C, I]."""
    y = F.linear(gelu_tanh(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    return y if residual is None else y + residual


def _sequence_positions(cu_seqlens, total):
    """For each packed token: (its sequence index, its position inside the sequence)."""
    tokens = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)
    return seq, tokens - cu_seqlens.long()[seq]


def attention(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              softmax_scale=None):
    """Bidirectional multi-head attention, no dropout; the output has q's layout.

    Dense: q [B, Nq, H, D], k and v [B, Nk, H, D].
    Packed (FlashAttention's varlen convention): q [Tq, H, D], k and v [Tk, H, D], with int32
    `cu_seqlens_q` / `cu_seqlens_k` of length B+1 giving where each sequence starts; sequence b
    of q attends to sequence b of k only. `max_seqlen_*` bound the sequence lengths (computed
    here if not given). A sequence with no keys gets a zero output.
    softmax_scale defaults to D ** -0.5.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    # Packed: scatter into padded [B, N, H, D], attend with a key-padding mask, gather back.
    batch = cu_seqlens_q.numel() - 1
    lens_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    lens_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    max_q = int(lens_q.max()) if max_seqlen_q is None else max_seqlen_q
    max_k = int(lens_k.max()) if max_seqlen_k is None else max_seqlen_k
    if batch == 0 or max_q == 0:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    max_k = max(max_k, 1)
    seq_q, pos_q = _sequence_positions(cu_seqlens_q, q.shape[0])
    seq_k, pos_k = _sequence_positions(cu_seqlens_k, k.shape[0])

    def pad(x, seq, pos, n):
        out = x.new_zeros((batch, n) + x.shape[1:])
        out[seq, pos] = x
        return out.transpose(1, 2)  # [B, H, N, D]

    qp, kp, vp = pad(q, seq_q, pos_q, max_q), pad(k, seq_k, pos_k, max_k), pad(v, seq_k, pos_k, max_k)
    key_valid = torch.arange(max_k, device=q.device)[None, :] < lens_k[:, None]  # [B, Nk]
    # A sequence without keys would softmax over nothing (NaN): let it see its zero padding
    # instead, then zero its output.
    empty = lens_k == 0
    mask = key_valid | empty[:, None]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:, None, None, :], scale=scale)
    out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out.transpose(1, 2)[seq_q, pos_q]


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, chunk_size=None, *, positive_offset=0):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, big_vision's `sigmoid_loss`).

    logits[i, j] = exp(logit_scale) * <image_i, text_j> + logit_bias, z = +1 for the positive
    pairs (j == i + positive_offset; 0, the diagonal, by default) and -1 elsewhere;
    loss = -sum_ij log sigmoid(z_ij * logits_ij) / B_img.
    For a square batch this is transformers' `SiglipModel(return_loss=True)` loss (its mean over
    texts of the sum over images equals the mean over images of the sum over texts).
    `positive_offset` places a rank's images inside a gathered global text batch
    (train/loss.py: distributed_sigmoid_loss).
    Materializes the B_img x B_txt matrix; `chunk_size` is accepted for signature parity.
    """
    logits = image_embeds @ text_embeds.t() * logit_scale.exp() + logit_bias  # [Bi, Bt]
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]  # [Bi, 1]
    cols = torch.arange(logits.shape[1], device=logits.device)[None, :]  # [1, Bt]
    one = torch.ones((), device=logits.device, dtype=logits.dtype)
    sign = torch.where(cols == rows + positive_offset, one, -one)  # [Bi, Bt]: z
    return -F.logsigmoid(sign * logits).sum() / image_embeds.shape[0]
