"""The encoder's building blocks, and the rule that lets them take the fused kernels.

Attention, MLP (with its GELU-tanh module), encoder layer, encoder and the MAP pooling head, with
transformers' module tree and parameter names. Each block computes what transformers' block
computes by calling its submodules, and takes a fused path only where that computes exactly
the same thing: every submodule it would skip is exactly the plain class (nn.Linear,
nn.LayerNorm, nn.MultiheadAttention, GELUTanh; not a subclass: peft's LoRA layers, quantized
and parametrized layers all differ) and runs no hook (`plain`). The decision is taken at every
call from the modules as they are then (a few type and dict checks), so a hook registered or a
layer replaced later takes effect at once.

Two layouts of tokens reach attention:
- dense: [B, N, C], every token real (FixRes images, text without a mask);
- varlen (FlashAttention's convention, `Layout`): packed tokens plus int32 `cu_seqlens`; keys
  may be a subset of the tokens (`key_indices`: masked text, NaFlex in transformers' layout).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import ops, reference
from .config import TextConfig, VisionConfig
from .outputs import BaseModelOutput


class Layout(NamedTuple):
    """How attention sees the tokens when they are not dense [B, N, C]: FlashAttention varlen.

    Queries are all tokens flattened ([Tq, C]); keys are the same tokens, or the subset
    `key_indices` of them when only some may be attended to (masked text).
    """

    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    key_indices: torch.Tensor | None = None  # [Tk] int64, into the flattened query tokens


def fixed_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    """cu_seqlens of `batch` sequences of `seqlen` tokens each: [0, N, 2N, ..., BN]."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------
# Module semantics: the fused path only where it computes what calling the modules would
# ---------------------------------------------------------------------------------------------

# What a layer checkpoints with when nothing set its _gradient_checkpointing_func.
DEFAULT_CHECKPOINT = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def global_hooks() -> bool:
    """Whether any module-global hook is registered (torch.nn.modules.module.register_module_*)."""
    g = torch.nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def own_hooks(module: nn.Module) -> bool:
    """Whether `module` itself has a forward, forward-pre, backward or backward-pre hook, not
    counting transformers' output-capturing hooks (a patched tower's blocks share them with
    transformers' layers; fastsiglip.patch runs the tower with no collector active, where they
    do nothing)."""
    return any(not _output_capturing(hook) for name in _HOOKS for hook in getattr(module, name).values())


def _output_capturing(hook) -> bool:
    """transformers' output_capturing_hook (transformers/utils/output_capturing.py)."""
    return getattr(hook, "__name__", "") == "output_capturing_hook" and \
        getattr(hook, "__module__", "").startswith("transformers.")


def hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run any hook (its own or a module-global one)."""
    return own_hooks(module) or global_hooks()


def plain(module: nn.Module, cls: type) -> bool:
    """`module` is exactly `cls` (not a subclass: peft's LoRA layers, bitsandbytes' and torch.ao's
    quantized Linear, a parametrized or user-derived module all differ) and runs no hook: only then
    may a fused path read its parameters instead of calling it."""
    return type(module) is cls and not hooked(module)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on x computes in: the autocast dtype where autocast is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def layer_norm(ln: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ln(x): ops.layer_norm for a plain nn.LayerNorm, else the module itself."""
    return ops.layer_norm(x, ln.weight, ln.bias, ln.eps) if plain(ln, nn.LayerNorm) else ln(x)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


