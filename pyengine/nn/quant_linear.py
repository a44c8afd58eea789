"""QuantLinear: a drop-in replacement of nn.Linear holding a canonical quantized weight."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import qlinear
from ..ops.act_quant import check_act_bits
from ..format.qweight import QuantizedWeight, padded_in_features
from ..quant.rtn import quantize
from ..quant.recipe import QuantConfig


def register_group_params(layer: nn.Module, kp: int, bias: bool, dtype: torch.dtype,
                          device) -> None:
    """Registers the per-group ``scales`` and ``zeros`` buffers ([out_features, groups] of
    ``dtype``; zeros None when ``layer.symmetric``) and the ``bias`` parameter (frozen; None
    unless ``bias``) of a quantized linear layer whose rows are padded to ``kp`` codes."""
    n_groups = 1 if layer.group_size == -1 else kp // layer.group_size
    layer.register_buffer("scales", torch.empty(layer.out_features, n_groups, dtype=dtype,
                                                device=device))
    layer.register_buffer("zeros", None if layer.symmetric else torch.empty(
        layer.out_features, n_groups, dtype=dtype, device=device))
    if bias:
        layer.bias = nn.Parameter(torch.empty(layer.out_features, dtype=dtype, device=device),
                                  requires_grad=False)
    else:
        layer.register_parameter("bias", None)


def adopt_group_params(layer: nn.Module, weight, bias: Optional[torch.Tensor]) -> None:
    """Gives a quantized layer built on the meta device ``weight``'s scales and zeros (the very
    tensors) and a frozen copy of ``bias`` in the weight's dtype (None: none), then rebuilds
    its weight view; ``weight``: a QuantizedWeight or MatryoshkaWeight of the layer's shape."""
    layer.scales = weight.scales
    if weight.zeros is not None:
        layer.zeros = weight.zeros
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    layer._refresh_weight()


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + bias, computed by pyengine's one linear op (pyengine.ops.qlinear).

    Buffers (the canonical format of docs/FORMAT.md, saved as they are):
        qweight: int32 [out_features, padded_in * bits / 32]
        scales:  [out_features, groups] (fp32 / fp16 / bf16)
        zeros:   [out_features, groups], absent for symmetric weights
    Parameter:
        bias: [out_features] or None
    Attribute:
        act_bits: 0, or 8 to quantize the input to int8 per block of 32 first
            (pyengine.ops.act_quant; QuantConfig.act_bits).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int,
                 group_size: int, symmetric: bool = False, dtype: torch.dtype = torch.float16,
                 device: Optional[torch.device | str] = None, method: str = "rtn",
                 act_bits: int = 0) -> None:
        super().__init__()
        self.act_bits = check_act_bits(act_bits, "QuantLinear.act_bits")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.symmetric = bool(symmetric)
        self.method = method
        # (ProjectionGroup, index) once fuse_projections() has joined this layer with the layers
        # that read the same input (see modules/fusion.py); None otherwise.
        self._fusion = None
        kp = padded_in_features(self.in_features, self.group_size)
        self._register_codes(kp, device)
        register_group_params(self, kp, bias, dtype, device)
        self._refresh_weight()

    def _register_codes(self, kp: int, device) -> None:
        """Registers the code buffers of a weight whose rows are padded to ``kp`` codes (here
        ``qweight``; MatryoshkaLinear: its bit planes)."""
        self.register_buffer("qweight", torch.empty(self.out_features, kp * self.bits // 32,
                                                    dtype=torch.int32, device=device))

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_weight(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                    act_bits: int = 0) -> "QuantLinear":
        """Wraps an existing quantized weight (tensors are shared, not copied)."""
        n, k = qw.shape
        layer = cls(k, n, bias is not None, qw.bits, qw.group_size, qw.symmetric, qw.dtype,
                    device="meta", method=qw.method, act_bits=act_bits)
        layer.qweight = qw.qweight
        adopt_group_params(layer, qw, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig,
                    scale_dtype: Optional[torch.dtype] = None,
                    input_weights: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantizes ``linear`` with RTN (scales in the weight's dtype unless given;
        ``input_weights`` [in_features]: each input's cost, as in pyengine.quantize)."""
        if config.method != "rtn":
            raise ValueError(f"QuantLinear.from_linear does RTN only; method {config.method!r} "
                             f"runs through pyengine.compress with calibration data")
        qw = quantize(linear.weight.detach(), config.bits, config.group_size, config.symmetric,
                      scale_dtype=scale_dtype, input_weights=input_weights)
        return cls.from_weight(qw, linear.bias, act_bits=config.act_bits)

    # ---- the weight object --------------------------------------------------------------------
    # forward() uses a QuantizedWeight view of the buffers built here, outside forward, so that
    # tracing (torch.compile) sees a plain attribute read. It is rebuilt whenever the buffers
    # change: after .to()/.cuda()/.half() and after load_state_dict.
    def _refresh_weight(self) -> None:
        fusion = getattr(self, "_fusion", None)
        if fusion is not None and fusion[0].weight is not None:
            fusion[0].unbind()  # our buffers changed: the fused copy must be rebuilt from them
        self._qw = QuantizedWeight(self.qweight, self.scales, self.zeros, bits=self.bits,
                                   group_size=self.group_size,
                                   shape=(self.out_features, self.in_features), method=self.method)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return self._qw

    @property
    def op_weight(self) -> QuantizedWeight:
        """The weight as the ops take it (pyengine.ops.qlinear): the QuantizedWeight view of the
        buffers (a MatryoshkaLinear gives its current slice of the planes)."""
        return self._qw

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._refresh_weight()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fusion = self._fusion
        if fusion is not None:
            return fusion[0].output(x, fusion[1])  # one op for all layers reading x
        return qlinear(x, self._qw, self.bias, act_bits=self.act_bits)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight [out_features, in_features]."""
        return self.quantized_weight.dequantize(dtype)

    def to_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """An nn.Linear holding the dequantized weight (and the bias)."""
        dtype = dtype or self.scales.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=dtype)
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return linear

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight, scales, zeros and bias."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.zeros, self.bias) if t is not None)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        acts = f", act_bits={self.act_bits}" if self.act_bits else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"{kind}, scales={self.scales.dtype}{acts}")
