"""The model as a list of steps the bound propagation understands, or `Unbounded`.

The model is copied, cast to float64 and traced with torch.fx (`symbolic_trace`, with one
addition: `size()` and `dim()` of the input are the concrete numbers of the input the bound is
for, so a forward that checks its input's shape, as deepinv's U-Net does, still traces). The
graph is then walked node by node; every node that depends on the input must be one of:

* an affine map of its inputs (`linear`): linear and convolution layers (transposed too), batch
  norm in eval mode, average pooling, nearest / bilinear resizing, concatenation, addition and
  subtraction (residual connections), multiplication or division by a constant, reshapes,
  flattening, permutations, slicing, identity and dropout (eval);
* ReLU or leaky ReLU (negative slope in [0, 1]);
* max pooling.

The first node outside the set ends the walk: `Unbounded` names it (its fx name and the layer
or function). Nodes that do not depend on the input (weights, constants) are evaluated once.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn


class Unbounded(Exception):  # noqa: N818 - a result a report shows, not an error
    """No certified bound for this model; `reason` names why (the first unsupported layer)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Step:
    """One node that depends on the input. `inputs` are the names of the steps it reads."""

    name: str
    kind: str  # "input", "linear", "relu", "maxpool"
    label: str  # what a person reads: the layer type or function
    inputs: list[str] = field(default_factory=list)
    # linear: fn(*inputs) is the affine map; absfn(*radii) applies |linear part| to radii ≥ 0
    fn: Callable[..., torch.Tensor] | None = None
    absfn: Callable[..., torch.Tensor] | None = None
    slope: float = 0.0  # relu: the negative slope (0 for ReLU)
    pool: dict[str, Any] = field(default_factory=dict)  # maxpool: F.max_pool2d's arguments


@dataclass
class Graph:
    steps: list[Step]
    output: str
    input_shape: tuple[int, ...]


class _ShapeTracer(fx.Tracer):
    """symbolic_trace, with `size()`/`dim()` of the input answered by the concrete shape."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.first_placeholder: fx.Node | None = None

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        if (
            kind == "call_method"
            and target in ("size", "dim")
            and args
            and isinstance(args[0], fx.Proxy)
            and args[0].node is self.first_placeholder
        ):
            if target == "dim":
                return len(self.input_shape)
            if len(args) > 1 or "dim" in kwargs:
                dim = args[1] if len(args) > 1 else kwargs["dim"]
                return self.input_shape[dim]
            return torch.Size(self.input_shape)
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if kind == "placeholder" and self.first_placeholder is None:
            self.first_placeholder = proxy.node
        return proxy


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[fx.GraphModule, Graph]:
    """Copy the model to float64 (eval mode), trace it and classify its nodes."""
    if isinstance(model, torch.jit.ScriptModule):
        raise Unbounded("a TorchScript model cannot be traced by torch.fx")
    try:
        module = copy.deepcopy(model).double().eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    except Exception as exc:  # noqa: BLE001 - any failure to copy is a reason, not a crash
        raise Unbounded(f"the model cannot be copied to float64: {type(exc).__name__}") from exc
    tracer = _ShapeTracer(tuple(input_shape))
    concrete = _concrete_args(module)
    try:
        graph = tracer.trace(module, concrete_args=concrete)
    except Exception as exc:  # noqa: BLE001
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise Unbounded(
            f"torch.fx cannot trace the model ({type(exc).__name__}: {message[:200]})"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph)
    return gm, _classify(gm, tuple(input_shape))


def _concrete_args(module: nn.Module) -> dict[str, Any] | None:
    """Every forward argument after the first at its default (deepinv's `sigma=None`)."""
    import inspect

    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    concrete: dict[str, Any] = {}
    for p in parameters[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        concrete[p.name] = None if p.default is inspect.Parameter.empty else p.default
    return concrete or None


# ---------------------------------------------------------------------------------------------
# classification

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_LEAKY_FUNCTIONS = {F.leaky_relu, F.leaky_relu_}
# affine maps whose linear part has only nonnegative coefficients: |linear part| = linear part
_NONNEG_FUNCTIONS = {
    torch.cat,
    torch.concat,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.dropout,
    operator.getitem,
}
_NONNEG_METHODS = {
    "view",
    "reshape",
    "flatten",
    "contiguous",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "clone",
    "unflatten",
}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}
_DIV = {operator.truediv, operator.itruediv, torch.div}
_POSITIVE_RESIZE = {"nearest", "nearest-exact", "bilinear", "linear", "trilinear"}
_NONNEG_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)


