"""QuantEmbedding: a token embedding whose table is a canonical quantized weight."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.embedding import qembedding
from ..format.qweight import QuantizedWeight, padded_in_features
from ..quant.rtn import quantize
from ..quant.recipe import QuantConfig
from .quant_linear import QuantLinear, register_group_params


class QuantEmbedding(nn.Module):
    """rows = dequant(W)[ids] (then ``@ projection`` when set), by pyengine.ops.qembedding.

    Buffers (the canonical format of docs/FORMAT.md, the table W [num_embeddings,
    embedding_dim] read as a weight of N = num_embeddings rows and K = embedding_dim inputs):
        qweight: int32 [num_embeddings, padded_dim * bits / 32]
        scales:  [num_embeddings, groups] (fp32 / fp16 / bf16; a frozen parameter)
        zeros:   [num_embeddings, groups], absent for symmetric tables
        projection: [embedding_dim, width] or None: the first layer's basis of a sliced model
            whose head stays tied to the unrotated table (pyengine.slicing; as in
            ProjectedEmbedding).
    Attribute:
        dtype: the dtype of the rows it returns (the model's activation dtype).

    A tied output head is a QuantLinear holding the *same* qweight / scales / zeros tensors
    (:meth:`tied_head`): one copy in memory and in a checkpoint.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 symmetric: bool = False, dtype: torch.dtype = torch.float16,
                 device: Optional[torch.device | str] = None, method: str = "rtn",
                 padding_idx: Optional[int] = None,
                 output_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.out_features, self.in_features = self.num_embeddings, self.embedding_dim
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.symmetric = bool(symmetric)
        self.method = method
        self.padding_idx = padding_idx
        self.dtype = output_dtype or dtype
        kp = padded_in_features(self.embedding_dim, self.group_size)
        self.register_buffer("qweight", torch.empty(self.num_embeddings, kp * self.bits // 32,
                                                    dtype=torch.int32, device=device))
        register_group_params(self, kp, False, dtype, device)
        # the scales are a (frozen) parameter: transformers reads a model's device and dtype
        # from its first parameter, and a sliced, fully quantized model may have no other
        self.scales = nn.Parameter(self.scales, requires_grad=False)
        self.register_buffer("projection", None)
        self._refresh_weight()

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_weight(cls, qw: QuantizedWeight, padding_idx: Optional[int] = None,
                    projection: Optional[torch.Tensor] = None,
                    output_dtype: Optional[torch.dtype] = None) -> "QuantEmbedding":
        """Wraps a quantized table [V, D] (tensors shared, not copied)."""
        v, d = qw.shape
        layer = cls(v, d, qw.bits, qw.group_size, qw.symmetric, qw.dtype, device="meta",
                    method=qw.method, padding_idx=padding_idx, output_dtype=output_dtype)
        layer.qweight = qw.qweight
        layer.scales = (qw.scales if isinstance(qw.scales, nn.Parameter)
                        else nn.Parameter(qw.scales, requires_grad=False))
        if qw.zeros is not None:
            layer.zeros = qw.zeros
        layer.projection = projection
        layer._refresh_weight()
        return layer

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, config: QuantConfig,
                       scale_dtype: Optional[torch.dtype] = None) -> "QuantEmbedding":
        """Quantizes an nn.Embedding (or a ProjectedEmbedding, whose projection it keeps) with
        RTN; the rows come out in the table's dtype."""
        if config.method != "rtn" or config.matryoshka or config.act_bits:
            raise ValueError("embedding tables are quantized by plain RTN (QuantConfig(bits, "
                             "group_size, symmetric)); got " + repr(config))
        weight = embedding.weight.detach()
        qw = quantize(weight, config.bits, config.group_size, config.symmetric,
                      scale_dtype=scale_dtype)
        projection = getattr(embedding, "projection", None)
        return cls.from_weight(qw, embedding.padding_idx, projection, output_dtype=weight.dtype)

    def tied_head(self, bias: Optional[torch.Tensor] = None, act_bits: int = 0) -> QuantLinear:
        """A QuantLinear [V, D] holding this table's very tensors (the tied output head),
        computing on int8 activations when ``act_bits`` is 8."""
        return QuantLinear.from_weight(self._qw, bias, act_bits=act_bits)

    def _refresh_weight(self) -> None:
        self._qw = QuantizedWeight(self.qweight, self.scales, self.zeros, bits=self.bits,
                                   group_size=self.group_size,
                                   shape=(self.num_embeddings, self.embedding_dim),
                                   method=self.method)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return self._qw

    @property
    def output_width(self) -> int:
        return self.embedding_dim if self.projection is None else self.projection.shape[1]

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        # .to(dtype) / .half() change the rows' dtype as they change every floating tensor
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.scales.device)).dtype
        self._refresh_weight()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_weight()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = qembedding(input_ids, self._qw, dtype=self.dtype)
        if self.projection is not None:
            rows = rows @ self.projection.to(rows.dtype)
        return rows

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense table [num_embeddings, embedding_dim]."""
        return self._qw.dequantize(dtype)

    def to_embedding(self, dtype: Optional[torch.dtype] = None) -> nn.Embedding:
        """An nn.Embedding (a ProjectedEmbedding when there is a projection) holding the
        dequantized table."""
        dtype = dtype or self.dtype
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device="meta", dtype=dtype)
        emb.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.projection is None:
            return emb
        from .sliced import ProjectedEmbedding
        return ProjectedEmbedding(emb, self.projection.detach().to(dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed table, scales and zeros (the projection not included)."""
        return self._qw.nbytes

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        proj = "" if self.projection is None else f", projection={tuple(self.projection.shape)}"
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}, scales={self.scales.dtype}{proj}")
