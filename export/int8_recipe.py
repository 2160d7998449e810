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
      or falls back on non-zero zero points). On ORT CPU, s8 with the u8 recipe's placement ran 1.86x over fp32
      against 2.38x for u8 on sd15: u8 is the CPU choice.
SmoothQuant is not used: ORT's `SmoothQuant` option needs neural-compressor (not installed), and on sd15 the error
sat in the skip-concat convs, which keep_skip_concat fixes (one-step error 8.6% -> 2.5%) at no measurable speed
cost. Per-channel smoothing of those convs' inputs is the next step if they ever have to be int8.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # either its min/max or its two-sided `percentile`; `combine` merges the samples: "max" keeps the widest (the
    # outliers of the noisiest step decide every step's resolution), "mean" averages them (ModelOpt's per-step
    # amax averaging). On sd15 @256 px, 8 steps: min/max + max 30.9 dB, percentile 99.99 + max 33.4 dB,
    # percentile 99.99 + mean 37.6 dB image PSNR vs fp32 (before keep_skip_concat).
    calibration: str = "percentile"  # "minmax" | "percentile"
    percentile: float = 99.99
    combine: str = "mean"           # "max" | "mean"
    # What stays fp32 (found structurally in the graph, not by node names; see `excluded_nodes`):
    keep_first_last: bool = True    # conv_in (4 -> 320 ch: the latent itself) and conv_out (what the scheduler
    #                                 integrates): <1% of FLOPs, and their error goes straight into the latent.
    keep_conditioning: bool = True  # layers that never see the latent: time embedding MLP, every ResNet's
    #                                 time_emb_proj, cross-attention K/V of the text, SDXL's add_embedding. They
    #                                 run on batch (or batch x 77) rows: no speed to gain, a shift on every pixel.
    keep_skip_concat: bool = True   # convs reading a Concat: the up blocks' 1x1 conv_shortcut over [hidden; skip].
    #                                 The two halves differ in range and one per-tensor activation scale serves
    #                                 neither: on sd15 these 12 convs were 2/3 of the int8 error (one-step noise
    #                                 error 8.6% -> 2.5% kept fp32; image 37.7 -> 43.2 dB), at no measurable cost.
    keep_attention_matmuls: bool = True  # Q.K^T and P.V: activation x activation, softmax probabilities span
    #                                      1e-6..1; ORT's quantized attention (QLinearMatMul/QLinearSoftmax) was
    #                                      slower, not faster, on sd15 (1.92x vs 2.20x over fp32).
    # Op types whose output is not re-quantized. ORT fuses DQ -> MatMul/Gemm (no Q after) into
    # MatMulIntegerToFloat: float output, one Q/DQ round trip and one rounding less. Conv needs its output Q to
    # become QLinearConv in ORT; TensorRT wants Q/DQ on inputs only (ModelOpt's placement) and fuses the rest.
    float_outputs: tuple[str, ...] = ("MatMul", "Gemm")

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
    # ONNX Runtime on x86 CPUs (AVX512-VNNI / AVX-VNNI): U8S8, int32 biases (QLinearConv takes them).
    "ort-cpu": Int8Recipe("ort-cpu", activations="u8"),
    # TensorRT 10 (the TRT helper builds this graph with the INT8 flag): symmetric s8 activations, Q/DQ on the
    # inputs of convs and linear layers only, float biases. ORT runs it at fp32 speed (0.99x on sd15: without a Q
    # after a conv ORT does not fuse it into QLinearConv); OpenVINO runs it as fast as the ort-cpu graph.
    "tensorrt": Int8Recipe("tensorrt", activations="s8", float_outputs=QUANTIZED_OPS),
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
      skip concat:  a Conv whose input is a Concat (the up blocks' conv_shortcut over [hidden; skip]).
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

    producer = {o: n for n in g.node for o in n.output}
    why: dict[str, str] = {}
    for n in quantizable:
        data = n.input[0]
        if recipe.keep_conditioning and data not in on_latent:
            why[n.name] = "conditioning: never sees the latent (time embedding, text K/V); batch-sized rows"
        elif recipe.keep_attention_matmuls and n.op_type == "MatMul" and all(i not in const for i in n.input[:2]):
            why[n.name] = "attention: Q.K^T or P.V, activation x activation around the softmax"
        elif recipe.keep_skip_concat and n.op_type == "Conv" and getattr(producer.get(data), "op_type", "") == "Concat":
            why[n.name] = "skip concat: its [hidden; skip] input's halves need different activation scales"
        elif recipe.keep_first_last and data in on_latent and data not in past_op:
            why[n.name] = "first layer: reads the latent itself (conv_in)"
        elif recipe.keep_first_last and any(o in reaches_out_free for o in n.output):
            why[n.name] = "last layer: writes the noise prediction (conv_out)"
    return why
