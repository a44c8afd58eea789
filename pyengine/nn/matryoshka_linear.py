"""MatryoshkaLinear: a QuantLinear holding an int8 parent in bit planes, served at a precision r.

The layer stores the parent once (three bit planes, scales, zeros: docs/FORMAT.md) and a plain
int ``precision`` (8, 6, 4, 3 or 2). Its forward is pyengine's one linear op on the slice
``weight.at(precision)``, which hands the kernels only the planes the r-bit slice reads. Switching
precision (:meth:`MatryoshkaLinear.set_precision`, :func:`pyengine.set_precision`) changes that
int and nothing else: no re-quantization, no copy of the weight, no cache to rebuild.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..matryoshka.weight import (LAYOUT, PARENT_BITS, PLANE_BITS, PLANE_NAMES, MatryoshkaView,
                                 MatryoshkaWeight, check_precision)
from ..ops import qlinear
from ..format.qweight import QuantizedWeight
from ..quant.rtn import quantize
from ..quant.recipe import QuantConfig
from .quant_linear import QuantLinear, adopt_group_params


class MatryoshkaLinear(QuantLinear):
    """y = x @ W_r^T + bias for the r-bit slice W_r of an int8 parent, r = ``self.precision``.

    Buffers (saved as they are; the parent, once):
        plane_hi:  int32 [out_features, Kp * 3 / 32]   bits 7..5 of the parent codes
        plane_mid: int32 [out_features, Kp * 2 / 32]   bits 4..3
        plane_lo:  int32 [out_features, Kp * 3 / 32]   bits 2..0
        scales:    [out_features, groups] (fp32 / fp16 / bf16)
        zeros:     [out_features, groups], absent for symmetric parents
    Parameter:
        bias: [out_features] or None
    Attributes:
        bits: 8 (the stored parent); precision: the slice served, in (8, 6, 4, 3, 2).

    ``op_weight`` is the current slice as the ops take it (``MatryoshkaView``: the planes, no
    copy); ``quantized_weight`` is that slice as a canonical QuantizedWeight, assembled on each
    access (a copy of r bits per weight, for callers that need the canonical format).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 symmetric: bool = False, dtype: torch.dtype = torch.float16,
                 device: Optional[torch.device | str] = None, method: str = "rtn",
                 precision: int = PARENT_BITS) -> None:
        precision = check_precision(precision)
        # a parent serves its input as it is (QuantConfig.act_bits)
        super().__init__(in_features, out_features, bias, PARENT_BITS, group_size, symmetric,
                         dtype, device, method, act_bits=0)
        self.precision = precision

    def _register_codes(self, kp: int, device) -> None:
        for name in PLANE_NAMES:
            self.register_buffer(name, torch.empty(self.out_features, kp * PLANE_BITS[name] // 32,
                                                   dtype=torch.int32, device=device))

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: MatryoshkaWeight, bias: Optional[torch.Tensor] = None,
                    precision: int = PARENT_BITS) -> "MatryoshkaLinear":
        """Wraps a MatryoshkaWeight (tensors are shared, not copied)."""
        if not isinstance(weight, MatryoshkaWeight):
            raise TypeError(f"MatryoshkaLinear.from_weight needs a MatryoshkaWeight, got "
                            f"{type(weight).__name__}")
        n, k = weight.shape
        layer = cls(k, n, bias is not None, weight.group_size, weight.symmetric, weight.dtype,
                    device="meta", method=weight.method, precision=precision)
        for name in PLANE_NAMES:
            setattr(layer, name, getattr(weight, name))
        adopt_group_params(layer, weight, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig,
                    scale_dtype: Optional[torch.dtype] = None,
                    precision: int = PARENT_BITS) -> "MatryoshkaLinear":
        """A plain int8 parent of ``linear`` by RTN with clipping search (``config.method`` must
        be "rtn"; "matquant" runs through pyengine.compress with calibration data)."""
        if not config.matryoshka or config.method != "rtn":
            raise ValueError(f"MatryoshkaLinear.from_linear makes RTN parents (QuantConfig(bits=8, "
                             f"matryoshka=True)); got {config}")
        qw = quantize(linear.weight.detach(), PARENT_BITS, config.group_size, config.symmetric,
                      scale_dtype=scale_dtype)
        return cls.from_weight(MatryoshkaWeight.from_quantized(qw), linear.bias, precision)

    # ---- the weight object --------------------------------------------------------------------
    def _refresh_weight(self) -> None:
        self._mw = MatryoshkaWeight(self.plane_hi, self.plane_mid, self.plane_lo, self.scales,
                                    self.zeros, group_size=self.group_size,
                                    shape=(self.out_features, self.in_features),
                                    method=self.method)

    @property
    def matryoshka_weight(self) -> MatryoshkaWeight:
        return self._mw

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The current slice as a canonical QuantizedWeight (assembled now; not cached)."""
        return self._mw.slice(self.precision)

    @property
    def op_weight(self) -> MatryoshkaView:
        """The current slice as the ops take it: the parent's planes at ``precision``."""
        return self._mw.at(self.precision)

    def set_precision(self, precision: int) -> None:
        """Serves the r-bit slice from now on (r in 8, 6, 4, 3, 2); changes nothing else."""
        self.precision = check_precision(precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self._mw.at(self.precision), self.bias)

    def dequantize(self, dtype: Optional[torch.dtype] = None,
                   precision: Optional[int] = None) -> torch.Tensor:
        """The dense weight [out_features, in_features] of the r-bit slice (default: the current
        precision)."""
        return self._mw.dequantize(self.precision if precision is None else precision, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the planes, scales, zeros and bias."""
        return self._mw.nbytes + (0 if self.bias is None
                                  else self.bias.numel() * self.bias.element_size())

    def stored_tensors(self):
        """The tensors of the stored parent (planes, scales, zeros) and the bias."""
        return tuple(t for t in (self.plane_hi, self.plane_mid, self.plane_lo, self.scales,
                                 self.zeros, self.bias) if t is not None)

    def checkpoint_info(self) -> Dict[str, Any]:
        """What a checkpoint records about the Matryoshka side of this layer."""
        return {"layout": LAYOUT, "parent_bits": PARENT_BITS, "precision": self.precision}

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, parent_bits=8, precision={self.precision}, "
                f"group_size={self.group_size}, {kind}, scales={self.scales.dtype}")
