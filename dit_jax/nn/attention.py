"""Multi-head attention (cuDNN's flash kernel on GPU, query-chunked XLA attention on CPU), and
self-attention under a token-merging strategy (`merged_self_attention`, shared by every block)."""

from __future__ import annotations

import contextlib
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.devices import cuda_capability
from sdtm.merger import BlockMerger, MergeState
from sdtm.ops import log_group_size, merge, unmerge

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")
# "auto": cuDNN's fused flash attention for bf16/fp16 on the GPUs that have it (jax's own default
# is XLA's unfused attention; see `cudnn_flash_supported`), "chunked" on CPU, XLA elsewhere. The
# others force one; read when a function is traced.
_IMPLEMENTATION = os.environ.get("DIT_JAX_ATTENTION", "auto")
# Queries per block of the chunked attention. Medians of 9 calls, 16 heads of 72 (DiT-XL/2),
# batch 2, on this project's 2-core CPU, blocks of 64 / 128 / 256 against jax.nn.dot_product_attention:
# 1024 tokens 140 / 109 / 158 vs 216 ms; 512 tokens 32 / 29 / 29 vs 52 ms; 2048 tokens 577 / 675 / 538 vs 964 ms.
QUERY_CHUNK = 128


@contextlib.contextmanager
def attention_implementation(name: str):
    """Trace the attention inside this block with `name` (one of IMPLEMENTATIONS)."""
    global _IMPLEMENTATION
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    previous, _IMPLEMENTATION = _IMPLEMENTATION, name
    try:
        yield
    finally:
        _IMPLEMENTATION = previous


def cudnn_flash_supported(head_dim: int, device=None) -> bool:
    """Whether cuDNN's flash attention runs on `device` (default: the first device of the default
    backend) for heads of `head_dim`: a CUDA GPU of compute capability 8.0 (Ampere) or newer
    (cuDNN's support matrix; a T4 or V100 has none, ROCm GPUs neither), and a head size that is a
    multiple of 8, at most 128 (256 from compute capability 9.0, Hopper), as jax requires."""
    capability = cuda_capability(device)
    if capability is None:
        return False
    return capability >= (8, 0) and head_dim % 8 == 0 and head_dim <= (256 if capability >= (9, 0) else 128)


def _implementation(dtype, head_dim: int) -> str | None:
    """"cudnn", "chunked" or None (jax's XLA attention) for heads of `head_dim` in `dtype`."""
    if _IMPLEMENTATION == "auto":
        backend = jax.default_backend()
        if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and cudnn_flash_supported(head_dim):
            return "cudnn"
        return "chunked" if backend == "cpu" else None
    return None if _IMPLEMENTATION == "xla" else _IMPLEMENTATION


