"""The int8 recipe as data: what is quantized, how, and what stays in fp32 and why.

Explicit quantization: the UNet graph gets QuantizeLinear/DequantizeLinear (Q/DQ) pairs around the inputs of the
ops chosen here (weights: one DequantizeLinear over int8 weights, per output channel). Runtimes fuse
DQ -> op -> Q into integer kernels (ONNX Runtime: QLinearConv / QLinearMatMul / MatMulIntegerToFloat; OpenVINO
and TensorRT read the same Q/DQ graph as int8); everything without Q/DQ runs in float.

Anchored on NVIDIA ModelOpt's diffusion int8 recipe: convolutions and linear layers in int8 with per-channel weights
and a percentile-style activation range taken over real denoising steps; norms, softmax and the attention matmuls
stay high precision. What differs between targets is the activation type:
  u8  asymmetric uint8 activations, int8 weights: ONNX Runtime's fast x86 path (U8S8 on AVX512-VNNI: vpdpbusd
      multiplies unsigned by signed bytes), and the zero point spends all 256 levels on a skewed (post-SiLU) range.
  s8  symmetric int8 activations (zero point 0), int8 weights: what TensorRT 10 requires of Q/DQ graphs (it rejects
      or falls back on non-zero zero points); ORT CPU runs it too, converting s8 activations to u8 internally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ops whose activations and weights are quantized; everything else (norms, softmax, SiLU/GELU, adds, resizes)
# stays fp32: they are memory-bound, so int8 would buy little and cost accuracy (GroupNorm statistics, exp).
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    activations: str = "u8"         # "u8": asymmetric uint8 (ORT CPU) | "s8": symmetric int8 (TensorRT)
    op_types: tuple[str, ...] = QUANTIZED_OPS
    per_channel: bool = True        # one weight scale per output channel: conv filters differ by 10x in range
    # Activation ranges: each calibration sample (one UNet call at one denoising step) gives a per-tensor range,
    # either its min/max or its `percentile` (two-sided); `combine` merges the samples: "max" keeps the widest
    # (outliers of the noisiest step decide), "mean" averages them (ModelOpt's per-step amax averaging).
    calibration: str = "percentile"  # "minmax" | "percentile"
    percentile: float = 99.99
    combine: str = "mean"           # "max" | "mean"
    # What stays fp32 (found structurally in the graph, not by node names; see `excluded_nodes`):
    keep_first_last: bool = True    # conv_in (4 -> 320 ch: the latent itself) and conv_out (what the scheduler
    #                                 integrates): <1% of FLOPs, and their error goes straight into the latent.
    keep_conditioning: bool = True  # layers that never see the latent: time embedding MLP, every ResNet's
    #                                 time_emb_proj, cross-attention K/V of the text, SDXL's add_embedding. They
    #                                 run on batch (or batch x 77) rows: no speed to gain, a shift on every pixel.
    keep_attention_matmuls: bool = True  # Q.K^T and P.V: activation x activation (both need per-call scales,
    #                                      softmax probabilities span 1e-6..1) and ~5% of FLOPs at 32x32 latents.
    # Op types whose *output* is not re-quantized (ORT then fuses DQ -> MatMul into MatMulIntegerToFloat with a
    # float output, saving a Q/DQ round trip when the consumer is a float op anyway).
    float_outputs: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.activations not in ("u8", "s8"):
            raise ValueError(f"activations must be u8 or s8, not {self.activations!r}")
        if self.calibration not in ("minmax", "percentile") or self.combine not in ("max", "mean"):
            raise ValueError(f"bad calibration {self.calibration!r}/{self.combine!r}")

    def summary(self) -> dict:
        """The recipe as JSON-able data for the manifest."""
        from dataclasses import asdict

        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


RECIPES = {
    # ONNX Runtime on x86 CPUs (AVX512-VNNI / AVX-VNNI): U8S8.
    "ort-cpu": Int8Recipe("ort-cpu", activations="u8"),
    # TensorRT 10 (the TRT helper builds from this graph with the INT8 flag): symmetric s8 everywhere.
    "tensorrt": Int8Recipe("tensorrt", activations="s8"),
}


def get_recipe(recipe) -> Int8Recipe:
    """An Int8Recipe, or the one named so in RECIPES."""
    if isinstance(recipe, Int8Recipe):
        return recipe
    if recipe not in RECIPES:
        from sdrt.errors import SdrtError

        raise SdrtError(f"unknown int8 recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[recipe]


# ---- finding the fp32 islands in a graph ---------------------------------------------------------------------------

def excluded_nodes(model, recipe: Int8Recipe, latent_input: str = "sample") -> dict[str, str]:
    """{node name: why it stays fp32} for the quantizable nodes (recipe.op_types) the recipe keeps in float.

    Structural, so it holds for any exporter's node names: a node's role comes from what its inputs depend on.
      conditioning: its data input does not depend on the latent input (time embedding, text K/V).
      attention:    a MatMul whose two inputs both depend on graph inputs (no weight).
      first / last: the quantizable nodes with no other quantizable node between them and the latent input /
                    the graph output (conv_in, conv_out).
    """
    g = model.graph
    const = {t.name for t in g.initializer} | {""}
    for n in g.node:  # Constant nodes and anything computed from constants only (shapes, transposed weights)
        if n.op_type == "Constant" or all(i in const for i in n.input):
            const.update(n.output)
    on_latent = {latent_input}      # tensors computed from the latent
    past_op = set()                 # latent tensors that went through a quantizable op
    quantizable = [n for n in g.node if n.op_type in recipe.op_types]
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type in ("Shape", "Size"):  # reads only the latent's size (timestep.expand(batch)): not its values
            continue
        if any(i in on_latent for i in ins):
            on_latent.update(n.output)
            if n.op_type in recipe.op_types or any(i in past_op for i in ins):
                past_op.update(n.output)
    # reverse: tensors from which a graph output is reached without crossing a quantizable op
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    reaches_out_free = {o.name for o in g.output}
    for n in reversed(g.node):
        if n.op_type not in recipe.op_types and any(o in reaches_out_free for o in n.output):
            reaches_out_free.update(i for i in n.input if i not in const)

    why: dict[str, str] = {}
    for n in quantizable:
        data = n.input[0]
        if recipe.keep_conditioning and data not in on_latent:
            why[n.name] = "conditioning: never sees the latent (time embedding, text K/V); batch-sized, no speedup"
        elif recipe.keep_attention_matmuls and n.op_type == "MatMul" and all(i not in const for i in n.input[:2]):
            why[n.name] = "attention scores/values: activation x activation, softmax range"
        elif recipe.keep_first_last and data in on_latent and data not in past_op:
            why[n.name] = "first layer on the latent (conv_in)"
        elif recipe.keep_first_last and any(o in reaches_out_free for o in n.output):
            why[n.name] = "last layer before the output (conv_out)"
    return why