def _attend(q, k, v, layout: Layout | None):
    """ops.attention on [..., H, D] projections laid out as `layout` says; output like q."""
    if layout is None:
        return ops.attention(q, k, v)  # [B, N, H, D]
    shape = q.shape
    q, k, v = q.flatten(0, -3), k.flatten(0, -3), v.flatten(0, -3)  # [T, H, D]
    if layout.key_indices is not None:
        k, v = k.index_select(0, layout.key_indices), v.index_select(0, layout.key_indices)
    out = ops.attention(q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k)
    return out.view(shape)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention, softmax scale head_dim ** -0.5: transformers'
    SiglipAttention (q_proj, k_proj, v_proj, attention, out_proj).

    Fused path (all four projections plain nn.Linear): q, k and v come from one [3C, C] GEMM
    (F.linear against the three weights concatenated), which writes [..., 3C]; q, k and v are
    strided views of it (token stride 3C, head stride D), which the attention kernel reads as they
    are (kernels/attention.py `_rows`: unit stride along D, other strides multiples of 8). The
    parameters stay transformers' q_proj, k_proj and v_proj, so state dicts, named_parameters and
    checkpoints are unchanged; the price is concatenating the three weights on every call (3 C^2
    elements copied, against the GEMM's 3 T C^2 multiply-adds). Otherwise (a LoRA, quantized or
    hooked projection) each projection module is called, in transformers' order.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def fusable(self) -> bool:
        return all(plain(p, nn.Linear) for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))

    def forward(self, x: torch.Tensor, layout: Layout | None = None) -> tuple[torch.Tensor, None]:
        """(output, None): transformers' (attn_output, attn_weights), so that a hook sees the same
        structure; the weights are never formed (output_attentions is refused upstream)."""
        heads = (self.num_heads, self.head_dim)
        if self.fusable():
            projections = (self.q_proj, self.k_proj, self.v_proj)
            weight = torch.cat([p.weight for p in projections])  # [3C, C]
            bias = torch.cat([p.bias for p in projections])  # [3C]
            qkv = F.linear(x, weight, bias).unflatten(-1, (3, *heads))  # [..., 3, H, D]
            q, k, v = qkv.unbind(-3)  # each [B, N, H, D] or [T, H, D], token stride 3C
            out = _attend(q, k, v, layout).flatten(-2)
            return F.linear(out, self.out_proj.weight, self.out_proj.bias), None
        q, k, v = (p(x).unflatten(-1, heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(_attend(q, k, v, layout).flatten(-2)), None


class GELUTanh(nn.Module):
    """GELU, tanh approximation: transformers' ACT2FN["gelu_pytorch_tanh"], a module there too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.gelu_tanh(x)


def tanh_gelu(module: nn.Module) -> bool:
    """A plain tanh-approximate GELU module: fastsiglip's GELUTanh, or transformers' (whose `act`
    is F.gelu(approximate="tanh"), not its Python formula), without hooks."""
    if plain(module, GELUTanh):
        return True
    cls = type(module)
    if cls.__name__ != "GELUTanh" or not cls.__module__.startswith("transformers.") or hooked(module):
        return False
    act = getattr(module, "act", None)
    return isinstance(act, functools.partial) and act.func is F.gelu and act.keywords == {"approximate": "tanh"}


class MLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))): one ops.mlp call when fc1, fc2 and the activation are plain, else
    the three modules called as transformers' SiglipMLP calls them."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.activation_fn = GELUTanh()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def fusable(self) -> bool:
        return plain(self.fc1, nn.Linear) and plain(self.fc2, nn.Linear) and tanh_gelu(self.activation_fn)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[residual +] mlp(x) in one ops.mlp call (the add in fc2's epilogue); needs fusable()."""
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusable():
            return self.fused(x)
        return self.fc2(self.activation_fn(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN block: x = x + attn(LN1(x)); x = x + mlp(LN2(x)). Returns the new hidden state, as
    transformers' SiglipEncoderLayer does.

    Fused path (both LayerNorms, the attention and the MLP plain, none hooked): LN1, attention,
    then LN2 fused with the first residual add (ops.layer_norm's residual form returns LN(x + a)
    and x + a, in their promoted dtype), then the MLP with the second add in fc2's epilogue (a
    separate add when the stream is wider than the MLP's dtype, as under autocast, so that it
    stays as wide as transformers'): per layer two LayerNorm, one attention and one MLP kernel.
    Otherwise each submodule is called as transformers calls it.

    Activation checkpointing (`gradient_checkpointing`, as transformers' layers have it, set by
    the model's activation_checkpointing_enable, or by a transformers model that holds this layer
    after fastsiglip.patch): in training mode the layer keeps only its inputs and runs `_forward`
    again in backward through `_gradient_checkpointing_func` (torch.utils.checkpoint with the
    model's arguments; transformers sets the same attribute). The layer's own hooks stay outside
    the checkpoint and fire once, as in transformers >= 5.23; its submodules run twice.
    """

    gradient_checkpointing = False

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = Attention(hidden_size, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MLP(hidden_size, intermediate_size)

    def fusable(self) -> bool:
        return (plain(self.layer_norm1, nn.LayerNorm) and plain(self.layer_norm2, nn.LayerNorm)
                and plain(self.self_attn, Attention) and self.self_attn.fusable()
                and plain(self.mlp, MLP) and self.mlp.fusable())

    def forward(self, x: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            checkpoint = getattr(self, "_gradient_checkpointing_func", None) or DEFAULT_CHECKPOINT
            return checkpoint(self._forward, x, layout)
        return self._forward(x, layout)

    def _forward(self, x: torch.Tensor, layout: Layout | None) -> torch.Tensor:
        if self.fusable():
            ln1, ln2 = self.layer_norm1, self.layer_norm2
            a, _ = self.self_attn.forward(ops.layer_norm(x, ln1.weight, ln1.bias, ln1.eps), layout)
            h, x = ops.layer_norm(a, ln2.weight, ln2.bias, ln2.eps, residual=x)  # LN2(x + a), x + a
            if x.dtype == _compute_dtype(h):
                return self.mlp.fused(h, residual=x)
            return x + self.mlp.fused(h)  # the stream stays in its wider dtype (autocast), as transformers'
        x = x + self.self_attn(layer_norm(self.layer_norm1, x), layout)[0]
        return x + self.mlp(layer_norm(self.layer_norm2, x))


class Encoder(nn.Module):
    """The encoder layers, each called as a module (its hooks see transformers' hidden states)."""

    def __init__(self, cfg: VisionConfig | TextConfig):
        super().__init__()
        args = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(*args) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False  # transformers' flag; the layers carry their own

    def forward(self, x: torch.Tensor, layout: Layout | None, hidden_states: list | None = None) -> BaseModelOutput:
        """BaseModelOutput(last_hidden_state), as transformers' encoder returns. A `hidden_states`
        list receives the input of every layer and the output of the last: transformers'
        output_hidden_states."""
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, layout)
        if hidden_states is not None:
            hidden_states.append(x)
        return BaseModelOutput(last_hidden_state=x)


class MultiheadAttentionPoolingHead(nn.Module):
    """MAP head (big_vision's MAPHead): a learned probe attends over each image's tokens, then
    x + mlp(LN(x)); transformers' (Siglip2)MultiheadAttentionPoolingHead, with the same
    nn.MultiheadAttention.

    Fused path (`pool_packed`, when fusable()): one probe per image through varlen attention
    (cu_seqlens_q = 0..B) with the MultiheadAttention's own in_proj and out_proj tensors, as
    nn.MultiheadAttention reads them (it never calls out_proj as a module), then the LayerNorm
    and the MLP kernel with the residual add. Otherwise `forward`, transformers' computation."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def fusable(self) -> bool:
        return (not hooked(self) and plain(self.attention, nn.MultiheadAttention)
                and isinstance(self.attention.out_proj.weight, torch.Tensor)
                and plain(self.layernorm, nn.LayerNorm) and plain(self.mlp, MLP) and self.mlp.fusable())

    def pool_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x: [T, C] the tokens of B images packed by `cu_seqlens` [B + 1] -> [B, C]; needs fusable()."""
        batch, channels = cu_seqlens.numel() - 1, x.shape[-1]
        heads = (self.num_heads, channels // self.num_heads)
        mha = self.attention
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        q = F.linear(self.probe.reshape(1, channels), wq, bq).view(1, *heads).expand(batch, *heads)  # [B, H, D]
        k, v = F.linear(x, wk, bk).view(-1, *heads), F.linear(x, wv, bv).view(-1, *heads)  # [T, H, D]
        cu_q = fixed_cu_seqlens(batch, 1, x.device)  # one query per image
        out = ops.attention(q.contiguous(), k, v, cu_q, cu_seqlens, 1, max_seqlen)  # [B, H, D]
        out = F.linear(out.reshape(batch, channels), mha.out_proj.weight, mha.out_proj.bias)
        ln = self.layernorm
        return self.mlp.fused(ops.layer_norm(out, ln.weight, ln.bias, ln.eps), residual=out)  # [B, C]

    def forward(self, hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, C] tokens (NaFlex: and the [B, N] mask of the real ones) -> [B, C], as transformers."""
        probe = self.probe.repeat(hidden_state.shape[0], 1, 1)
        if attention_mask is None:
            hidden_state = self.attention(probe, hidden_state, hidden_state)[0]
        else:  # nn.MultiheadAttention takes the padding as key_padding_mask (True = ignored)
            hidden_state = self.attention(probe, hidden_state, hidden_state, key_padding_mask=~attention_mask.bool())[0]
        hidden_state = hidden_state + self.mlp(self.layernorm(hidden_state))
        return hidden_state[:, 0]