def chunked_attention(
    q: jax.Array,  # (B, N, h, d)
    k: jax.Array,  # (B, S, h, d)
    v: jax.Array,  # (B, S, h, d)
    bias: jax.Array | None = None,  # broadcastable to (B, h, N, S)
    chunk: int = QUERY_CHUNK,
    key_attention_queries: int | None = None,
):
    """Softmax attention computed `chunk` queries at a time -> (B, N, h, d), and with
    `key_attention_queries` also `key_attention`'s score (B, S) -> ((B, N, h, d), (B, S)).

    The same function as `jax.nn.dot_product_attention` (logits and softmax in float32), cut
    into independent blocks of queries, each with a small [B, h, chunk, S] block of logits,
    which XLA's CPU backend can run side by side on its cores. On CPU it is the faster way
    (figures at QUERY_CHUNK; DiT-XL/2 at 512 px: one forward 12.4 s against 14.4 s).
    """
    n = q.shape[1]
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    stride = None if key_attention_queries is None else _key_attention_stride(n, key_attention_queries)
    outs, received = [], []
    for start in range(0, n, chunk):  # static: the last block may be shorter
        stop = min(start + chunk, n)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, start:stop], k, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + (bias[:, :, start:stop] if bias.shape[2] > 1 else bias).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        if stride is not None and (first := -start % stride) < stop - start:  # key_attention's queries in this block
            with jax.named_scope("key_attention"):
                received.append(probs[:, :, first::stride].sum(axis=(1, 2)))
        outs.append(jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    if stride is None:
        return out
    return out, sum(received) / (q.shape[2] * -(-n // stride))  # heads x strided queries


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
    """q (B, N, h, d), k and v (B, S, h, d), bias broadcastable to (B, h, N, S) or None -> (B, N, h, d)."""
    implementation = _implementation(q.dtype, q.shape[-1])
    if implementation == "chunked":
        return chunked_attention(q, k, v, bias)  # adds the bias in float32
    if bias is not None:
        bias = bias.astype(q.dtype)
        if implementation == "cudnn":  # cuDNN checks the bias' query and key lengths
            b, n, s = q.shape[0], q.shape[1], k.shape[1]
            bias = jnp.broadcast_to(bias, (b, bias.shape[1], n, s))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation)


# Queries sampled to estimate how much attention each key receives (IDM's attention score).
KEY_ATTENTION_QUERIES = 64


def _key_attention_stride(n: int, num_queries: int) -> int:
    """Every how many queries `key_attention` reads one (queries 0, stride, 2 * stride, ...)."""
    return max(1, n // num_queries)


def _attention_and_key_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None):
    """`_attention(q, k, v, bias)` and `key_attention(q, k)` -> ((B, N, h, d), (B, S)). The chunked
    attention (CPU) reads the score off its own probabilities (the same up to round-off): computed
    apart, it cost an IDM block of DiT-XL/2 (batch 2) 462 against 418 ms, far more than its own
    8 ms (a profile of a stand-in that read q the same way showed the query blocks running one
    after another instead of side by side). The score is defined without a bias."""
    if bias is not None:
        raise ValueError("key attention is the attention keys receive without a bias; got a bias")
    if _implementation(q.dtype, q.shape[-1]) == "chunked":
        return chunked_attention(q, k, v, key_attention_queries=KEY_ATTENTION_QUERIES)
    return _attention(q, k, v, None), key_attention(q, k)


def _attend_and_project(proj: nnx.Linear, q, k, v, bias, with_key_attention: bool):
    """q (B, N, h, d), k and v (B, S, h, d) -> proj(attention) (B, N, h * d), and with
    `with_key_attention` also the (B, S) key-attention score."""
    b, n, h, d = q.shape
    heads_out, key_att = (_attention_and_key_attention(q, k, v, bias) if with_key_attention
                          else (_attention(q, k, v, bias), None))
    out = proj(heads_out.reshape(b, n, h * d))
    return (out, key_att) if with_key_attention else out


@jax.named_scope("key_attention")
def key_attention(q: jax.Array, k: jax.Array, num_queries: int = KEY_ATTENTION_QUERIES) -> jax.Array:
    """Mean attention probability each key receives, estimated from evenly strided queries.

    q, k: (B, N, heads, head_dim) -> (B, N). Costs num_queries * N per head instead of N * N, and
    never touches the full probability matrix, so the main attention keeps its flash path.
    The logits are float32: products of q and k in their own dtype (exact for bfloat16) summed
    in float32, so a bfloat16 k is never copied to float32 (a pass over all of k per block).
    """
    q_sub = q[:, ::_key_attention_stride(q.shape[1], num_queries)]  # (B, Q, h, d)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q_sub, k, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1)  # (B, h, Q, N)
    return probs.mean(axis=(1, 2))


class Attention(nnx.Module):
    """Self-attention with a fused qkv projection (bias on), as in DiT / timm."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = nnx.Linear(dim, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    @jax.named_scope("attention")
    def __call__(
        self, x: jax.Array, bias: jax.Array | None = None, *, with_key_attention: bool = False, query_start: int = 0
    ):
        """x (B, N, D) -> (B, N - query_start, D); with `with_key_attention` also the (B, N)
        key-attention score. bias: additive logits, broadcastable to (B, heads, N - query_start, N).
        query_start: only the tokens from this one on query (all N are keys and values); the
        others' query projections are never computed."""
        b, n, d = x.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        if query_start:
            q = project(self.qkv, x[:, query_start:], 0, d).reshape(b, n - query_start, heads, head_dim)
            kv = project(self.qkv, x, d, 3 * d).reshape(b, n, 2, heads, head_dim)
            k, v = kv[:, :, 0], kv[:, :, 1]
        else:
            qkv = self.qkv(x).reshape(b, n, 3, heads, head_dim)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, h, hd)
        return _attend_and_project(self.proj, q, k, v, bias, with_key_attention)


def project(linear: nnx.Linear, x: jax.Array, start: int, stop: int) -> jax.Array:
    """`linear(x)[..., start:stop]` without computing the other output features (as
    `nnx.Linear.__call__` does, on a slice of its kernel and bias)."""
    kernel = linear.kernel[...][:, start:stop]
    bias = None if linear.bias is None else linear.bias[...][start:stop]
    x, kernel, bias = linear.promote_dtype((x, kernel, bias), dtype=linear.dtype)
    y = linear.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=linear.precision)
    return y if bias is None else y + bias


