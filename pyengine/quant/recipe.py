"""Compression recipes: which linear layers get which quantization, and per-layer kept widths.

A :class:`Recipe` maps regular expressions on module names (``re.fullmatch``, tried in the order
given) to a :class:`QuantConfig`, or to ``None`` to keep a layer dense; the key ``"_default"``
applies to every other linear layer of the decoder. The output head (``lm_head``) and the
token embedding are never covered by ``"_default"``: they follow ``embeddings`` (8-bit RTN by
default, ``None`` keeps them dense), unless a pattern names the head explicitly. ``slicing``
holds the kept width of each decoder layer's residual stream (SliceGPT with per-layer widths)
or ``None``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..format.packing import SUPPORTED_BITS
from ..format.qweight import SUPPORTED_GROUP_SIZES
from ..utils import is_int
from .methods import check_number, get_method, method_names

DEFAULT_KEY = "_default"
RECIPE_VERSION = 4  # 2: the ``embeddings`` field (version-1 recipes kept the embeddings dense);
                    # 3: ``rotate`` and ``rotation_seed`` (earlier recipes do not rotate);
                    # 4: ``online_hadamard`` (earlier rotated recipes did not turn the MLP's
                    #    inner activation)


@dataclass(frozen=True)
class QuantConfig:
    """How one linear layer is quantized.

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: 32, 64, 128, or -1 (one scale per output channel).
        symmetric: zero point fixed at 2^(bits-1) instead of one per group.
        method: "rtn" (round to nearest with clipping search), "gptq" (needs calibration) or,
            for Matryoshka parents only, "matquant" (the parent's quantization parameters
            optimised for its 8/4/2-bit slices at once; needs calibration); any method
            registered with pyengine.quant.methods.register_method.
        matryoshka: store an int8 parent whose top bits serve lower precisions (bits must be 8,
            method "rtn" or "matquant"); pyengine.set_precision picks the slice served.
        act_order: GPTQ only: visit columns by decreasing Hessian diagonal (groups stay static
            and contiguous, so the stored layout needs no permutation at run time).
        act_bits: 0 (the layer's input as it is) or 8: the layer quantizes its input to int8
            per block of 32 at run time (pyengine.ops.act_quant), which the CPU kernels turn
            into integer dot products. Not for Matryoshka parents.
        damp: GPTQ only: the fraction of the mean Hessian diagonal added to the diagonal
            (0 < damp <= 1; larger is more stable with little calibration data).
    """

    bits: int
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    matryoshka: bool = False
    act_order: bool = False
    act_bits: int = 0
    damp: float = 0.01

    def __post_init__(self) -> None:
        # `4.0 in (2, 3, 4, 8)` is True in Python, so the type is checked as well as the value
        if not is_int(self.bits) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantConfig.bits must be an integer among {SUPPORTED_BITS}, got "
                             f"{self.bits!r}")
        if not is_int(self.group_size) or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"QuantConfig.group_size must be an integer among "
                             f"{SUPPORTED_GROUP_SIZES}, got {self.group_size!r}")
        for flag in ("symmetric", "matryoshka", "act_order"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"QuantConfig.{flag} must be True or False, got "
                                 f"{getattr(self, flag)!r}")
        if not isinstance(self.method, str) or self.method not in method_names():
            raise ValueError(f"QuantConfig.method must be one of {method_names()}, got "
                             f"{self.method!r}")
        method = get_method(self.method)
        if self.matryoshka and self.bits != 8:
            raise ValueError("a Matryoshka parent is stored at 8 bits (QuantConfig(bits=8, "
                             "matryoshka=True))")
        if self.matryoshka and not method.matryoshka:
            makers = tuple(n for n in method_names() if get_method(n).matryoshka)
            raise ValueError(f"a Matryoshka parent is made by method {makers}, got "
                             f"{self.method!r}")
        check_number("QuantConfig", "damp", self.damp, 0.0, 1.0)
        from ..ops.act_quant import check_act_bits
        check_act_bits(self.act_bits, "QuantConfig.act_bits")
        if self.act_bits and self.matryoshka:
            raise ValueError("QuantConfig.act_bits applies to plain quantized layers; Matryoshka "
                             "parents serve their activations as they are")
        if not self.matryoshka and not method.plain:
            raise ValueError(f"method {self.method!r} makes Matryoshka parents: use "
                             f"QuantConfig(bits=8, matryoshka=True, method={self.method!r})")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        unknown = set(d) - {"bits", "group_size", "symmetric", "method", "matryoshka", "act_order",
                            "act_bits", "damp"}
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {sorted(unknown)}")
        return cls(**d)


def default_embeddings() -> "QuantConfig":
    """The default quantization of the token embedding table and the output head: 8-bit RTN,
    asymmetric, groups of 128."""
    return QuantConfig(bits=8, group_size=128)


def _check_embeddings(cfg: Optional[QuantConfig]) -> None:
    if cfg is None:
        return
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"Recipe.embeddings must be a QuantConfig or None (dense), got "
                         f"{type(cfg).__name__}")
    if cfg.method != "rtn" or cfg.matryoshka or cfg.act_bits or cfg.act_order:
        raise ValueError(f"Recipe.embeddings is quantized by plain RTN: QuantConfig(bits, "
                         f"group_size, symmetric), got {cfg!r}")


@dataclass(frozen=True)
class Recipe:
    """What to do to a model: per-layer quantization and, optionally, per-layer kept widths.

    Args:
        quant: {regex or "_default": QuantConfig or None}. Patterns are tried in order with
            ``re.fullmatch`` against full module names such as ``model.layers.3.mlp.down_proj``;
            the first match wins; ``None`` keeps the layer dense.
        slicing: kept residual width of each decoder layer (one int per layer), or None.
        embeddings: the quantization (RTN) of the token embedding table and of the output head,
            or None to keep both dense; default 8 bits, groups of 128. A tied table and head
            stay one tensor (pyengine.QuantEmbedding and a QuantLinear head sharing it). A
            pattern of ``quant`` naming the head overrides this for the head (a tied pair is
            then untied when the two differ).
        rotate: before quantizing, express the residual stream and the attention value heads in
            random orthogonal bases merged into the weights (pyengine.quant.rotation; with
            ``slicing``, each kept subspace is turned instead). The model computes the same
            function; GPTQ then keeps much more quality at 4 and 3 bits. Needs a family that
            can be sliced.
        rotation_seed: seed of those random bases.
        online_hadamard: with ``rotate``, also turn each MLP's inner activation (down_proj's
            input) by a random permutation and signs merged into gate/up and a block
            Walsh-Hadamard transform applied online (pyengine.ops.hadamard_transform, a few
            microseconds per layer and token; rotation.rotate_mlp_inner). Ignored without
            ``rotate``.
        info: JSON-able notes (what pyengine.plan measured and decided); not used to compress.
    """

    quant: Mapping[str, Optional[QuantConfig]] = field(default_factory=dict)
    slicing: Optional[List[int]] = None
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)
    embeddings: Optional[QuantConfig] = field(default_factory=default_embeddings)
    rotate: bool = False
    rotation_seed: int = 0
    online_hadamard: bool = True

    def __post_init__(self) -> None:
        _check_embeddings(self.embeddings)
        for name in ("rotate", "online_hadamard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Recipe.{name} must be True or False, got "
                                 f"{getattr(self, name)!r}")
        if not is_int(self.rotation_seed) or self.rotation_seed < 0:
            raise ValueError(f"Recipe.rotation_seed must be an integer >= 0, got "
                             f"{self.rotation_seed!r}")
        for key, cfg in self.quant.items():
            if not isinstance(key, str):
                raise ValueError(f"recipe keys must be strings (regexes), got {key!r}")
            if key != DEFAULT_KEY:
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ValueError(f"recipe key {key!r} is not a valid regex: {exc}") from None
            if cfg is not None and not isinstance(cfg, QuantConfig):
                raise ValueError(f"recipe value for {key!r} must be a QuantConfig or None, got "
                                 f"{type(cfg).__name__}")
        if self.slicing is not None:
            widths = list(self.slicing)
            if not widths or any(not isinstance(w, int) or isinstance(w, bool) or w < 1
                                 for w in widths):
                raise ValueError(f"Recipe.slicing must be a non-empty list of positive ints, got "
                                 f"{self.slicing!r}")
            object.__setattr__(self, "slicing", widths)

    def config_for(self, name: str, is_head: bool = False) -> Optional[QuantConfig]:
        """The QuantConfig of module ``name`` (None: keep dense). ``is_head`` marks the output
        head, which only an explicit pattern can quantize."""
        for key, cfg in self.quant.items():
            if key != DEFAULT_KEY and re.fullmatch(key, name):
                return cfg
        if is_head:
            return self.embeddings
        return self.quant.get(DEFAULT_KEY)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": RECIPE_VERSION,
            "quant": {k: (None if v is None else v.to_dict()) for k, v in self.quant.items()},
            "slicing": None if self.slicing is None else list(self.slicing),
            "embeddings": None if self.embeddings is None else self.embeddings.to_dict(),
            "rotate": self.rotate,
            "rotation_seed": self.rotation_seed,
            "online_hadamard": self.online_hadamard,
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        version = d.get("version", RECIPE_VERSION)
        if not is_int(version):
            raise ValueError(f"recipe version must be an integer, got {version!r}")
        if version > RECIPE_VERSION:
            raise ValueError(f"recipe version {version} is newer than this pyengine "
                             f"understands ({RECIPE_VERSION})")
        quant_dict = d.get("quant") or {}
        if not isinstance(quant_dict, Mapping):
            raise ValueError(f"recipe quant must map patterns to QuantConfig fields, got "
                             f"{type(quant_dict).__name__}")
        quant = {}
        for k, v in quant_dict.items():
            if v is not None and not isinstance(v, Mapping):
                raise ValueError(f"recipe quant[{k!r}] must be QuantConfig fields or null, got "
                                 f"{v!r}")
            quant[k] = None if v is None else QuantConfig.from_dict(v)
        if version < 2:  # before the field existed, the embeddings and the head stayed dense
            embeddings = None
        elif "embeddings" not in d:
            embeddings = default_embeddings()
        else:
            emb = d["embeddings"]
            if emb is not None and not isinstance(emb, Mapping):
                raise ValueError(f"recipe embeddings must be QuantConfig fields or null, got "
                                 f"{emb!r}")
            embeddings = None if emb is None else QuantConfig.from_dict(emb)
        return cls(quant=quant, slicing=d.get("slicing"), info=dict(d.get("info") or {}),
                   embeddings=embeddings, rotate=d.get("rotate", False),
                   rotation_seed=d.get("rotation_seed", 0),
                   online_hadamard=d.get("online_hadamard", version >= 4))

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))
