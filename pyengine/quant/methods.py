"""Quantization methods by name: each ``QuantConfig.method`` is a registered :class:`QuantMethod`
(what it makes, whether it needs calibration data, its handler, its options), and
:func:`replace_linear` is the one place where a quantized weight takes a linear layer's place.

Handlers return weights and never touch the model:

* an *uncalibrated* method quantizes one linear on its own
  (``quantize_linear(linear, config, options, scale_dtype, input_weights)`` -> weight);
* a *calibrated* method quantizes the named linears of one decoder layer from one pass of the
  layer over its calibration inputs (``quantize_layer(model, layer, inputs, configs, options,
  scale_dtype=, compute_device=, report=)`` -> {name: weight}).

The weight is a QuantizedWeight (the layer becomes a QuantLinear) or a MatryoshkaWeight (a
MatryoshkaLinear). Each method's options are a frozen dataclass whose dict form carries a
version (:class:`MethodOptions`), so a run's manifest records them and an older pyengine
refuses options newer than it understands.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Mapping, Optional,
                    Tuple, Type, Union)

import torch
from torch import nn

from ..utils import is_int

if TYPE_CHECKING:  # imported lazily below: the recipe module imports this one
    from ..format.qweight import QuantizedWeight
    from ..matryoshka.weight import MatryoshkaWeight
    from ..pipeline.calibrate import LayerInputs
    from .recipe import QuantConfig

    Weight = Union[QuantizedWeight, MatryoshkaWeight]


class MethodOptions:
    """Base of the per-method options (frozen dataclasses). ``to_dict`` adds ``"version"``;
    ``from_dict`` accepts the versions up to the class's ``VERSION`` and refuses unknown
    fields."""

    VERSION: ClassVar[int] = 1

    @property
    def pass_batch_size(self) -> int:
        """Calibration windows per forward of the layer-by-layer pass that runs a calibrated
        method with these options (1 unless the options set it)."""
        return 1

    def to_dict(self) -> Dict[str, Any]:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MethodOptions":
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__} must be given as a mapping of its fields, got "
                             f"{type(d).__name__}")
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if not is_int(version) or not 1 <= version <= cls.VERSION:
            raise ValueError(f"{cls.__name__} version {version!r} is not one this pyengine "
                             f"understands (1 .. {cls.VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown} (known: {sorted(known)})")
        return cls(**d)

    @classmethod
    def coerce(cls, options: "MethodOptions | Mapping[str, Any] | None") -> "MethodOptions":
        """``options`` as an instance of this class (None: the defaults; a mapping: its
        fields)."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, MethodOptions):
            raise ValueError(f"expected {cls.__name__}, got {type(options).__name__}")
        return cls.from_dict(options)


def check_number(owner: str, name: str, value, low: float, high: float,
                 integer: bool = False, low_open: bool = True) -> None:
    """ValueError ("<owner>.<name> must be a number in (low, high], got ...") unless ``value``
    is a number (an integer with ``integer``; never a bool) in the interval, open at ``low``
    unless ``low_open`` is False. The one check of the quantizers' numeric settings."""
    ok = (is_int(value) if integer else
          (not isinstance(value, bool) and isinstance(value, (int, float))))
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{owner}.{name} must be {kind} in {interval}, got {value!r}")


def _check_flags(owner: str, options: Any, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(options, name), bool):
            raise ValueError(f"{owner}.{name} must be True or False, got "
                             f"{getattr(options, name)!r}")


@dataclass(frozen=True)
class RTNOptions(MethodOptions):
    """Round to nearest (pyengine.quantize): the clipping search over ``clip_grid`` ratios from
    1 down to ``min_clip`` of each group's range (``clip_search=False``: the full range);
    ``integer_zeros``: integer zero points, which GPTQ and compressed-tensors checkpoints hold
    (``pyengine.export`` then writes the weights exactly). Version 2 added ``integer_zeros``."""

    VERSION: ClassVar[int] = 2

    clip_search: bool = True
    clip_grid: int = 24
    min_clip: float = 0.4
    integer_zeros: bool = False

    def __post_init__(self) -> None:
        _check_flags("RTNOptions", self, "clip_search", "integer_zeros")
        check_number("RTNOptions", "clip_grid", self.clip_grid, 1, 10_000, integer=True,
                      low_open=False)
        check_number("RTNOptions", "min_clip", self.min_clip, 0.0, 1.0)


@dataclass(frozen=True)
class GPTQOptions(MethodOptions):
    """GPTQ (pyengine.quant.gptq): ``damp`` overrides every layer's damping (None: each
    QuantConfig's ``damp``); ``integer_zeros`` as in :class:`RTNOptions`. Version 2 added
    ``integer_zeros``."""

    VERSION: ClassVar[int] = 2

    damp: Optional[float] = None
    integer_zeros: bool = False

    def __post_init__(self) -> None:
        _check_flags("GPTQOptions", self, "integer_zeros")
        if self.damp is not None:
            check_number("GPTQOptions", "damp", self.damp, 0.0, 1.0)


