"""ONNX models: screened as a protobuf, converted to PyTorch with onnx2torch, and admitted only
when the conversion agrees with onnxruntime (the reference implementation) on the probe input.

An audit differentiates through the model, which onnxruntime cannot do: the engine runs the
converted `torch.fx.GraphModule` instead, and admission makes sure it computes what the original
computes. Screening, in order:
1. the protobuf: at most `MAX_ONNX_BYTES`, a ModelProto with opset imports, IR version 3 or
   newer, only the standard operator domains (`""`/`ai.onnx`), no ONNX functions, no tensor
   stored outside the file (external data), exactly one input and one output of a floating
   type, and every operator supported by the converter (all unsupported ones are named at once),
   if need be after `onnx.version_converter` brought the model down to an opset the converter
   knows (`supported_opset`: the default export of torch 2.14 is opset 20, onnx2torch's rules
   stop at `Reshape`/`Shape`/`Constant` 14–15);
2. the converted graph: only onnx2torch's and torch.nn's modules and `getitem`;
3. the converted graph run on the probe input with every aten operator checked against the
   policy every other graph meets, before it executes (`workers.engine.screening.
   screen_aten_run`). A run, not a trace: `Reshape` reads its shape tensor's values, which a
   trace (`make_fx`) cannot.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from schemas.model_spec import ModelSpec
from schemas.runner import PROBE_BATCH
from workers.engine.probe import PROBE_SEED, probe_input
from workers.engine.rejection import ModelRejected
from workers.engine.screening import GraphSummary, screen_aten_run

# protobuf cannot parse a message of 2 GiB or more; the gateway's upload limit is lower still.
MAX_ONNX_BYTES = 2 * 1024**3 - 1
MIN_IR_VERSION = 3  # onnx2torch's minimum
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
MAX_NAMED = 8
# A model whose opset the converter lacks rules for is brought down with onnx's version
# converter to the highest opset, at least this one, at which it has a rule for every operator.
LOWEST_TARGET_OPSET = 13

# Admission tolerance: the converted model's output may differ from onnxruntime's on the probe
# input by at most ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE · max|onnxruntime output|.
ABSOLUTE_TOLERANCE = 1e-5
RELATIVE_TOLERANCE = 1e-4

# onnx TensorProto.DataType codes of the floating types an input or output may have.
FLOATING_TYPES = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
TENSOR_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def converter_version() -> str:
    from importlib.metadata import version

    return f"onnx2torch {version('onnx2torch')}"


# ---------------------------------------------------------------------------------------------
# Layer 1: the protobuf
# ---------------------------------------------------------------------------------------------


def read_onnx(path: Path) -> Any:
    """The ModelProto, after every check that needs no conversion."""
    import onnx
    from google.protobuf.message import DecodeError

    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise ModelRejected(
            f"the ONNX file has {size} bytes, more than the {MAX_ONNX_BYTES} allowed"
        )
    try:
        proto = onnx.load_model_from_string(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelRejected(f"the file is not a valid ONNX protobuf: {_message(exc)}") from exc
    if not proto.opset_import or not proto.HasField("graph"):
        raise ModelRejected("the file is not an ONNX model (no opset imports or no graph)")
    if proto.ir_version < MIN_IR_VERSION:
        raise ModelRejected(
            f"ONNX IR version {proto.ir_version} is too old (at least {MIN_IR_VERSION})"
        )
    _check_domains(proto)
    _check_no_external_data(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ModelRejected(f"the ONNX model is not valid: {_message(exc)}") from exc
    _check_signature(proto)
    return proto


def _graphs(graph: Any) -> Iterator[Any]:
    """The graph and every sub-graph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


def _tensors(graph: Any) -> Iterator[Any]:
    for g in _graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in g.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("sparse_tensor"):
                    yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
                for sparse in attribute.sparse_tensors:
                    yield from (sparse.values, sparse.indices)


