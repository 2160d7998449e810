"""Fixtures for the TensorRT build/cache/backend tests: a small ONNX directory in the exporter's format (real,
runnable graphs with the contract's I/O names) and a fake builder that makes "engines" out of bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sdrt.export.trt_build import BuiltEngine

HIDDEN = 8  # text encoder width of the toy graphs


def _graph(name: str, seed: int, dtype: str, qdq: bool | str, extra_node: bool, sdxl: bool):
    """One toy component: every input is used (TensorRT rejects dead inputs), every output is computed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    ft = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    npt = np.float16 if dtype == "float16" else np.float32
    nodes, inits = [], []

    def const(n, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def vi(n, t, shape):
        return helper.make_tensor_value_info(n, t, shape)

    if name.startswith("text_encoder"):
        inputs = [vi("input_ids", TensorProto.INT64, ["batch", 77])]
        outputs = [vi("last_hidden_state", ft, ["batch", 77, HIDDEN]), vi("pooled_output", ft, ["batch", HIDDEN])]
        const("embedding", rng.standard_normal((1000, HIDDEN)).astype(npt))
        const("axes1", np.array([1], np.int64))
        nodes += [helper.make_node("Gather", ["embedding", "input_ids"], ["last_hidden_state"]),
                  helper.make_node("ReduceMean", ["last_hidden_state", "axes1"], ["pooled_output"], keepdims=0)]
        if sdxl:
            outputs.append(vi("penultimate_hidden_state", ft, ["batch", 77, HIDDEN]))
            nodes.append(helper.make_node("Identity", ["last_hidden_state"], ["penultimate_hidden_state"]))
    elif name == "unet":
        inputs = [vi("sample", ft, ["batch", 4, "latent_height", "latent_width"]), vi("timestep", ft, ["batch"]),
                  vi("encoder_hidden_states", ft, ["batch", 77, HIDDEN])]
        outputs = [vi("noise_pred", ft, ["batch", 4, "latent_height", "latent_width"])]
        const("weight", rng.standard_normal((1, 4, 1, 1)).astype(np.float32 if qdq else npt))
        const("shape4", np.array([-1, 1, 1, 1], np.int64))
        const("axes12", np.array([1, 2], np.int64))
        w = "weight"
        if qdq:  # what an explicitly quantized export looks like: Q/DQ (fp32 scale, opset 18) around a weight
            const("scale", np.array(0.02, np.float32))
            const("zero", np.array(0, np.uint8 if qdq == "u8" else np.int8))
            nodes += [helper.make_node("QuantizeLinear", ["weight", "scale", "zero"], ["weight_q"]),
                      helper.make_node("DequantizeLinear", ["weight_q", "scale", "zero"], ["weight_dq"]),
                      helper.make_node("Cast", ["weight_dq"], ["weight_c"], to=ft)]
            w = "weight_c"
        nodes += [helper.make_node("Mul", ["sample", w], ["scaled"]),
                  helper.make_node("Reshape", ["timestep", "shape4"], ["t4"]),
                  helper.make_node("ReduceMean", ["encoder_hidden_states", "axes12"], ["e1"], keepdims=0),
                  helper.make_node("Reshape", ["e1", "shape4"], ["e4"]),
                  helper.make_node("Add", ["t4", "e4"], ["te"])]
        last = "te"
        if sdxl:
            inputs += [vi("text_embeds", ft, ["batch", 16]), vi("time_ids", ft, ["batch", 6])]
            const("axes1", np.array([1], np.int64))
            nodes += [helper.make_node("ReduceMean", ["text_embeds", "axes1"], ["a1"], keepdims=0),
                      helper.make_node("ReduceMean", ["time_ids", "axes1"], ["b1"], keepdims=0),
                      helper.make_node("Add", ["a1", "b1"], ["ab"]),
                      helper.make_node("Reshape", ["ab", "shape4"], ["ab4"]),
                      helper.make_node("Add", ["te", "ab4"], ["te2"])]
            last = "te2"
        nodes.append(helper.make_node("Add", ["scaled", last], ["noise_pred"]))
    elif name == "vae_decoder":
        inputs = [vi("latent", ft, ["batch", 4, "latent_height", "latent_width"])]
        outputs = [vi("image", ft, ["batch", 3, "height", "width"])]
        const("proj", rng.standard_normal((3, 4, 1, 1)).astype(npt))
        const("scales", np.array([1, 1, 8, 8], np.float32))
        nodes += [helper.make_node("Conv", ["latent", "proj"], ["small"]),
                  helper.make_node("Resize", ["small", "", "scales"], ["image"], mode="nearest")]
    else:  # vae_encoder: pixels -> moments (8 channels) at /8
        inputs = [vi("image", ft, ["batch", 3, "height", "width"])]
        outputs = [vi("latent", ft, ["batch", 8, "latent_height", "latent_width"])]
        const("proj", rng.standard_normal((8, 3, 8, 8)).astype(npt))
        nodes.append(helper.make_node("Conv", ["image", "proj"], ["latent"], strides=[8, 8]))
    if extra_node:  # a structural change: one more node on the first output
        first = outputs[0].name
        for n in nodes:
            n.output[:] = [o + "_pre" if o == first else o for o in n.output]
            n.input[:] = [i + "_pre" if i == first else i for i in n.input]
        nodes.append(helper.make_node("Identity", [first + "_pre"], [first]))
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _io(value_infos) -> list[dict]:
    from onnx import helper

    return [{"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in value_infos]


def write_onnx_dir(path: Path, *, seed: int = 0, seeds: dict | None = None, extra_node: tuple = (),
                   external: tuple = (), precision: str = "fp32", qdq: bool | str = False, family: str = "sd1",
                   dtypes: dict | None = None, quantization: dict | None = None) -> Path:
    """An `sdrt export`-style directory: <component>.onnx + manifest.json (written last)."""
    import onnx

    path.mkdir(parents=True, exist_ok=True)
    names = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else []) + ["unet", "vae_decoder",
                                                                                   "vae_encoder"]
    default_dtype = "float16" if precision in ("fp16", "int8") else "float32"
    components = {}
    for name in names:
        dtype = (dtypes or {}).get(name, default_dtype)
        model = _graph(name, (seeds or {}).get(name, seed), dtype, qdq if name == "unet" else False, name in extra_node,
                       family == "sdxl")
        file = f"{name}.onnx"
        data = f"{file}.data" if name in external else None
        if data:  # float weights to the side file, as exporters do; shape constants stay inline (shape inference)
            from onnx.external_data_helper import convert_model_to_external_data

            convert_model_to_external_data(model, location=data, size_threshold=0)
            for init in model.graph.initializer:
                if init.data_type == onnx.TensorProto.INT64:
                    init.data_location = onnx.TensorProto.DEFAULT
                    del init.external_data[:]
        onnx.save_model(model, path / file)
        components[name] = {"file": file, "external_data": data, "opset": 18, "dtype": dtype,
                            "graph_sha256": "x", "weights_sha256": "y",
                            "inputs": _io(model.graph.input), "outputs": _io(model.graph.output),
                            "dynamic_axes": {}}
    manifest = {"format": 1, "sdrt_version": "0.1.0", "precision": precision,
                "model": {"name": "toy", "family": family, "source": "test", "source_hash": "h",
                          "prediction_type": "epsilon", "vae_scale": 0.18215, "default_size": 64,
                          "scheduler_config": {}, "tokenizers": "builtin"},
                "components": components}
    if quantization:  # as `sdrt export --precision int8` records its recipe
        manifest["int8"] = {"settings": {"recipe": quantization}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


class FakeBuilder:
    """Builds "engines" that are JSON bytes describing what a real build would have been asked for."""

    def __init__(self, trt_version="10.0.1", compute_capability="8.9", device_name="Fake GPU", fail_on=None):
        self.trt_version, self.compute_capability, self.device_name = trt_version, compute_capability, device_name
        self.fail_on = fail_on
        self.calls: list[tuple] = []          # (action, component, mode, flags, timing cache given)

    def build(self, plan, timing_cache, log):
        self.calls.append(("build", plan.name, plan.mode.value, plan.builder_flags, timing_cache))
        log(f"    fake build of {plan.name}")
        if plan.name == self.fail_on:
            raise RuntimeError(f"simulated TensorRT failure in {plan.name}")
        engine = json.dumps({"component": plan.name, "mode": plan.mode.value, "flags": plan.builder_flags,
                             "profiles": [p.to_json() for p in plan.profiles],
                             "onnx": Path(plan.onnx_path).read_bytes().hex()[:64]}).encode()
        return BuiltEngine(engine, (timing_cache or b"") + f"{plan.name};".encode())

    def refit(self, plan, engine):
        self.calls.append(("refit", plan.name, plan.mode.value, plan.builder_flags, None))
        return engine + b"+refit"

    def actions(self) -> list[tuple[str, str]]:
        return [(c[0], c[1]) for c in self.calls]


@pytest.fixture
def onnx_dir(tmp_path):
    return write_onnx_dir(tmp_path / "onnx")


@pytest.fixture
def fake_builder():
    return FakeBuilder


@pytest.fixture
def make_onnx_dir():
    return write_onnx_dir
