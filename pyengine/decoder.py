"""A lean decode loop for decoder-only models: the arithmetic of a Hugging Face forward, prepared
once, run as a short list of calls.

A transformers forward of one token walks ~20 modules per decoder layer and runs ~100 small
tensor ops (masks, cache bookkeeping, shape checks, dtype casts) around the few that matter. On a
CPU at batch 1 that Python and dispatcher work costs several times the weight reads of a small
compressed model. :class:`Decoder` keeps the model's own modules and weights (nothing is copied)
and runs, per layer and step::

    h = rms_norm(x)                         one call
    qkv = [q|k|v]_proj(h)                   one linear (a fused projection group) or three
    q, k = rope(q, k)                       cos/sin tables for every position, made once
    cache[pos] = k, v                       a static KV cache, [B, kv_heads, max_len, head_dim]
    a = attention(q, cache[:pos + 1])       scaled_dot_product_attention (GQA)
    x += o_proj(a)                          accumulated in place by the kernel
    h = rms_norm(x)
    x += down_proj(silu(gate(h)) * up(h))   gate/up fused when the layers are; a rotated MLP
                                            turns down_proj's input by its online Walsh-Hadamard
                                            transform first (pyengine.ops.hadamard)

Linear layers run through pyengine.ops (every weight kind, every backend); a quantized layer on
the ``cpu`` backend is called through a prepared kernel call (pyengine.ops.bind_linear: pointers
and sizes bound once, the output accumulated into the residual stream by the kernel);
int8-activation layers on the AVX2 and AVX-512 builds read a copy of their weight with rows
interleaved by eights, whose size :attr:`Decoder.prepared_bytes` reports (``layout_copy=False``:
no copy, the canonical rows). When every linear of every layer is such a call, the whole step of
the layers is recorded once as a native ``StepProgram`` (csrc/cpu/decode_ops.h: the matmuls,
norms and attention in order on buffers of its own; the final norm and the head too where the
head is such a call, :attr:`Decoder.head_in_program`; the table lookup too where the embedding
is a quantized table without a projection) and a decode step costs one native call (plus the
embedding row from Python for other tables); with several threads each run takes the parallel
or the one-thread schedule, whichever has been faster lately (:attr:`Decoder.adaptive_schedule`:
on a busy machine, one thread), and a head outside the program follows the step's choice. The
result is the model's own forward, checked against it in tests/test_decoder.py on every supported
family, dense and compressed.

Supported: the llama, mistral, qwen2, qwen3 and phi3 families (pyengine.model.adapters), also
rotated (Recipe.rotate: scale-free norms, a tied table's projections), full rotary embeddings of
any static scaling (default, linear, llama3, yarn), batches of equal-length prompts, greedy
generation. Anything else (sliced models, gemma2, sliding windows shorter than
the cache, position-dependent rope scaling) is named by :func:`decoder_blocker`;
:func:`pyengine.generate` then falls back to transformers' ``generate``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._ext import DTYPE_CODES, extension
from .model.adapters import UnsupportedModelError, get_adapter
from .ops.hadamard import hadamard_transform
from .ops.linear import bind_linear

Tensor = torch.Tensor

DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class DecoderUnsupported(ValueError):
    """The model has a structure :class:`Decoder` does not run (see :func:`decoder_blocker`)."""


# ---- what the decoder can run ---------------------------------------------------------------

def _norm_params(norm: nn.Module, hidden: int) -> Optional[tuple]:
    """(weight or None, eps, projection or None) of a norm the decoder runs, else None: an
    RMSNorm of the transformers kind (y = w * x / rms(x)), or a rotated model's scale-free
    :class:`~pyengine.nn.SlicedRMSNorm` at full width (weight None: the scale is folded
    into the next linears; projection [D, D]: the final norm of a tied model maps the stream
    back to the table's basis)."""
    from .nn.sliced import SlicedRMSNorm
    if isinstance(norm, SlicedRMSNorm):
        if norm.width != hidden or norm.normalizer_dim != hidden:
            return None
        projection = norm.projection
        if projection is not None and tuple(projection.shape) != (hidden, hidden):
            return None
        return None, float(norm.eps), projection
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, Tensor) or eps is None or getattr(norm, "bias", None) is not None:
        return None
    if "RMSNorm" not in type(norm).__name__:
        return None
    return weight, float(eps), None


