"""Screening of uploaded models before and after loading: uploaded models are programs.

Three layers, cheapest first:
1. `detect_format` and `screen_archive`: the bytes are of the declared format; a zip archive
   passes schemas.archive_rules (count, sizes, compression ratio, no `..`/absolute/symlink
   names, no native code, one top-level folder, only the entries its format writes). The
   gateway applies the same rules, with the same limits, at upload; they are applied again here
   because the sandbox must not trust what reached it (defence in depth).
2. Before anything in an archive is deserialised: a TorchScript archive's source (`code/`) must
   not name file operations (a `__setstate__` runs at load time); a `.pt2` archive must carry no
   pickled payloads, so that `torch.export.load` never falls back to full unpickling. These are
   schemas.archive_rules too (the gateway refuses them at upload); only the `.pt2` sample
   inputs, read with torch's weights-only unpickler, are checked here alone.
3. After loading: `screen_torchscript_module` inlines every method of every submodule and
   checks every node against an allow-list; `screen_exported_program` does the same for the
   exported graph's `call_function` targets; `screen_aten_run` checks every aten operator a
   converted ONNX model dispatches on its probe input, before it runs.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.archive_rules import (
    ARCHIVE_FORMAT_NAMES,
    ZIP_MAGIC,
    ArchiveLimits,
    InputRefused,
    archive_root,
    check_model_contents,
    check_model_entries,
    inspect_zip,
    relative_name,
    zip_model_format,
)
from schemas.model_spec import ModelFormat
from workers.engine.rejection import ModelRejected
from workers.shared.limits import archive_limits

MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024**2
# An ONNX ModelProto starts with its ir_version (field 1, varint): every ONNX writer serialises
# fields in number order.
ONNX_FIRST_BYTE = b"\x08"

# ---------------------------------------------------------------------------------------------
# Operation policy, shared by TorchScript and torch.export graphs
# ---------------------------------------------------------------------------------------------

# Operations rejected by name, with the reason a user sees.
DENIED_OPERATIONS: dict[str, str] = {
    "aten::from_file": "reads a file",
    "aten::save": "writes a file",
    "aten::_print": "writes to standard output, which carries the runner's protocol",
    "prim::Print": "writes to standard output, which carries the runner's protocol",
    "aten::manual_seed": "changes the process's random state, which the audit's seeds control",
    "aten::seed": "changes the process's random state, which the audit's seeds control",
}

# TorchScript `prim::` node kinds that only build values, branch or read attributes.
ALLOWED_PRIM_KINDS: frozenset[str] = frozenset(
    {
        "prim::Constant",
        "prim::ListConstruct",
        "prim::ListUnpack",
        "prim::TupleConstruct",
        "prim::TupleUnpack",
        "prim::TupleIndex",
        "prim::TupleSlice",
        "prim::DictConstruct",
        "prim::GetAttr",
        "prim::SetAttr",
        "prim::If",
        "prim::Loop",
        "prim::Return",
        "prim::RaiseException",
        "prim::Uninitialized",
        "prim::unchecked_cast",
        "prim::unchecked_unwrap_optional",
        "prim::isinstance",
        "prim::NumToTensor",
        "prim::device",
        "prim::dtype",
        "prim::layout",
        "prim::requires_grad",
        "prim::data",
        "prim::shape",
        "prim::min",
        "prim::max",
        "prim::abs",
        "prim::index",
        "prim::StringIndex",
        "prim::CreateObject",
        "prim::EnumName",
        "prim::EnumValue",
        "prim::ModuleContainerIndex",
        "prim::BroadcastSizes",
        "prim::ConstantChunk",
        "prim::AutogradZero",
        "prim::AutogradAdd",
        "prim::AutogradAnyNonZero",
        "prim::AutogradAllZero",
        "prim::AutogradAllNonZero",
        "prim::tolist",
        "prim::itemsize",
        "prim::nbytes",
        "prim::is_cpu",
        "prim::is_cuda",
        "prim::is_meta",
        "prim::is_mkldnn",
        "prim::is_quantized",
        "prim::is_sparse",
        "prim::is_sparse_csr",
        "prim::is_nested",
        "prim::is_xpu",
        "prim::is_mps",
    }
)

# Calls left after inlining go through an interface: their target is not known statically.
DYNAMIC_CALL_KINDS = frozenset({"prim::CallMethod", "prim::CallFunction"})

# Custom C++ classes (torch.classes) run native code outside the tensor operator set.
CUSTOM_CLASS_MARK = "__torch__.torch.classes."

# torch.export graphs: higher-order operators whose bodies are sub-graphs that are walked too.
ALLOWED_HIGHER_ORDER = frozenset({"cond", "while_loop"})


def operation_refusal(kind: str) -> str | None:
    """Why the operation `kind` ("namespace::name") is not allowed, or None when it is."""
    if kind in DENIED_OPERATIONS:
        return f"uses {kind}, which {DENIED_OPERATIONS[kind]}"
    namespace = kind.split("::", 1)[0]
    if namespace == "aten":
        return None
    if namespace == "prim" and kind in ALLOWED_PRIM_KINDS:
        return None
    return f"uses {kind}, which is not in the allow-list of tensor operations"


# ---------------------------------------------------------------------------------------------
# Layer 1: format and archive
# ---------------------------------------------------------------------------------------------


def detect_format(path: Path) -> ModelFormat | None:
    """Recognise the format from the bytes (not the file name)."""
    with path.open("rb") as f:
        head = f.read(9)
    if head[:4] == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        return zip_model_format(names)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == ONNX_FIRST_BYTE:
        return "onnx"  # parsed and checked by workers.engine.onnx_models
    return None


def _describe(fmt: ModelFormat | None) -> str:
    if fmt in ARCHIVE_FORMAT_NAMES:
        return ARCHIVE_FORMAT_NAMES[fmt]
    return {"safetensors": "a safetensors file", "onnx": "an ONNX model"}.get(
        fmt or "", "no accepted model format"
    )


def check_declared_format(path: Path, declared: ModelFormat) -> None:
    actual = detect_format(path)
    if actual == declared:
        return
    hint = ""
    if actual is None and _is_zip(path):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelRejected(
                f"the archive cannot be read as a zip file (truncated or corrupt): {exc}"
            ) from exc
        hint = " (a zip of another kind: a torch.save checkpoint is a pickle and is not accepted)"
    raise ModelRejected(
        f"the file was declared {declared!r} but its bytes are {_describe(actual)}{hint}"
    )


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == ZIP_MAGIC


def screen_archive(path: Path, fmt: ModelFormat, limits: ArchiveLimits | None = None) -> None:
    """Layers 1 and 2 for an archive format: raises ModelRejected, loads nothing. A zip is held
    to schemas.archive_rules (the gateway's rules) with `limits`, by default those in force
    (workers.shared.limits: the job's)."""
    check_declared_format(path, fmt)
    if fmt == "safetensors":
        _screen_safetensors_header(path)
        return
    if fmt == "onnx":
        return  # a protobuf, not an archive: workers.engine.onnx_models screens it
    try:
        entries = inspect_zip(path, limits or archive_limits())
        archive_root(entries)
        check_model_entries(entries, fmt)
        check_model_contents(path, entries, fmt)
    except InputRefused as exc:
        raise ModelRejected(exc.reason) from None
    if fmt == "export":
        with zipfile.ZipFile(path) as archive:
            _screen_export_sample_inputs(archive, entries)


def _screen_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        if header_length > min(MAX_SAFETENSORS_HEADER_BYTES, size - 8):
            raise ModelRejected(
                f"the safetensors header claims {header_length} bytes; the file has {size}"
            )
        try:
            header = json.loads(f.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelRejected(f"the safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelRejected("the safetensors header is not a JSON object")


def _screen_export_sample_inputs(archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo]) -> None:
    """The .pt2 sample inputs load with torch's weights-only unpickler (the rest of the archive's
    payloads: schemas.archive_rules.check_export_archive)."""
    for entry in entries:
        relative = relative_name(entry.filename)
        if not relative.startswith("data/sample_inputs/"):
            continue
        try:
            torch.load(io.BytesIO(archive.read(entry)), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means "not weights-only"
            raise ModelRejected(
                f"the .pt2 sample inputs {relative!r} need full unpickling: {exc}"
            ) from exc


# ---------------------------------------------------------------------------------------------
# Layer 3: loaded graphs
# ---------------------------------------------------------------------------------------------


@dataclass
class GraphSummary:
    """What screening saw: nodes in the inlined `forward` graph, and methods screened."""

    forward_op_count: int
    methods_screened: int


def _walk(block: torch._C.Block) -> Iterator[torch._C.Node]:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _walk(sub)


def _screen_graph(graph: torch._C.Graph, where: str) -> int:
    """Raise on the first refused node of the inlined graph; return its node count."""
    inlined = graph.copy()
    torch._C._jit_pass_inline(inlined)
    count = 0
    for node in _walk(inlined.block()):
        count += 1
        kind = node.kind()
        if kind in DYNAMIC_CALL_KINDS:
            raise ModelRejected(
                f"{where} makes a dynamic call ({kind}) whose target cannot be screened"
            )
        refusal = operation_refusal(kind)
        if refusal is not None:
            raise ModelRejected(f"{where} {refusal}")
        for value in [*node.inputs(), *node.outputs()]:
            if CUSTOM_CLASS_MARK in str(value.type()):
                raise ModelRejected(f"{where} uses a custom C++ class ({value.type()})")
    return count


def screen_torchscript_module(module: torch.jit.ScriptModule) -> GraphSummary:
    """Screen every method and hook of the module and of all its submodules."""
    forward_count = 0
    screened = 0
    for path, sub in module.named_modules():
        owner = f"module {path!r}" if path else "the model"
        graphs: list[tuple[str, torch._C.Graph]] = [
            (name, sub._c._get_method(name).graph) for name in sub._c._method_names()
        ]
        graphs += [(f"forward hook {h.name}", h.graph) for h in sub._c._get_forward_hooks()]
        graphs += [(f"forward pre-hook {h.name}", h.graph) for h in sub._c._get_forward_pre_hooks()]
        for name, graph in graphs:
            count = _screen_graph(graph, f"{owner}, method {name},")
            screened += 1
            if not path and name == "forward":
                forward_count = count
    return GraphSummary(forward_op_count=forward_count, methods_screened=screened)


def screen_exported_program(program: torch.export.ExportedProgram) -> GraphSummary:
    """Screen the exported graph and its sub-graphs: aten operators only (plus `operator.*`
    on symbolic sizes and the allowed higher-order control flow)."""
    count = 0
    graphs = 0
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        graphs += 1
        for node in module.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                raise ModelRejected(f"the exported graph has a {node.op} node ({node.target})")
            count += 1
            refusal = _exported_target_refusal(node.target)
            if refusal is not None:
                raise ModelRejected(f"the exported graph {refusal}")
    return GraphSummary(forward_op_count=count, methods_screened=graphs)


def _exported_target_refusal(target: object) -> str | None:
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        namespace = target.namespace
        name = target._schema.name if isinstance(target, torch._ops.OpOverload) else None
        kind = name or f"{namespace}::{target.__name__}"
        if namespace != "aten":
            return f"uses {kind}, which is not in the allow-list of tensor operations"
        return operation_refusal(kind)
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() in ALLOWED_HIGHER_ORDER:
            return None
        return f"uses the higher-order operator {target.name()}, which is not allowed"
    # `operator.getitem`, `operator.mul`, ... on tuples and symbolic sizes
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return None
    return f"calls {getattr(target, '__qualname__', target)!r}, which is not an aten operator"


def screen_aten_run(
    function: Callable[..., Any], args: tuple[Any, ...], where: str
) -> tuple[Any, int]:
    """Run `function(*args)` with every aten operator it dispatches checked against the policy
    of exported programs *before* it executes (a converted ONNX model, run on its probe input);
    return the result and the number of operators run.

    Unlike a trace (`make_fx`), the run sees real values, so operators whose output shape
    depends on a tensor's values (an ONNX `Reshape` reading the shape tensor that `Shape`,
    `Gather` and `Concat` computed) are screened like any other; and a refused operator raises
    ModelRejected without having run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = 0
    refused: list[str] = []  # kept even if the code that called the operator swallows the raise

    class _Screen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal count
            refusal = _exported_target_refusal(func)
            if refusal is not None:
                refused.append(f"{where} {refusal}")
                raise ModelRejected(refused[-1])
            count += 1
            return func(*args, **(kwargs or {}))

    try:
        with _Screen():
            result = function(*args)
    except Exception:
        if refused:
            raise ModelRejected(refused[0]) from None
        raise
    if refused:
        raise ModelRejected(refused[0])
    return result, count