def _classify(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> Graph:
    modules = dict(gm.named_modules())
    consts: dict[str, Any] = {}
    # every node's value at a zero input: the shapes that size(), dim() and .shape read
    concrete: dict[str, Any] = {}
    steps: list[Step] = []
    variable: set[str] = set()
    output = None
    placeholders = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            if placeholders == 1:
                steps.append(Step(node.name, "input", "input"))
                variable.add(node.name)
                concrete[node.name] = torch.zeros(input_shape, dtype=torch.float64)
            else:  # an argument fixed at its default by concrete_args
                consts[node.name] = None
            continue
        if node.op == "output":
            value = node.args[0]
            if not isinstance(value, fx.Node) or value.name not in variable:
                raise Unbounded("the model's output is not a single tensor of its input")
            output = value.name
            continue
        if node.op == "get_attr":
            consts[node.name] = _attr(gm, node.target)
            continue
        used = [a.name for a in node.all_input_nodes if a.name in variable]
        if not used:  # a constant: evaluate it now
            consts[node.name] = _evaluate(node, modules, consts)
            continue
        if _is_shape_query(node):  # the input's shape is fixed: its size is a constant
            consts[node.name] = _evaluate(node, modules, {**consts, **concrete})
            continue
        variable.add(node.name)
        steps.append(_step(node, used, modules, consts))
        concrete[node.name] = _evaluate(node, modules, {**consts, **concrete})
    if output is None:
        raise Unbounded("the model has no output")
    return Graph(steps, output, input_shape)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _is_shape_query(node: fx.Node) -> bool:
    args: Any = node.args
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return bool(node.op == "call_function" and node.target is getattr and args[1] == "shape")


def _evaluate(node: fx.Node, modules: dict, values: dict) -> Any:
    args = fx.node.map_arg(node.args, lambda a: values[a.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: values[a.name])
    target: Any = node.target
    if node.op == "call_module":
        return modules[target](*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def _label(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} layer {node.target!r}"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    name = getattr(node.target, "__name__", str(node.target))
    owner = getattr(node.target, "__self__", None)
    if isinstance(owner, type):  # a classmethod, e.g. a custom autograd Function's apply
        name = f"{owner.__name__}.{name}"
    module = getattr(node.target, "__module__", None) or ""
    return f"function {module + '.' if module else ''}{name}"


def _unsupported(node: fx.Node, modules: dict, why: str = "") -> Unbounded:
    extra = f": {why}" if why else ""
    return Unbounded(
        f"unsupported layer: {_label(node, modules)} (graph node {node.name!r}){extra}"
    )


def _binder(
    node: fx.Node, used: list[str], consts: dict, call: Callable[..., Any]
) -> Callable[..., torch.Tensor]:
    """fn(*values of `used`) -> the node's value, constants closed over."""

    def fn(*values: torch.Tensor) -> torch.Tensor:
        lookup = dict(zip(used, values, strict=True))

        def sub(a: fx.Node) -> Any:
            return lookup[a.name] if a.name in lookup else consts[a.name]

        args = fx.node.map_arg(node.args, sub)
        kwargs = fx.node.map_arg(node.kwargs, sub)
        return call(*args, **kwargs)

    return fn


def _step(node: fx.Node, used: list[str], modules: dict, consts: dict) -> Step:
    label = _label(node, modules)

    def linear(fn: Callable, absfn: Callable | None = None) -> Step:
        return Step(node.name, "linear", label, used, fn, absfn or _nonneg_abs(fn, len(used)))

    if node.op == "call_module":
        module = modules[node.target]
        return _module_step(node, used, module, consts, label, modules)
    target: Any = node.target
    if node.op == "call_method":
        if target in ("relu", "relu_"):
            return Step(node.name, "relu", label, used)
        if target in _NONNEG_METHODS:
            return linear(_binder(node, used, consts, _method(target)))
        if target in ("add", "sub", "mul", "div", "neg"):
            function: dict[str, Callable[..., torch.Tensor]] = {
                "add": torch.add,
                "sub": torch.sub,
                "mul": torch.mul,
                "div": torch.div,
            }
            if target == "neg":
                return linear(_binder(node, used, consts, torch.neg), lambda r: r)  # |−1| r
            return _arithmetic(node, used, consts, function[target], label, modules)
        raise _unsupported(node, modules)
    if target in _RELU_FUNCTIONS:
        return Step(node.name, "relu", label, used)
    if target in _LEAKY_FUNCTIONS:
        slope: Any = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        return _leaky(node, used, float(slope), label, modules)
    if target in (F.max_pool2d, torch.max_pool2d):
        return _maxpool_function(node, used, consts, label, modules)
    if target in _NONNEG_FUNCTIONS:
        if target is F.dropout:
            if node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True):
                raise _unsupported(node, modules, "dropout in training mode")
            return linear(lambda x: x)
        return linear(_binder(node, used, consts, target))
    if target is F.interpolate:
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        if mode not in _POSITIVE_RESIZE:
            raise _unsupported(node, modules, f"resizing mode {mode!r}")
        return linear(_binder(node, used, consts, target))
    if target in (F.linear, F.conv1d, F.conv2d, F.conv_transpose1d, F.conv_transpose2d):
        return _weighted_function(node, used, consts, label, modules)
    if target in (operator.neg, torch.neg):
        return linear(_binder(node, used, consts, torch.neg), lambda r: r)
    groups: tuple[tuple[set, Callable[..., torch.Tensor]], ...] = (
        (_ADD, torch.add),
        (_SUB, torch.sub),
        (_MUL, torch.mul),
    )
    for group, operation in groups:
        if target in group:
            return _arithmetic(node, used, consts, operation, label, modules)
    if target in _DIV:
        return _arithmetic(node, used, consts, torch.div, label, modules)
    raise _unsupported(node, modules)


def _method(name: str) -> Callable[..., Any]:
    def call(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return getattr(x, name)(*args, **kwargs)

    return call


def _nonneg_abs(fn: Callable[..., torch.Tensor], arity: int) -> Callable[..., torch.Tensor]:
    """|linear part| of an affine map with nonnegative coefficients: fn(r) − fn(0)."""

    def absfn(*radii: torch.Tensor) -> torch.Tensor:
        return fn(*radii) - fn(*(torch.zeros_like(r) for r in radii))

    return absfn


def _leaky(node: fx.Node, used: list[str], slope: float, label: str, modules: dict) -> Step:
    if not 0.0 <= slope <= 1.0:
        raise _unsupported(node, modules, f"negative slope {slope} outside [0, 1]")
    return Step(node.name, "relu", label, used, slope=slope)


def _module_step(
    node: fx.Node, used: list[str], module: nn.Module, consts: dict, label: str, modules: dict
) -> Step:
    def linear(fn: Callable, absfn: Callable | None = None) -> Step:
        return Step(node.name, "linear", label, used, fn, absfn or _nonneg_abs(fn, len(used)))

    if node.kwargs or len(node.args) != 1:
        raise _unsupported(node, modules, "called with more than one argument")
    if isinstance(module, nn.ReLU):
        return Step(node.name, "relu", label, used)
    if isinstance(module, nn.LeakyReLU):
        return _leaky(node, used, float(module.negative_slope), label, modules)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise _unsupported(node, modules, "return_indices")
        pool = {
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "ceil_mode": module.ceil_mode,
        }
        return Step(node.name, "maxpool", label, used, pool=pool)
    if isinstance(module, _NONNEG_MODULES):
        if isinstance(module, nn.Dropout | nn.Dropout2d):
            return linear(lambda x: x)
        return linear(lambda x: module(x))
    if isinstance(module, nn.Upsample):
        if module.mode not in _POSITIVE_RESIZE:
            raise _unsupported(node, modules, f"resizing mode {module.mode!r}")
        return linear(lambda x: module(x))
    weight: Any
    bias: Any
    if isinstance(module, nn.Linear):
        weight, bias = module.weight, module.bias
        return linear(lambda x: F.linear(x, weight, bias), lambda r: F.linear(r, weight.abs()))
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        weight, bias = module.weight, module.bias
        return linear(
            lambda x: module._conv_forward(x, weight, bias),
            lambda r: module._conv_forward(r, weight.abs(), None),
        )
    if isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d):
        one_d = isinstance(module, nn.ConvTranspose1d)
        transposed: Any = F.conv_transpose1d if one_d else F.conv_transpose2d
        args: Any = (module.stride, module.padding, module.output_padding, module.groups)
        weight, bias = module.weight, module.bias
        if module.padding_mode != "zeros":
            raise _unsupported(node, modules, f"padding mode {module.padding_mode!r}")
        return linear(
            lambda x: transposed(x, weight, bias, *args, module.dilation),
            lambda r: transposed(r, weight.abs(), None, *args, module.dilation),
        )
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        if module.training:
            raise _unsupported(node, modules, "batch norm in training mode")
        if module.running_mean is None or module.running_var is None:
            raise _unsupported(node, modules, "batch norm without running statistics")
        scale = 1.0 / torch.sqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias

        def shape(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return t.view(1, -1, *([1] * (x.dim() - 2)))

        return linear(
            lambda x: x * shape(scale, x) + shape(shift, x),
            lambda r: r * shape(scale.abs(), r),
        )
    raise _unsupported(node, modules)


def _maxpool_function(
    node: fx.Node, used: list[str], consts: dict, label: str, modules: dict
) -> Step:
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    values = dict(zip(names, node.args[1:], strict=False))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    if values.pop("return_indices", False):
        raise _unsupported(node, modules, "return_indices")
    values.setdefault("stride", None)
    pool = {k: v for k, v in values.items() if not isinstance(v, fx.Node)}
    return Step(node.name, "maxpool", label, used, pool=pool)


def _weighted_function(
    node: fx.Node, used: list[str], consts: dict, label: str, modules: dict
) -> Step:
    """F.linear / F.conv* with the weight (and bias) constant and only the input variable."""
    node_args: Any = node.args
    target: Any = node.target
    weight_arg = node_args[1] if len(node_args) > 1 else node.kwargs.get("weight")
    if used != [node_args[0].name] or not isinstance(weight_arg, fx.Node):
        raise _unsupported(node, modules, "a weight that depends on the input")
    fn = _binder(node, used, consts, target)
    weight_name = weight_arg.name

    def absfn(r: torch.Tensor) -> torch.Tensor:
        swapped = dict(consts)
        swapped[weight_name] = consts[weight_name].abs()

        def sub(a: fx.Node) -> Any:
            return r if a.name == used[0] else swapped[a.name]

        args = list(fx.node.map_arg(node.args, sub))
        kwargs = dict(fx.node.map_arg(node.kwargs, sub))
        if len(args) > 2:
            args[2] = None
        if "bias" in kwargs:
            kwargs["bias"] = None
        return target(*args, **kwargs)

    return Step(node.name, "linear", label, used, fn, absfn)


def _arithmetic(
    node: fx.Node,
    used: list[str],
    consts: dict,
    function: Callable[..., torch.Tensor],
    label: str,
    modules: dict,
) -> Step:
    """add/sub of inputs and constants; mul/div by a constant (one variable operand)."""
    a: Any = node.args[0]
    b: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    extra = {k: v for k, v in node.kwargs.items() if k != "other"}
    if extra.get("alpha", 1) != 1 or extra.get("rounding_mode") is not None:
        raise _unsupported(node, modules, "alpha or rounding mode")
    a_var = isinstance(a, fx.Node) and a.name in used
    b_var = isinstance(b, fx.Node) and b.name in used

    def value(arg: Any, lookup: dict) -> Any:
        if isinstance(arg, fx.Node):
            return lookup[arg.name] if arg.name in lookup else consts[arg.name]
        return arg

    def fn(*values: torch.Tensor) -> torch.Tensor:
        lookup = dict(zip(used, values, strict=True))
        return function(value(a, lookup), value(b, lookup))

    if function in (torch.add, torch.sub):

        def absfn(*radii: torch.Tensor) -> torch.Tensor:
            lookup = dict(zip(used, radii, strict=True))
            ra = lookup[a.name] if a_var else 0.0
            rb = lookup[b.name] if b_var else 0.0
            total = ra + rb
            # broadcasting: a constant operand may widen the shape
            return total + torch.zeros_like(fn(*(torch.zeros_like(r) for r in radii)))

        return Step(node.name, "linear", label, used, fn, absfn)
    if a_var and b_var:
        raise _unsupported(node, modules, "a product of two input-dependent tensors")
    if function is torch.div and b_var:
        raise _unsupported(node, modules, "division by an input-dependent tensor")
    const = value(b if a_var else a, {})
    if isinstance(const, torch.Tensor):
        magnitude: Any = const.abs()
    elif isinstance(const, int | float) and math.isfinite(const):
        magnitude = abs(const)
    else:
        raise _unsupported(node, modules, "a non-numeric operand")

    def absfn_scaled(r: torch.Tensor) -> torch.Tensor:
        return function(r, magnitude)

    return Step(node.name, "linear", label, used, fn, absfn_scaled)