def _norm_in(norm: nn.Module, hidden: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """(weight in ``dtype``, eps) of a norm :func:`_norm_params` accepts (a copy when the dtype
    differs: norms are small; ones for a scale-free norm)."""
    weight, eps, _ = _norm_params(norm, hidden)
    if weight is None:
        return torch.ones(hidden, dtype=dtype, device=device), eps
    return weight.detach().to(dtype), eps


def _rotated_layer_blocker(layer: nn.Module, hidden: int) -> str:
    """Why a folded decoder layer (rotated or sliced) cannot run in the decoder, or ""."""
    from .nn.sliced import SlicedDecoderLayer
    if not isinstance(layer, SlicedDecoderLayer):
        return ""
    for out in (layer.attn_out, layer.mlp_out):
        if out.shortcut is not None or out.out_features != hidden:
            return "it is sliced (per-layer widths and shortcut matrices)"
    return ""


def decoder_blocker(model: nn.Module, max_len: Optional[int] = None) -> str:
    """Why :class:`Decoder` cannot run ``model`` (one line), or "" when it can."""
    try:
        adapter = get_adapter(model)
    except UnsupportedModelError as exc:
        return str(exc)
    if adapter.family not in DECODER_FAMILIES:
        return (f"the lean decoder runs the {', '.join(DECODER_FAMILIES)} families, not "
                f"{adapter.family}")
    config = model.config
    hidden = int(config.hidden_size)
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):
        why = _rotated_layer_blocker(layer, hidden)
        if why:
            return why
        for name in (adapter.attn_norm, adapter.mlp_norm):
            norm_params = _norm_params(layer.get_submodule(name), hidden)
            if norm_params is None or norm_params[2] is not None:
                return (f"layer {i}'s {name} is a {type(layer.get_submodule(name)).__name__}, "
                        f"not an RMSNorm (a sliced or otherwise rewritten model)")
    if _norm_params(model.get_submodule(adapter.final_norm), hidden) is None:
        return "the final norm is not an RMSNorm over the full hidden size"
    rotary = getattr(model.get_submodule(adapter.layers.rsplit(".", 1)[0]), "rotary_emb", None)
    if rotary is None:
        return "the model has no shared rotary embedding module"
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return (f"rope type {rope_type!r} depends on the sequence length; the lean decoder runs "
                f"{', '.join(STATIC_ROPE_TYPES)}")
    head_dim = _head_dim(config)
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0) or \
            2 * rotary.inv_freq.numel() != head_dim:
        return "partial rotary embeddings are not supported"
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True) is not False
    if uses_window and max_len is not None and max_len > window:
        return (f"the sliding window ({window} tokens) is shorter than the cache ({max_len}); "
                f"use max_len <= {window}")
    return ""


def _model_dtype_and_device(model: nn.Module, final_norm: nn.Module) -> tuple:
    """The dtype the model computes in and its device: the final norm's weight's, or for a
    rotated model (scale-free norms) the config's dtype and the first parameter's device."""
    weight = getattr(final_norm, "weight", None)
    if isinstance(weight, Tensor):
        return weight.dtype, weight.device
    device = next(model.parameters()).device
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return (dtype if isinstance(dtype, torch.dtype) else torch.float32), device