class MultiHeadAttention(nnx.Module):
    """Attention with separate q, k, v and output projections (bias on), as PixArt's blocks have
    them in diffusers. Self-attention on x, or cross-attention from x to `context`."""

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, rngs: nnx.Rngs, dtype):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        context_dim = dim if context_dim is None else context_dim
        self.q = nnx.Linear(dim, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.k = nnx.Linear(context_dim, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.v = nnx.Linear(context_dim, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.proj = nnx.Linear(dim, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)

    @jax.named_scope("attention")
    def __call__(
        self,
        x: jax.Array,  # (B, N, D) queries
        context: jax.Array | None = None,  # (B, S, C) keys and values; None: x
        bias: jax.Array | None = None,  # additive, broadcastable to (B, heads, N, S)
        *,
        with_key_attention: bool = False,
        query_start: int = 0,
    ):
        """-> (B, N - query_start, D); with `with_key_attention` also the (B, S) key-attention
        score (IDM). query_start: only x's tokens from this one on query (as in `Attention`)."""
        context = x if context is None else context
        b, _, d = x.shape
        s = context.shape[1]
        head_dim = d // self.num_heads
        x = x[:, query_start:]
        n = x.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, head_dim)
        k = self.k(context).reshape(b, s, self.num_heads, head_dim)
        v = self.v(context).reshape(b, s, self.num_heads, head_dim)
        return _attend_and_project(self.proj, q, k, v, bias, with_key_attention)


def merged_self_attention(
    attn: nnx.Module,
    h: jax.Array,  # (B, N, D) the block's modulated input, also the merge metric
    merger: BlockMerger | None,
    state: MergeState | None,
    grid: tuple[int, int] | None,
    plans: tuple | None = None,
) -> tuple[jax.Array, tuple, MergeState | None]:
    """A block's self-attention as a merging strategy asks -> (output (B, N, D), (attn_plan,
    mlp_plan), state).

    plans: reuse these (built by an earlier block, `plan_every`) instead of asking the merger.
    A merger with `proportional_attention` set adds log(group size) to merged keys' logits.
    A merger that ranks tokens by the attention they receive (IDM) gets it from a full
    self-attention, and may then merge the MLP input only.
    """
    if plans is None and merger is None:
        return attn(h), (None, None), state
    if plans is None and merger.needs_key_attention:
        out, key_att = attn(h, with_key_attention=True)
        with jax.named_scope("merge_plan"):
            attn_plan, mlp_plan, state = merger.build(h, state, grid=grid, key_attention=key_att)
        if attn_plan is not None:
            raise ValueError("a merger that needs key attention cannot merge attention inputs")
        return out, (attn_plan, mlp_plan), state
    if plans is None:
        plans, state = build_plans(merger, h, state, grid)
    attn_plan = plans[0]
    return unmerge(attn_plan, attn(merge(attn_plan, h), bias=merged_key_bias(merger, attn_plan))), plans, state


def build_plans(merger: BlockMerger, h: jax.Array, state: MergeState, grid: tuple[int, int]) -> tuple[tuple, MergeState]:
    """((attn_plan, mlp_plan), state) from a merger that needs no key attention, for metric h (B, N, D)."""
    with jax.named_scope("merge_plan"):
        attn_plan, mlp_plan, state = merger.build(h, state, grid=grid)
    return (attn_plan, mlp_plan), state


def merged_key_bias(merger: BlockMerger | None, attn_plan) -> jax.Array | None:
    """ToMe's proportional attention, when the merger asks for it: log(group size) on every
    merged key's logits, (B, 1, 1, M); else None."""
    if attn_plan is None or not getattr(merger, "proportional_attention", False):
        return None
    return log_group_size(attn_plan)[:, None, None, :]