def _check_domains(proto: Any) -> None:
    if len(proto.functions):
        names = sorted({f"{f.domain}.{f.name}" if f.domain else f.name for f in proto.functions})
        raise ModelRejected(
            f"the ONNX model defines functions ({_listed(names)}), which are not accepted: "
            "export with them inlined"
        )
    other = sorted({o.domain for o in proto.opset_import} - STANDARD_DOMAINS)
    if other:
        raise ModelRejected(
            f"the ONNX model imports operator domain(s) {_listed(other)}; only the standard "
            "domain (ai.onnx) is accepted"
        )
    for graph in _graphs(proto.graph):
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                raise ModelRejected(
                    f"the ONNX node {node.name or node.op_type!r} is the operator "
                    f"{node.domain}::{node.op_type}, outside the standard domain (ai.onnx)"
                )


def _check_no_external_data(proto: Any) -> None:
    for tensor in _tensors(proto.graph):
        if tensor.data_location == TENSOR_EXTERNAL or len(tensor.external_data):
            raise ModelRejected(
                f"the ONNX tensor {tensor.name!r} is stored in an external file; upload one "
                "self-contained .onnx file (save without external data)"
            )


def _value_summary(value: Any) -> tuple[int, list[int | None]]:
    tensor_type = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return tensor_type.elem_type, dims


def _graph_inputs(proto: Any) -> list[Any]:
    initializers = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in initializers]