def _embedding_lookup(embed: nn.Module, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """ids [B, T] -> rows [B, T, D]. A rotated tied model's table is looked up in its own basis
    and projected in the decoder's dtype (the module would multiply in the table's dtype: a
    16-bit GEMV is slow on a CPU)."""
    projection = getattr(embed, "projection", None)
    if projection is None:
        return embed
    projection = projection.detach().to(dtype)
    from .nn.quant_embedding import QuantEmbedding
    if isinstance(embed, QuantEmbedding):
        from .ops.embedding import qembedding
        weight = embed.quantized_weight
        return lambda ids: qembedding(ids, weight, dtype=dtype) @ projection
    table = embed.weight
    return lambda ids: F.embedding(ids, table).to(dtype) @ projection


def _native_step_ops(device: torch.device, dtype: torch.dtype):
    """pyengine._C when it has the CPU step operations and the model runs on the CPU, else
    None (torch ops are used)."""
    if device.type != "cpu" or dtype not in DTYPE_CODES:
        return None
    ext = extension()
    if ext is None or not hasattr(ext, "attention_step_cpu"):
        return None
    return ext


def _native_embedding_table(embed: nn.Module, hidden: int,
                            device: torch.device) -> "Optional[tuple]":
    """(QuantizedWeight, output dtype) of an embedding whose lookup a step program can do
    natively (``StepProgram.add_embedding``): a QuantEmbedding on the CPU, of the stream's width,
    without a projection, its tensors' rows contiguous; else None."""
    from .nn.quant_embedding import QuantEmbedding
    if (device.type != "cpu" or not isinstance(embed, QuantEmbedding)
            or type(embed).forward is not QuantEmbedding.forward
            or embed.projection is not None or embed.embedding_dim != hidden
            or embed.dtype not in DTYPE_CODES):
        return None
    qw = embed.quantized_weight
    if any(t is not None and t.stride(-1) != 1 for t in (qw.qweight, qw.scales, qw.zeros)):
        return None
    return qw, embed.dtype


def _step_isa(layers) -> str:
    """The instruction-set build of a step's own operations (norms, attention, SiLU): that of
    its prepared matmul calls where they agree (a backend of one build, e.g. CpuBackend("avx2")),
    else "" (the best this CPU runs)."""
    isas = {getattr(getattr(c.kernel, "native_call", None), "isa", "")
            for layer in layers for c in layer.linears()}
    return isas.pop() if len(isas) == 1 else ""


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


# ---- linear layers as prepared calls --------------------------------------------------------

class _Linear:
    """One linear step of the loop: ``y = f(x)`` or ``acc += f(x)`` for x [m, in] contiguous.

    Prepared kernel calls (quantized weights on the cpu backend) write or accumulate straight into
    their target; anything else runs the module (or the fused group's op) and adds."""

    def __init__(self, out_features: int,
                 kernel: Optional[Callable[[Tensor, Tensor, bool], None]] = None,
                 run: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.out_features = out_features
        self.kernel = kernel
        self.run = run

    def __call__(self, x: Tensor, threads: Optional[int] = None) -> Tensor:
        """f(x); a prepared kernel call on at most ``threads`` threads (None: torch's)."""
        if self.kernel is not None:
            y = x.new_empty(x.shape[0], self.out_features)
            self.kernel(x, y, False, threads)
            return y
        return self.run(x)

    def accumulate(self, x: Tensor, acc: Tensor) -> None:
        if self.kernel is not None:
            self.kernel(x, acc, True)
        else:
            acc.add_(self.run(x))


def _module_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype a module computes in: its scales' (quantized layers) or first float tensor's."""
    scales = getattr(module, "scales", None)
    if isinstance(scales, Tensor):
        return scales.dtype
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _in_dtype(run: Callable[[Tensor], Tensor], module_dtype: Optional[torch.dtype],
              dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``run`` fed and answering in ``dtype`` when the module computes in another one."""
    if module_dtype is None or module_dtype == dtype:
        return run
    return lambda x: run(x.to(module_dtype)).to(dtype)


def _prepare_linear(module: nn.Module, device: torch.device, dtype: torch.dtype,
                    layout_copy: bool = True) -> _Linear:
    from .nn.quant_linear import QuantLinear
    if isinstance(module, QuantLinear) and type(module).op_weight is QuantLinear.op_weight:
        # the kernel reads activations and writes outputs in the decoder's dtype whatever the
        # dtype of the scales
        kernel = bind_linear(module.quantized_weight, module.bias, act_bits=module.act_bits,
                             device=device, dtype=dtype, layout_copy=layout_copy)
        if kernel is not None:
            return _Linear(module.out_features, kernel=kernel)
        weight, bias, act_bits = module.quantized_weight, module.bias, module.act_bits
        from .ops.linear import qlinear
        return _Linear(module.out_features, run=_in_dtype(
            lambda x: qlinear(x, weight, bias, act_bits=act_bits), module.scales.dtype, dtype))
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return _Linear(module.out_features, run=_in_dtype(
            lambda x: F.linear(x, weight, bias), weight.dtype, dtype))
    return _Linear(int(getattr(module, "out_features")),
                   run=_in_dtype(module, _module_dtype(module), dtype))


def _prepare_inputs(members: Sequence[nn.Module], device: torch.device, dtype: torch.dtype,
                    layout_copy: bool = True) -> List[_Linear]:
    """The projections that read one input: one call when they form a fused projection group
    (pyengine.fuse_projections), one per layer otherwise."""
    fusion = getattr(members[0], "_fusion", None)
    if len(members) > 1 and fusion is not None:
        group = fusion[0]
        if list(group.members) == list(members):
            if group.weight is None:
                group.bind()
            first = members[0]
            kernel = bind_linear(group.weight, group.bias, act_bits=first.act_bits,
                                 device=device, dtype=dtype, layout_copy=layout_copy)
            if kernel is not None:
                return [_Linear(group.out_features, kernel=kernel)]
            from .ops.linear import qlinear
            weight, bias, act_bits = group.weight, group.bias, first.act_bits
            return [_Linear(group.out_features, run=_in_dtype(
                lambda x: qlinear(x, weight, bias, act_bits=act_bits), weight.scales.dtype,
                dtype))]
    return [_prepare_linear(m, device, dtype, layout_copy) for m in members]


def _run_inputs(calls: List[_Linear], x: Tensor) -> Tensor:
    if len(calls) == 1:
        return calls[0](x)
    return torch.cat([c(x) for c in calls], dim=-1)


class _Layer:
    """One decoder layer's prepared pieces."""

    def __init__(self, layer: nn.Module, adapter, hidden: int, device, dtype,
                 layout_copy: bool = True) -> None:
        from .nn.sliced import ResidualProjection
        attn = layer.get_submodule(adapter.attn)
        mlp = layer.get_submodule(adapter.mlp)

        def output(module: nn.Module) -> nn.Module:  # a rotated model's projections add x
            return module.proj if isinstance(module, ResidualProjection) else module

        self.attn_norm = _norm_in(layer.get_submodule(adapter.attn_norm), hidden, dtype, device)
        self.mlp_norm = _norm_in(layer.get_submodule(adapter.mlp_norm), hidden, dtype, device)
        self.qkv = _prepare_inputs([attn.get_submodule(n) for n in adapter.attn_inputs],
                                   device, dtype, layout_copy)
        self.o_proj = _prepare_linear(output(attn.get_submodule(adapter.attn_output)), device,
                                      dtype, layout_copy)
        self.gate_up = _prepare_inputs([mlp.get_submodule(n) for n in adapter.mlp_inputs],
                                       device, dtype, layout_copy)
        down = mlp.get_submodule(adapter.mlp_output)
        self.down = _prepare_linear(output(down), device, dtype, layout_copy)
        # the block of down_proj's online Walsh-Hadamard transform (0: none)
        self.down_hadamard = getattr(down, "hadamard_block", 0)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = None if q_norm is None else _norm_in(q_norm, q_norm.weight.numel(), dtype,
                                                           device)
        self.k_norm = None if k_norm is None else _norm_in(k_norm, k_norm.weight.numel(), dtype,
                                                           device)

    def linears(self) -> List[_Linear]:
        """The layer's linear steps in the order they run."""
        return [*self.qkv, self.o_proj, *self.gate_up, self.down]

    def bind_native(self) -> None:
        """(pointer, dtype code, eps) of the norms for the native step operations."""
        def native(norm):
            return norm[0].data_ptr(), DTYPE_CODES[norm[0].dtype], norm[1]
        self.attn_norm_native = native(self.attn_norm)
        self.mlp_norm_native = native(self.mlp_norm)
        if self.q_norm is None:
            self.qk_norm_native = (0, 0, 0, 0.0)
        else:
            if self.q_norm[0].dtype != self.k_norm[0].dtype:
                raise DecoderUnsupported("q_norm and k_norm weights differ in dtype")
            self.qk_norm_native = (self.q_norm[0].data_ptr(), self.k_norm[0].data_ptr(),
                                   DTYPE_CODES[self.q_norm[0].dtype], self.q_norm[1])


# ---- the decoder ----------------------------------------------------------------------------

class Decoder:
    """Greedy decoding of ``model`` with a static KV cache of ``max_len`` positions for ``batch``
    sequences, through prepared calls (see the module docstring).

    Args:
        model: a supported transformers causal LM, dense or compressed by pyengine (rotated or
            not; not sliced),
            in eval mode; its modules and weights are used in place.
        max_len: positions of the cache (prompt and generated tokens).
        batch: sequences decoded together (equal-length prompts, no padding).
        dtype: of the residual stream, KV cache, activations and logits. Default: float32 on
            a CPU (whose kernels compute in float32 and would only convert a 16-bit stream back
            and forth; weights, scales and tables stay in their stored dtype), the model's dtype
            elsewhere.
        layout_copy: let prepared calls hold copies of weights in a layout of their own where
            their kernels read it faster (the int8-activation layers on the CPU: rows
            interleaved by eights, faster from memory, as many bytes again as those layers:
            :attr:`prepared_bytes`). False keeps the decoder's memory to the model's own
            bytes.

    Raises DecoderUnsupported (with :func:`decoder_blocker`'s reason) for other models.
    """

    def __init__(self, model: nn.Module, max_len: int = 2048, batch: int = 1,
                 dtype: Optional[torch.dtype] = None, layout_copy: bool = True) -> None:
        if int(max_len) < 1 or int(batch) < 1:
            raise ValueError(f"max_len and batch must be >= 1, got {max_len} and {batch}")
        why = decoder_blocker(model, max_len)
        if why:
            raise DecoderUnsupported(f"pyengine.Decoder cannot run this model: {why}")
        self.model = model
        self.max_len, self.batch = int(max_len), int(batch)
        adapter = get_adapter(model)
        config = model.config
        embed = model.get_submodule(adapter.embed)
        final_norm = model.get_submodule(adapter.final_norm)
        hidden = int(config.hidden_size)
        model_dtype, self.device = _model_dtype_and_device(model, final_norm)
        if dtype is None:  # float32 on a CPU: its kernels compute in float32 whatever they read
            dtype = torch.float32 if self.device.type == "cpu" else model_dtype
        if dtype not in DTYPE_CODES:
            raise ValueError(f"Decoder: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.final_norm = _norm_in(final_norm, hidden, dtype, self.device)
        projection = _norm_params(final_norm, hidden)[2]
        # a rotated tied model's final norm maps the stream back to the table's basis
        self.final_projection = None if projection is None else projection.to(dtype)
        self.embed = _embedding_lookup(embed, dtype)
        self.layers = [_Layer(layer, adapter, hidden, self.device, self.dtype, layout_copy)
                       for layer in adapter.decoder_layers(model)]
        self.head = _prepare_linear(model.get_submodule(adapter.head), self.device, self.dtype,
                                    layout_copy)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = _head_dim(config)
        self.hidden = int(config.hidden_size)
        self.q_width = self.n_heads * self.head_dim
        self.kv_width = self.n_kv_heads * self.head_dim

        # cos / sin of every position, from the model's own rotary module (its scaling
        # included), laid out for rope on [rows, heads, head_dim]: rotate_half(x) * sin is
        # roll(x, half) * signed_sin with the first half's sin negated
        rotary = model.get_submodule(adapter.layers.rsplit(".", 1)[0]).rotary_emb
        positions = torch.arange(self.max_len, device=self.device).unsqueeze(0)
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = rotary(probe, positions)
        half = self.head_dim // 2
        self.cos = cos[0].to(self.dtype).contiguous()                         # [max_len, hd]
        signed = sin[0].to(self.dtype).clone()
        signed[:, :half].neg_()
        self.signed_sin = signed.contiguous()                                  # [max_len, hd]

        shape = (self.batch, self.n_kv_heads, self.max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                        for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                        for _ in self.layers]
        self.scale = self.head_dim ** -0.5
        self.native = _native_step_ops(self.device, self.dtype)
        if self.native is not None:
            for layer in self.layers:
                layer.bind_native()
        self.step_isa = _step_isa(self.layers)
        self._program_logits: Optional[Tensor] = None  # the program's head output, if any
        self._program_ids: Optional[Tensor] = None  # the ids its embedding op reads, if any
        self._native_table = _native_embedding_table(embed, hidden, self.device)
        self.program = self._step_program()
        # with several threads, each step program run takes whichever of the parallel and the
        # one-thread schedule has been faster lately (StepProgram.run); False: always parallel
        self.adaptive_schedule = True
        self.position = 0

    @property
    def prepared_bytes(self) -> int:
        """Bytes of weight copies the decoder's prepared calls hold besides the model's own
        weights: the CPU row-interleaved layout of the int8-activation layers
        (pyengine.backends.cpu.interleave_rows), 0 when none is prepared."""
        calls = [self.head] + [c for layer in self.layers for c in layer.linears()]
        return sum(getattr(c.kernel, "prepared_bytes", 0) for c in calls)

    def reset(self) -> None:
        """Forgets the cached sequence (the cache is overwritten, not cleared)."""
        self.position = 0

    # ---- one forward over m new tokens per sequence -------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: Tensor) -> Tensor:
        """Appends ``ids`` [batch, m] (int64) to the cached sequences; returns the logits of the
        last new position, [batch, vocab] in the decoder's dtype."""
        if ids.dim() == 1:
            ids = ids.unsqueeze(1)
        b, m = ids.shape
        if b != self.batch:
            raise ValueError(f"Decoder: ids has {b} sequences, the decoder was made for "
                             f"{self.batch}")
        start = self.position
        if m < 1 or start + m > self.max_len:
            raise ValueError(f"Decoder: {m} new tokens at position {start} do not fit a cache "
                             f"of {self.max_len} positions (make the Decoder with a larger "
                             f"max_len, or reset())")
        ids = ids.to(self.device)
        end = start + m
        head_threads = None
        if self.program is not None and m == 1:  # one native call
            x = self._run_program(ids, start)
            if self.head_in_program:  # the logits of this step, before the next overwrites them
                self.position = end
                return self._program_logits.clone()
            head_threads = self.program.last_run_threads  # the head on as many as it took
        elif self.native is not None and m == 1:
            x = self._native_step(self._embedded(ids), start)
        else:  # rope rows and the attention mask of the torch path
            x = self._embedded(ids)
            cos = self.cos[start:start + m].unsqueeze(1)                 # [m, 1, hd]
            sin = self.signed_sin[start:start + m].unsqueeze(1)
            mask = None
            causal = False
            if m > 1:
                if start == 0:
                    causal = True
                else:  # new token i sees cached positions <= start + i
                    mask = (torch.arange(end, device=self.device)
                            <= torch.arange(start, end, device=self.device).unsqueeze(1))
            x = self._torch_layers(x, b, m, start, cos, sin, mask, causal)
        self.position = end
        last = x.view(b, m, self.hidden)[:, -1]
        h = self._rms_norm(last.contiguous(), self.final_norm)
        if self.final_projection is not None:
            h = h @ self.final_projection
        return self.head(h, head_threads)

    # ---- the layers through torch ops (any device; prefill on the CPU) ------------------------
    def _torch_layers(self, x: Tensor, b: int, m: int, start: int, cos: Tensor, sin: Tensor,
                      mask: Optional[Tensor], causal: bool) -> Tensor:
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        half = hd // 2
        qk_heads = nh + nkv
        end = start + m
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache):
            h = self._rms_norm(x, layer.attn_norm)
            qkv = _run_inputs(layer.qkv, h)                          # [b*m, (nh + 2 nkv) hd]
            qk = qkv[:, :qk_heads * hd].view(b, m, qk_heads, hd)
            if layer.q_norm is not None:
                qk = torch.cat([F.rms_norm(qk[:, :, :nh], (hd,), layer.q_norm[0],
                                           eps=layer.q_norm[1]),
                                F.rms_norm(qk[:, :, nh:], (hd,), layer.k_norm[0],
                                           eps=layer.k_norm[1])], dim=2)
            # rope: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
            qk = torch.addcmul(qk * cos, torch.roll(qk, half, dims=-1), sin)
            v = qkv[:, qk_heads * hd:].view(b, m, nkv, hd)
            k_cache[:, :, start:end] = qk[:, :, nh:].transpose(1, 2)
            v_cache[:, :, start:end] = v.transpose(1, 2)
            q = qk[:, :, :nh].transpose(1, 2)                         # [b, nh, m, hd]
            attn = F.scaled_dot_product_attention(
                q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask, is_causal=causal,
                enable_gqa=nh != nkv)                                 # [b, nh, m, hd]
            attn = attn.transpose(1, 2).reshape(b * m, nh * hd)
            layer.o_proj.accumulate(attn, x)
            h = self._rms_norm(x, layer.mlp_norm)
            gate_up = _run_inputs(layer.gate_up, h)
            width = gate_up.shape[-1] // 2
            act = F.silu(gate_up[:, :width]).mul_(gate_up[:, width:])
            if layer.down_hadamard:
                act = hadamard_transform(act, layer.down_hadamard)
            layer.down.accumulate(act, x)
        return x

    # ---- one position through the native step operations (CPU) --------------------------------
    def _step_program(self):
        """Every layer's step as one pyengine._C.StepProgram on buffers of its own (the
        residual stream included), when the native step operations run and every linear of
        every layer is a prepared kernel call; else None (the step then calls them one by
        one from Python)."""
        ext = self.native
        if ext is None or not hasattr(ext, "StepProgram"):
            return None
        calls = [c for layer in self.layers for c in layer.linears()]
        if any(getattr(c.kernel, "native_call", None) is None for c in calls):
            return None
        code = DTYPE_CODES[self.dtype]
        b, d = self.batch, self.hidden
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        # buffers wide enough for every layer (each layer's own widths are recorded)
        widest = lambda group: max(sum(c.out_features for c in getattr(layer, group))  # noqa: E731
                                   for layer in self.layers)
        new = lambda cols: torch.empty(b, cols, dtype=self.dtype, device=self.device)  # noqa: E731
        x, h, attn = new(d), new(d), new(nh * hd)
        qkv, gate_up = new(widest("qkv")), new(widest("gate_up"))
        act = new(widest("gate_up") // 2)
        program = ext.StepProgram(self.step_isa)
        # the embedding rows open the program where the table is a quantized one the native
        # lookup reads (the ids of each step are written into _program_ids before the run)
        table = self._native_table
        ids_buffer = None
        if table is not None:
            qw, round_dtype = table
            ids_buffer = torch.zeros(b, dtype=torch.int64, device=self.device)
            program.add_embedding(
                ids_buffer.data_ptr(), b, qw.qweight.data_ptr(), qw.qweight.stride(0),
                qw.scales.data_ptr(), 0 if qw.zeros is None else qw.zeros.data_ptr(),
                qw.scales.stride(0), DTYPE_CODES[qw.scales.dtype], qw.bits, qw.group_size,
                qw.shape[0], d, x.data_ptr(), code, x.stride(0), DTYPE_CODES[round_dtype])

        def add_linear(kernel, source, target, accumulate):
            program.add_call(kernel.native_call, source.data_ptr(), source.stride(0),
                             target.data_ptr(), target.stride(0), source.shape[0], accumulate)

        def add_linears(linears, source, target):  # outputs side by side in target
            start = 0
            for c in linears:
                add_linear(c.kernel, source, target[:, start:start + c.out_features], False)
                start += c.out_features

        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache):
            w_ptr, w_code, eps = layer.attn_norm_native
            program.add_rms_norm(x.data_ptr(), code, d, w_ptr, w_code, h.data_ptr(), code, d, b,
                                 d, eps)
            add_linears(layer.qkv, h, qkv)
            qn_ptr, kn_ptr, norm_code, norm_eps = layer.qk_norm_native
            program.add_attention(qkv.data_ptr(), qkv.stride(0), k_cache.data_ptr(),
                                  v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
                                  self.cos.data_ptr(), self.signed_sin.data_ptr(), qn_ptr, kn_ptr,
                                  norm_code, norm_eps, attn.data_ptr(), nh * hd, code, b, nh,
                                  nkv, hd, self.max_len, self.scale)
            add_linear(layer.o_proj.kernel, attn, x, True)
            w_ptr, w_code, eps = layer.mlp_norm_native
            program.add_rms_norm(x.data_ptr(), code, d, w_ptr, w_code, h.data_ptr(), code, d, b,
                                 d, eps)
            add_linears(layer.gate_up, h, gate_up)
            width = sum(c.out_features for c in layer.gate_up) // 2
            program.add_silu_mul(gate_up.data_ptr(), gate_up.stride(0), act.data_ptr(),
                                 act.stride(0), code, b, width)
            if layer.down_hadamard:  # in place
                program.add_hadamard(act.data_ptr(), act.stride(0), act.data_ptr(),
                                     act.stride(0), code, b, width, layer.down_hadamard)
            add_linear(layer.down.kernel, act[:, :width], x, True)
        # the final norm and the head close the program where the head is a prepared call too
        # (no projection after the norm): the norm becomes the head's prologue, and the head
        # runs in the step's parallel region instead of a region of its own after it
        logits = None
        head_call = getattr(self.head.kernel, "native_call", None)
        if head_call is not None and self.final_projection is None:
            norm_weight, eps = self.final_norm
            program.add_rms_norm(x.data_ptr(), code, d, norm_weight.data_ptr(),
                                 DTYPE_CODES[norm_weight.dtype], h.data_ptr(), code, d, b, d, eps)
            logits = new(self.head.out_features)
            add_linear(self.head.kernel, h, logits, False)
        self._program_buffers = (x, h, attn, act, qkv, gate_up)
        self._program_logits = logits
        self._program_ids = ids_buffer
        return program

    @property
    def head_in_program(self) -> bool:
        """Whether the step program ends with the final norm and the head (their time is then
        in its profile; else they run after it, from Python)."""
        return self.program is not None and self._program_logits is not None

    def _embedded(self, ids: Tensor) -> Tensor:
        """The residual stream of ``ids`` [b, m]: their embedding rows, [b * m, hidden] in the
        decoder's dtype, a buffer of its own (the layers update it in place)."""
        x = torch.empty(ids.numel(), self.hidden, dtype=self.dtype, device=self.device)
        return x.copy_(self.embed(ids).reshape(ids.numel(), self.hidden))

    def _run_program(self, ids: Tensor, position: int) -> Tensor:
        """One step of ``ids`` [b, 1] through the step program; returns its residual stream
        (a program buffer, [b, hidden])."""
        stream = self._program_buffers[0]
        if self._program_ids is not None:  # the program looks the rows up itself
            self._program_ids.copy_(ids.view(-1))
        else:
            stream.copy_(self.embed(ids).reshape(stream.shape))
        self.program.run(position, torch.get_num_threads(), self.adaptive_schedule)
        return stream

    def _native_step(self, x: Tensor, position: int) -> Tensor:
        """One step of every layer through the native step operations, one call each (the
        decoders without a step program); x [b, hidden] is updated in place."""
        ext = self.native
        code = DTYPE_CODES[self.dtype]
        b, d = self.batch, self.hidden
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        threads = torch.get_num_threads()
        rms, attention, silu_mul = ext.rms_norm_cpu, ext.attention_step_cpu, ext.silu_mul_cpu
        isa = self.step_isa
        x_ptr = x.data_ptr()
        h = torch.empty_like(x)
        h_ptr = h.data_ptr()
        attn = x.new_empty(b, nh * hd)
        attn_ptr = attn.data_ptr()
        cos_ptr = self.cos.data_ptr()
        sin_ptr = self.signed_sin.data_ptr()
        cache_strides = (self.k_cache[0].stride(0), self.k_cache[0].stride(1))
        for layer, k_cache, v_cache in zip(self.layers, self.k_cache, self.v_cache):
            w_ptr, w_code, eps = layer.attn_norm_native
            rms(x_ptr, code, d, w_ptr, w_code, h_ptr, code, d, b, d, eps, isa=isa)
            qkv = _run_inputs(layer.qkv, h)
            qn_ptr, kn_ptr, norm_code, norm_eps = layer.qk_norm_native
            attention(qkv.data_ptr(), qkv.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                      *cache_strides, cos_ptr, sin_ptr, qn_ptr, kn_ptr, norm_code, norm_eps,
                      attn_ptr, nh * hd, code, b, nh, nkv, hd, position, self.scale, threads,
                      isa=isa)
            layer.o_proj.accumulate(attn, x)
            w_ptr, w_code, eps = layer.mlp_norm_native
            rms(x_ptr, code, d, w_ptr, w_code, h_ptr, code, d, b, d, eps, isa=isa)
            gate_up = _run_inputs(layer.gate_up, h)
            width = gate_up.shape[-1] // 2
            act = x.new_empty(b, width)
            silu_mul(gate_up.data_ptr(), gate_up.stride(0), act.data_ptr(), width, code, b,
                     width, isa=isa)
            if layer.down_hadamard:  # in place
                ext.hadamard_cpu(act.data_ptr(), width, act.data_ptr(), width, code, b, width,
                                 layer.down_hadamard, 1, isa=isa)
            layer.down.accumulate(act, x)
        return x

    def _rms_norm(self, x: Tensor, norm: tuple) -> Tensor:
        """x [rows, hidden] contiguous -> the RMS-normed rows (a new tensor)."""
        return F.rms_norm(x, (self.hidden,), norm[0], eps=norm[1])

    def prefill(self, ids: Tensor) -> Tensor:
        """Starts new sequences: resets, then :meth:`forward` over ``ids`` [batch, T]."""
        self.reset()
        return self.forward(ids)

    @torch.inference_mode()
    def generate(self, ids: Tensor, max_new_tokens: int,
                 eos_token_id: "int | Sequence[int] | None" = None) -> Tensor:
        """Greedy continuation of ``ids`` [batch, T] by up to ``max_new_tokens`` tokens; returns
        [batch, T + generated] (int64, on the model's device). Stops early once every sequence
        has produced an end token (later tokens of a finished sequence repeat that token)."""
        ids = ids.to(self.device)
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise ValueError(f"Decoder.generate: ids must be [{self.batch}, T], got "
                             f"{tuple(ids.shape)}")
        if ids.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"Decoder.generate: {ids.shape[1]} prompt + {max_new_tokens} new "
                             f"tokens exceed max_len={self.max_len}")
        stops = (set() if eos_token_id is None else
                 set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
        stop_ids = torch.tensor(sorted(stops), device=self.device, dtype=torch.long)
        done = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        out = [ids]
        logits = self.prefill(ids)
        for i in range(max_new_tokens):
            token = logits.argmax(dim=-1)
            if stops:
                token = torch.where(done, out[-1][:, -1], token)
                done |= torch.isin(token, stop_ids)
            out.append(token.unsqueeze(1))
            if i + 1 == max_new_tokens or (stops and bool(done.all())):
                break
            logits = self.forward(token.unsqueeze(1))
        return torch.cat(out, dim=1)


def generate(model: nn.Module, ids: Tensor, max_new_tokens: int,
             eos_token_id: "int | Sequence[int] | None" = None) -> Tensor:
    """Greedy generation of ``max_new_tokens`` tokens after ``ids`` [batch, T] (int64):
    [batch, T + generated]. Runs the lean :class:`Decoder` when it supports ``model``, else
    transformers' ``generate`` (same tokens, more overhead per step)."""
    if not decoder_blocker(model, ids.shape[-1] + max_new_tokens):
        decoder = Decoder(model, max_len=ids.shape[-1] + max_new_tokens, batch=ids.shape[0])
        return decoder.generate(ids, max_new_tokens, eos_token_id)
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens,
                  attention_mask=torch.ones_like(ids))
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
    else:
        kwargs["min_new_tokens"] = max_new_tokens
    with torch.inference_mode():
        return model.generate(ids.to(next(model.parameters()).device), **kwargs)