@dataclass(frozen=True)
class MatQuantOptions(MethodOptions):
    """MatQuant (pyengine.quant.matquant.matquant_quantize): ``weights`` {precision: lambda}
    of the slices' losses (None: the default 8/4/2 weights), the clipping grid, GPTQ-style
    error feedback and its damping, optional Adam steps on the quantization parameters (and
    the codes), and the calibration batch size of the layer pass."""

    weights: Optional[Mapping[int, float]] = None
    grid: int = 10
    min_clip: float = 0.3
    error_feedback: bool = True
    damp: float = 0.01
    steps: int = 0
    lr: float = 2e-3
    learn_codes: bool = False
    code_lr: float = 0.05
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.weights is not None:
            from .matquant import check_slice_weights
            if not isinstance(self.weights, Mapping):
                raise ValueError(f"MatQuantOptions.weights must map precisions to lambdas, got "
                                 f"{type(self.weights).__name__}")
            # JSON keys are strings: {"8": 1.0} reads back as {8: 1.0}
            weights = {int(r) if isinstance(r, str) and r.isdigit() else r: lam
                       for r, lam in self.weights.items()}
            object.__setattr__(self, "weights", check_slice_weights(weights))
        _check_flags("MatQuantOptions", self, "error_feedback", "learn_codes")
        check_number("MatQuantOptions", "grid", self.grid, 1, 10_000, integer=True,
                      low_open=False)
        check_number("MatQuantOptions", "min_clip", self.min_clip, 0.0, 1.0)
        check_number("MatQuantOptions", "damp", self.damp, 0.0, 1.0)
        check_number("MatQuantOptions", "steps", self.steps, 0, 1_000_000, integer=True,
                      low_open=False)
        check_number("MatQuantOptions", "lr", self.lr, 0.0, 1e3)
        check_number("MatQuantOptions", "code_lr", self.code_lr, 0.0, 1e3)
        check_number("MatQuantOptions", "batch_size", self.batch_size, 1, 1 << 20,
                      integer=True, low_open=False)

    @property
    def pass_batch_size(self) -> int:
        return self.batch_size

    def algorithm_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of matquant_quantize (all fields but ``batch_size``)."""
        kwargs = dataclasses.asdict(self)
        del kwargs["batch_size"]
        return kwargs


LinearHandler = Callable[..., "Weight"]
LayerHandler = Callable[..., Dict[str, "Weight"]]


@dataclass(frozen=True)
class QuantMethod:
    """One quantization method, as ``QuantConfig.method`` names it.

    Attributes:
        name: the method's name.
        options_type: its MethodOptions subclass.
        plain: makes plain quantized layers (QuantLinear).
        matryoshka: makes Matryoshka parents (MatryoshkaLinear).
        quantize_linear: uncalibrated methods: one linear's weight.
        quantize_layer: calibrated methods (they need calibration data): the weights of a
            decoder layer's named linears from one pass over the layer's inputs.
    """

    name: str
    options_type: Type[MethodOptions]
    plain: bool
    matryoshka: bool
    quantize_linear: Optional[LinearHandler] = None
    quantize_layer: Optional[LayerHandler] = None

    def __post_init__(self) -> None:
        if (self.quantize_linear is None) == (self.quantize_layer is None):
            raise ValueError(f"quantization method {self.name!r} needs exactly one handler: "
                             f"quantize_linear (uncalibrated) or quantize_layer (calibrated)")
        if not (self.plain or self.matryoshka):
            raise ValueError(f"quantization method {self.name!r} makes nothing")

    @property
    def needs_calibration(self) -> bool:
        return self.quantize_layer is not None


_METHODS: Dict[str, QuantMethod] = {}


def register_method(method: QuantMethod) -> QuantMethod:
    """Adds (or replaces) a quantization method; QuantConfig accepts its name from then on."""
    if not isinstance(method, QuantMethod):
        raise TypeError(f"register_method takes a QuantMethod, got {type(method).__name__}")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> QuantMethod:
    """The method registered as ``name``; ValueError naming the known ones otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantization method {name!r}; known: "
                         f"{method_names()}") from None


def method_names() -> Tuple[str, ...]:
    """The registered methods' names, in registration order (the order compress runs the
    calibrated ones in)."""
    return tuple(_METHODS)