def _check_signature(proto: Any) -> None:
    inputs, outputs = _graph_inputs(proto), list(proto.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelRejected(
            f"the ONNX model has {len(inputs)} input(s) and {len(outputs)} output(s); the audit "
            "needs exactly one of each"
        )
    for what, value in (("input", inputs[0]), ("output", outputs[0])):
        elem_type, dims = _value_summary(value)
        if elem_type not in FLOATING_TYPES:
            raise ModelRejected(
                f"the ONNX model's {what} {value.name!r} is not a floating tensor "
                f"(element type {elem_type})"
            )
        if what == "input" and dims and dims[0] is not None and dims[0] != PROBE_BATCH:
            raise ModelRejected(
                f"the ONNX model's input has a fixed batch size of {dims[0]}; export it with a "
                "dynamic batch dimension (dynamic_axes or dynamic_shapes)"
            )


def default_opset(proto: Any) -> int:
    """The version of the standard domain the model imports."""
    versions = {o.domain: o.version for o in proto.opset_import}
    return int(versions.get("", versions.get("ai.onnx", 0)))


def unsupported_operators(proto: Any, opset: int | None = None) -> list[str]:
    """Every operator of the model (sub-graphs included) the converter has no rule for, at the
    model's opset or at `opset` (for the standard domain) when given."""
    from onnx2torch.node_converters.registry import get_converter

    versions = {o.domain: o.version for o in proto.opset_import}
    versions[""] = default_opset(proto) if opset is None else opset
    missing: set[str] = set()
    for graph in _graphs(proto.graph):
        for node in graph.node:
            domain = "" if node.domain == "ai.onnx" else node.domain
            version = versions.get(domain, 0)
            try:
                get_converter(operation_type=node.op_type, version=version, domain=domain)
            except NotImplementedError:
                missing.add(f"{node.op_type} (opset {version})")
    return sorted(missing)


def supported_opset(proto: Any) -> Any:
    """The model itself when the converter has a rule for each of its operators; else the model
    brought down by `onnx.version_converter` to the highest opset (at least
    LOWEST_TARGET_OPSET) at which it has. Raises ModelRejected naming the operators otherwise.

    Lowering only rewrites operators whose semantics the ONNX standard says are the same at both
    opsets (or adapts them); admission still compares the conversion with onnxruntime running
    the original file, so a lowering that changed what the model computes would be refused."""
    import onnx
    from onnx import version_converter

    missing = unsupported_operators(proto)
    if not missing:
        return proto
    opset = default_opset(proto)
    reason = (
        "the ONNX model uses operator(s) the converter to PyTorch does not support: "
        f"{_listed(missing)}"
    )
    targets = [
        t
        for t in range(opset - 1, LOWEST_TARGET_OPSET - 1, -1)
        if not unsupported_operators(proto, t)
    ]
    if not targets:
        never = sorted({m.split(" ")[0] for m in missing} - _converted_types(proto))
        if never:
            raise ModelRejected(f"{reason}; it has no rule for {_listed(never)} at any opset")
        if opset > LOWEST_TARGET_OPSET:
            raise ModelRejected(
                f"{reason}, nor at any opset from {opset - 1} down to {LOWEST_TARGET_OPSET}"
            )
        raise ModelRejected(f"{reason}; export with opset_version=17")
    failures = []
    for target in targets[:3]:  # each try copies the model
        try:
            lowered = version_converter.convert_version(proto, target)
            onnx.checker.check_model(lowered)
        except Exception as exc:  # noqa: BLE001 - no adapter for one of its operators, ...
            failures.append(f"opset {target}: {_message(exc)}")
            continue
        if not unsupported_operators(lowered):
            return lowered
        failures.append(f"opset {target}: {_listed(unsupported_operators(lowered))}")
    raise ModelRejected(
        f"{reason}, and onnx's version converter cannot bring it down to an opset the converter "
        f"supports ({'; '.join(failures)[:500]}); export with opset_version=17"
    )


def prepare(proto: Any) -> Any:
    """What the converter gets: the model, if need be rewritten so that onnx2torch converts it;
    every rewrite computes exactly what the original computes (admission checks the conversion
    against onnxruntime running the original file):
    - `Gelu` (a standard function since opset 20; both exporters of torch 2.14 write it, and
      onnx2torch has no rule for it) expanded into its defining `Erf`/`Tanh` formula;
    - the opset lowered (`supported_opset`) when the converter lacks rules at the model's;
    - `Reshape`'s `allowzero=1` (the default exporter's) dropped where the shape is a constant
      with no 0, the only case where it means anything;
    - shapes inferred with data propagation (`onnx.shape_inference`, `data_prop=True`), so that
      the converter sees the static sizes a `Shape` → `Gather` → `Concat` chain computes (its
      `LayerNormalization` rule needs them)."""
    import onnx

    proto = supported_opset(_expand_gelu(proto))
    proto = _drop_meaningless_allowzero(proto)
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - onnx2torch infers shapes itself, without data propagation
        return proto


_GELU_NONE = (
    # y = x · (1 + erf(x / √2)) · ½
    ("Mul", ("X", "c_rsqrt2"), "t"),
    ("Erf", ("t",), "e"),
    ("Add", ("e", "c_one"), "s"),
    ("Mul", ("X", "s"), "m"),
    ("Mul", ("m", "c_half"), "Y"),
)
_GELU_TANH = (
    # y = x · (1 + tanh(√(2/π) · (x + 0.044715 x³))) · ½
    ("Mul", ("X", "X"), "x2"),
    ("Mul", ("x2", "X"), "x3"),
    ("Mul", ("x3", "c_cubic"), "k"),
    ("Add", ("X", "k"), "inner"),
    ("Mul", ("inner", "c_sqrt2pi"), "t"),
    ("Tanh", ("t",), "h"),
    ("Add", ("h", "c_one"), "s"),
    ("Mul", ("X", "s"), "m"),
    ("Mul", ("m", "c_half"), "Y"),
)
_GELU_CONSTANTS = {
    "c_rsqrt2": 0.5**0.5,
    "c_one": 1.0,
    "c_half": 0.5,
    "c_cubic": 0.044715,
    "c_sqrt2pi": (2.0 / 3.141592653589793) ** 0.5,
}


def _expand_gelu(proto: Any) -> Any:
    """A copy of the model with every `Gelu` of its main graph replaced by its formula (ONNX's
    own definition of the operator), in the element type of the `Gelu`'s input."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if not any(n.op_type == "Gelu" and n.domain in STANDARD_DOMAINS for n in proto.graph.node):
        return proto
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - the types then come from the graph input
        inferred = proto
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    default_type = _value_summary(_graph_inputs(proto)[0])[0]
    names = {v for n in proto.graph.node for v in [*n.input, *n.output]}
    names |= {t.name for t in proto.graph.initializer} | {v.name for v in proto.graph.input}
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    nodes = []
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "Gelu" or node.domain not in STANDARD_DOMAINS:
            nodes.append(node)
            continue
        approximate = next(
            (a.s.decode() for a in node.attribute if a.name == "approximate"), "none"
        )
        if approximate not in ("none", "tanh"):
            nodes.append(node)  # invalid: onnx.checker has said so already
            continue
        elem_type = types.get(node.input[0]) or default_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        prefix = f"tightrope_gelu_{index}"
        while any(name.startswith(prefix) for name in names):
            prefix += "_"
        local = {"X": node.input[0], "Y": node.output[0]}
        for name, value in _GELU_CONSTANTS.items():
            local[name] = f"{prefix}_{name}"
            model.graph.initializer.append(
                numpy_helper.from_array(np.array(value, dtype=dtype), local[name])
            )
        formula = _GELU_TANH if approximate == "tanh" else _GELU_NONE
        for step, (op, inputs, output) in enumerate(formula):
            local.setdefault(output, f"{prefix}_{output}")
            nodes.append(
                helper.make_node(
                    op, [local[i] for i in inputs], [local[output]], name=f"{prefix}_{step}"
                )
            )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _drop_meaningless_allowzero(proto: Any) -> Any:
    """`allowzero=1` makes a 0 in `Reshape`'s shape mean a dimension of size 0 instead of
    "copy the input's": with a constant shape holding no 0 it changes nothing, and onnx2torch
    refuses it. A copy of the model without it there (the main graph)."""
    import onnx
    from onnx import numpy_helper

    constants = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    meaningless = []
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "Reshape" or node.domain not in STANDARD_DOMAINS:
            continue
        allowzero = [i for i, a in enumerate(node.attribute) if a.name == "allowzero" and a.i]
        shape = constants.get(node.input[1]) if len(node.input) > 1 else None
        if allowzero and shape is not None and (numpy_helper.to_array(shape) != 0).all():
            meaningless.append((index, allowzero[0]))
    if not meaningless:
        return proto
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for index, attribute in meaningless:
        del model.graph.node[index].attribute[attribute]
    return model


def _converted_types(proto: Any) -> set[str]:
    """The operator types of the model the converter has a rule for at some opset."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    known = {d.operation_type for d in _CONVERTER_REGISTRY if d.domain == ""}
    return {n.op_type for g in _graphs(proto.graph) for n in g.node} & known


# ---------------------------------------------------------------------------------------------
# Conversion and layers 2 and 3: the converted graph
# ---------------------------------------------------------------------------------------------


def convert(proto: Any) -> torch.fx.GraphModule:
    from onnx2torch import convert as onnx2torch_convert

    try:
        module = onnx2torch_convert(proto)
    except NotImplementedError as exc:  # the converter names the operator or the attribute
        raise ModelRejected(f"the ONNX model cannot be converted: {_message(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - a model the converter chokes on is a rejection
        raise ModelRejected(
            f"the ONNX model cannot be converted: {type(exc).__name__}: {_message(exc)}"
        ) from exc
    return module.eval()


def screen_converted(module: torch.fx.GraphModule, example: torch.Tensor | None) -> GraphSummary:
    """Layer 2 always; layer 3 when an example input tells the shapes."""
    modules = dict(module.named_modules())
    count = 0
    for node in module.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        count += 1
        if node.op == "call_function" and node.target is operator.getitem:
            continue
        if node.op == "call_module":
            owner = type(modules[str(node.target)]).__module__
            if owner.startswith(("onnx2torch.", "torch.nn.modules.")):
                continue
            raise ModelRejected(f"the converted ONNX graph calls a module of {owner}")
        raise ModelRejected(f"the converted ONNX graph has a {node.op} node ({node.target})")
    graphs = 1
    if example is not None:
        try:
            with torch.no_grad():
                screen_aten_run(module, (example,), "the converted ONNX graph")
        except ModelRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - the model fails on its own input shape
            raise ModelRejected(
                f"the converted ONNX model fails on an input of shape {list(example.shape)}: "
                f"{_message(exc)}"
            ) from exc
        graphs += 1
    return GraphSummary(forward_op_count=count, methods_screened=graphs)


def example_input(proto: Any, spec: ModelSpec, device: torch.device) -> torch.Tensor | None:
    """The probe's input; for a measurement model whose spec does not tell the measurement's
    shape, noise of the shape the ONNX input declares (batch PROBE_BATCH), when it is fixed."""
    x, _ = probe_input(spec, device)
    elem_type, dims = _value_summary(_graph_inputs(proto)[0])
    dtype = FLOATING_TYPES[elem_type]
    if x is not None:
        return x.to(dtype)
    if not dims or any(d is None for d in dims[1:]):
        return None
    lo, hi = spec.value_range
    generator = torch.Generator().manual_seed(PROBE_SEED)
    shape = (PROBE_BATCH, *[int(d) for d in dims[1:] if d is not None])
    noise = torch.rand(shape, generator=generator) * (hi - lo) + lo
    return noise.to(device=device, dtype=dtype)


def load_onnx(
    path: Path, spec: ModelSpec, device: torch.device
) -> tuple[torch.nn.Module, GraphSummary]:
    """Screen, convert and screen again; the converted module on `device`, in eval mode."""
    proto = read_onnx(path)
    convertible = prepare(proto)
    module = convert(convertible)
    module.meta["onnx_converted_opset"] = default_opset(convertible)
    summary = screen_converted(module, example_input(proto, spec, torch.device("cpu")))
    return module.to(device).eval(), summary


# ---------------------------------------------------------------------------------------------
# Admission: the conversion against onnxruntime
# ---------------------------------------------------------------------------------------------


def verify_conversion(
    path: Path, module: torch.nn.Module, spec: ModelSpec, device: torch.device
) -> dict[str, Any]:
    """Run the original with onnxruntime and the converted module on the probe input; raise
    ModelRejected when they differ beyond the tolerance. Returns facts for the admission."""
    proto = read_onnx(path)
    x = example_input(proto, spec, torch.device("cpu"))
    if x is None:
        raise ModelRejected(
            "the conversion of this ONNX model cannot be checked: its input has dimensions "
            "other than the batch that are not fixed, and the spec names neither `operator` "
            "nor `measurement_shape`"
        )
    started = time.perf_counter()
    reference = _run_onnxruntime(path, proto, x)
    with torch.no_grad():
        try:
            converted = module(x.to(device))
        except Exception as exc:  # noqa: BLE001
            raise ModelRejected(
                f"the converted ONNX model fails on an input of shape {list(x.shape)}: "
                f"{_message(exc)}"
            ) from exc
    if not isinstance(converted, torch.Tensor):
        raise ModelRejected("the converted ONNX model does not return one tensor")
    converted = converted.detach().cpu().to(torch.float64)
    if list(converted.shape) != list(reference.shape):
        raise ModelRejected(
            f"the converted ONNX model returns shape {list(converted.shape)}, onnxruntime "
            f"{list(reference.shape)}"
        )
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    tolerance = ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * scale
    difference = float((converted - reference).abs().max()) if reference.numel() else 0.0
    if not difference <= tolerance:  # NaN differences are disagreements too
        raise ModelRejected(
            f"the conversion to PyTorch disagrees with onnxruntime on the probe input: largest "
            f"difference {difference:.3g}, tolerance {tolerance:.3g} ({ABSOLUTE_TOLERANCE:g} + "
            f"{RELATIVE_TOLERANCE:g} x the largest output magnitude {scale:.3g})"
        )
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    meta = getattr(module, "meta", {})
    return {
        "onnx_converter": converter_version(),
        "onnx_opsets": opsets,
        # the opset converted (lower than the model's when onnx's version converter lowered it)
        "onnx_converted_opset": meta.get("onnx_converted_opset", default_opset(proto)),
        "onnx_nodes": len(proto.graph.node),
        "onnx_max_difference": difference,
        "onnx_tolerance": tolerance,
        "onnx_check_seconds": round(time.perf_counter() - started, 6),
    }


def _run_onnxruntime(path: Path, proto: Any, x: torch.Tensor) -> torch.Tensor:
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(torch.get_num_threads(), 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: stdout/stderr stay quiet
    try:
        session = onnxruntime.InferenceSession(
            path.read_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        name = _graph_inputs(proto)[0].name
        array = x.detach().cpu().numpy()
        (output,) = session.run(None, {name: array})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelRejected(
            f"onnxruntime cannot run the model on an input of shape {list(x.shape)}: "
            f"{_message(exc)}"
        ) from exc
    return torch.from_numpy(np.asarray(output, dtype=np.float64))


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    more = len(items) - MAX_NAMED
    return shown + (f", and {more} more" if more > 0 else "")


def _message(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__
