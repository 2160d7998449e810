"""Graph-level steps of an export, each a function over an onnx_ir Model: trace, clean up, fp16, save.

Tracer: `torch.onnx.export(dynamo=False)` (TorchScript). On these models it is the reliable one: it records the
UNet's size-following upsampling as Shape -> Resize ops, so one graph serves every multiple of 8 pixels. The dynamo
exporter (torch.export) turns the same Python shape checks into guards: tiny's UNet failed strict export with a
constraint violation ("batch <= 63", from diffusers' `if shape[0] >= 64` in Upsample2D), fell back to non-strict
and took 47 s against 2.3 s for TorchScript, with the same ORT error (1e-6).

Clean-up is the onnxscript optimizer (the one torch.onnx's own dynamo path uses) on onnx_ir: constant folding with
node-level shape inference, dead-node and common-subexpression elimination, initializer de-duplication. Chosen over
onnxslim because onnx_ir keeps external weights memory-mapped: SD1.5's 3.4 GB UNet is optimized in ~130 MB of RSS,
where onnxslim needs the whole model as one protobuf (and fails above 2 GB: "Failed to serialize proto"). fp16
conversion is onnxruntime's float16 converter with a node block list.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from sdrt.errors import SdrtError

# protobuf cannot serialise a message over 2 GiB: bigger graphs keep their weights in one `<file>.data` beside them.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # bytes of initializers; 64 MiB of headroom for the graph itself
NO_FP16 = ("MatMul", "Gemm", "Conv")       # where the fp32 time-embedding subgraph ends (its first linear layer)


def trace(spec, args: tuple, path: Path, opset: int):
    """Trace spec.module at `args` into `path` (torch writes one file per tensor beside it for graphs over 2 GB)
    and return it as an onnx_ir Model whose weights stay on disk until used."""
    import onnx_ir as ir

    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings flag diffusers' Python-side shape checks; the ones that matter are handled by tracing at
        # a size that takes the size-following path (onnx_specs), so they are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(spec.module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_axes=spec.dynamic_axes, do_constant_folding=True)
    model = ir.load(path)
    got = ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs])
    want = ([t.name for t in spec.inputs], [t.name for t in spec.outputs])
    if got != want:
        raise SdrtError(f"{spec.name}: traced graph has I/O {got}, the contract says {want}")
    # Declare the contract's shapes on the graph I/O (torch names only the dynamic axes it was given, and leaves
    # derived output sizes such as the decoder's 8*h unnamed): backends and TensorRT profiles read these.
    for v, t in zip([*model.graph.inputs, *model.graph.outputs], [*spec.inputs, *spec.outputs]):
        v.shape = ir.Shape(t.shape)
    return model


def optimize(model) -> None:
    """In place: constant folding, shape inference, dead-node removal for downstream compilers (TensorRT, ...)."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize(model)


def to_fp16(model, spec):
    """fp16 weights and activations, except the known overflow/precision spots, which stay fp32:
    - the timestep (and SDXL time-id) sinusoidal embeddings, up to their first linear layer: diffusers computes
      them in fp32 too; fp16 has 0.5 of spacing at t=999, i.e. up to 0.25 rad of phase error per unit frequency;
    - for SD 2.x, QK^T and the softmax (what diffusers' upcast_attention does; 2.1's scores overflow 65504).
    Consumes `model` (its weights move to the returned one)."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    blocked = fp32_nodes(model, spec.keep_fp32_inputs, spec.fp32_attention_scores)
    # The converter works on one in-memory protobuf, several copies of it for SD1.5's 3.4 GB UNet (OOM at 11 GB).
    # So it converts a skeleton: every fp32 weight over 1 KiB that only fp16 nodes read becomes a graph input of
    # the same type and shape (the converter retypes it as it would the initializer), and goes back in below as a
    # lazy fp16 tensor, converted one at a time while saving (_half).
    weights = {}
    for name, v in list(model.graph.initializers.items()):
        if v.dtype == ir.DataType.FLOAT and v.const_value.nbytes > 1024 and not any(
                c.name in blocked or c.op_type in DEFAULT_OP_BLOCK_LIST for c in v.consumers()):
            weights[name] = v.const_value
            model.graph.initializers.pop(name)
            v.const_value = None
            model.graph.inputs.append(v)
    ir.external_data.load_to_model(model)  # the small remaining constants
    m = OnnxModel(ir.serde.serialize_model(model))
    # Besides converting, this removes the Cast pairs fp32 -> fp16 -> fp32 the converter leaves between kept inputs
    # and blocked nodes (and between two blocked nodes), so the fp32 islands really stay fp32.
    m.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=list(spec.keep_fp32_inputs),
                               op_block_list=DEFAULT_OP_BLOCK_LIST, node_block_list=sorted(blocked))
    out = ir.serde.deserialize_model(m.model)
    for v in [v for v in out.graph.inputs if v.name in weights]:
        t = weights[v.name]
        out.graph.inputs.remove(v)
        v.const_value = ir.LazyTensor(lambda t=t: _half(t), dtype=ir.DataType.FLOAT16, shape=t.shape, name=v.name)
        out.graph.register_initializer(v)
    return out


def _half(t):
    """fp32 -> fp16 saturating at +-65504 like the converter's convert_np_to_float16, 7x faster (25 s -> 3.4 s on
    SD1.5's UNet); it differs only for |x| < 3e-8, which it rounds to the smallest subnormal instead of 0."""
    import numpy as np
    import onnx_ir as ir

    out = ir.Tensor(np.clip(t.numpy(), -65504, 65504).astype(np.float16), name=t.name)
    if isinstance(t, ir.ExternalTensor):
        t.release()  # unmap the fp32 source now: its touched pages count in RSS until then
    return out


def fp32_nodes(model, inputs: tuple[str, ...], attention_scores: bool) -> set[str]:
    """Names of the nodes fed (transitively) by the graph inputs `inputs` before any NO_FP16 op, plus, if
    `attention_scores`, every Softmax and the MatMul (QK^T) feeding it through elementwise ops."""
    blocked, todo = set(), [n for v in model.graph.inputs if v.name in inputs for n in v.consumers()]
    while todo:
        n = todo.pop()
        if n.name in blocked or n.op_type in NO_FP16:
            continue
        blocked.add(n.name)
        todo += [c for y in n.outputs for c in y.consumers()]
    for n in model.graph if attention_scores else ():
        if n.op_type != "Softmax":
            continue
        blocked.add(n.name)
        p = n.inputs[0].producer()
        while p is not None and p.op_type in ("Mul", "Div", "Add", "Where", "MatMul"):
            blocked.add(p.name)
            if p.op_type == "MatMul":
                break
            p = p.inputs[0].producer()
    return blocked


def initializer_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> str | None:
    """Write `path`; weights go to `<path.name>.data` beside it when they exceed the threshold (capped at
    EXTERNAL_DATA_THRESHOLD). Returns that file's name or None. The data file name is recorded inside the graph,
    so `path` must already have its final name (only its folder changes later)."""
    import onnx_ir as ir

    if initializer_bytes(model) <= min(external_data_threshold, EXTERNAL_DATA_THRESHOLD):
        ir.save(model, path)
        return None
    data = path.name + ".data"
    ir.save(model, path, external_data=data)
    return data


def io_dtypes(path: Path) -> dict[str, str]:
    """{input/output name: numpy dtype name} as the saved graph declares them (weights not loaded)."""
    import numpy as np

    model = onnx.load(str(path), load_external_data=False)
    return {v.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name
            for v in list(model.graph.input) + list(model.graph.output)}