def resolve_options(options: Optional[Mapping[str, Any]] = None) -> Dict[str, MethodOptions]:
    """{method name: its options} for every registered method, from ``options`` ({name:
    MethodOptions or a mapping of its fields}; missing names get the defaults)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_METHODS))
    if unknown:
        raise ValueError(f"options for unknown quantization methods {unknown}; known: "
                         f"{method_names()}")
    return {name: m.options_type.coerce(options.get(name)) for name, m in _METHODS.items()}


# ---- the one module swap ---------------------------------------------------------------------

def replace_linear(parent: nn.Module, attr: str, weight: "Weight",
                   config: "QuantConfig") -> nn.Module:
    """Puts the quantized layer of ``weight`` where ``parent.attr`` (a linear layer) is, keeping
    its bias, and returns it: a MatryoshkaLinear for a MatryoshkaWeight (serving its int8 slice),
    a QuantLinear otherwise (computing on ``config.act_bits``-bit activations)."""
    from ..matryoshka.weight import MatryoshkaWeight
    from ..nn.matryoshka_linear import MatryoshkaLinear
    from ..nn.quant_linear import QuantLinear
    bias = getattr(parent, attr).bias
    if isinstance(weight, MatryoshkaWeight):
        module: nn.Module = MatryoshkaLinear.from_weight(weight, bias)
    else:
        module = QuantLinear.from_weight(weight, bias, act_bits=config.act_bits)
    setattr(parent, attr, module)
    return module


def replace_linears(model: nn.Module, weights: Mapping[str, "Weight"],
                    configs: Mapping[str, "QuantConfig"]) -> None:
    """:func:`replace_linear` for each named linear of ``model`` (names as recipes write them)."""
    from ..model.walk import linear_holder
    for name, weight in weights.items():
        parent, attr = linear_holder(model, name)
        replace_linear(parent, attr, weight, configs[name])


def quantize_layer(model: nn.Module, layer: nn.Module, inputs: "LayerInputs",
                   method: QuantMethod, configs: Mapping[str, "QuantConfig"],
                   options: MethodOptions, *, scale_dtype: Optional[torch.dtype] = None,
                   compute_device=None, report: Optional[Dict[str, Any]] = None) -> List[str]:
    """Quantizes the linears of decoder ``layer`` named in ``configs`` with the calibrated
    ``method`` from one pass over ``inputs`` and puts them in place; returns their names."""
    weights = method.quantize_layer(model, layer, inputs, dict(configs), options,
                                    scale_dtype=scale_dtype, compute_device=compute_device,
                                    report=report)
    replace_linears(model, weights, configs)
    return list(weights)


# ---- the built-in methods --------------------------------------------------------------------
# Each handler imports its module when called: the quantizers import the recipe module, which
# imports this one.

def _rtn_linear(linear: nn.Module, config: "QuantConfig", options: RTNOptions,
                scale_dtype: Optional[torch.dtype] = None,
                input_weights: Optional[torch.Tensor] = None) -> "Weight":
    from ..matryoshka.weight import PARENT_BITS, MatryoshkaWeight
    from . import rtn
    clip = dict(clip_search=options.clip_search, clip_grid=options.clip_grid,
                min_clip=options.min_clip)
    if config.matryoshka:  # an int8 parent; its inputs are not weighed
        qw = rtn.quantize(linear.weight.detach(), PARENT_BITS, config.group_size,
                          config.symmetric, scale_dtype=scale_dtype,
                          integer_zeros=options.integer_zeros, **clip)
        return MatryoshkaWeight.from_quantized(qw)
    return rtn.quantize(linear.weight.detach(), config.bits, config.group_size, config.symmetric,
                        scale_dtype=scale_dtype, input_weights=input_weights,
                        integer_zeros=options.integer_zeros, **clip)


def _gptq_layer(model, layer, inputs, configs, options: GPTQOptions, *, scale_dtype=None,
                compute_device=None, report=None) -> Dict[str, "Weight"]:
    from . import gptq
    return gptq.gptq_layer_weights(model, layer, inputs, configs, damp=options.damp,
                                   scale_dtype=scale_dtype, compute_device=compute_device,
                                   integer_zeros=options.integer_zeros)


def _matquant_layer(model, layer, inputs, configs, options: MatQuantOptions, *,
                    scale_dtype=None, compute_device=None, report=None) -> Dict[str, "Weight"]:
    from . import matquant
    return matquant.matquant_layer_weights(model, layer, inputs, configs, scale_dtype=scale_dtype,
                                           compute_device=compute_device, report=report,
                                           **options.algorithm_kwargs())


register_method(QuantMethod("rtn", RTNOptions, plain=True, matryoshka=True,
                            quantize_linear=_rtn_linear))
register_method(QuantMethod("gptq", GPTQOptions, plain=True, matryoshka=False,
                            quantize_layer=_gptq_layer))
register_method(QuantMethod("matquant", MatQuantOptions, plain=False, matryoshka=True,
                            quantize_layer=_matquant_layer))
