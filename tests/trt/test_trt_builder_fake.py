"""TensorRTBuilder (export/trt_builder.py) against a fake `tensorrt` that records the TensorRT 10 calls it gets:
network flags, builder flags, profiles in order, timing cache, and the refusals TensorRT reports (parser errors, an
invalid profile, a failed build, a failed refit). No TensorRT, no GPU."""

import enum
import types

import pytest
import torch
from sdrt.export.trt_build import ComponentPlan, Mode
from sdrt.export.trt_builder import TensorRTBuilder
from sdrt.export.trt_profiles import component_profiles, parse_profiles

from sdrt.errors import SdrtError

UNET_INPUTS = [{"name": "sample", "shape": ["batch", 4, "latent_height", "latent_width"]},
               {"name": "timestep", "shape": ["batch"]}, {"name": "encoder_hidden_states", "shape": ["batch", 77, 8]}]


def fake_tensorrt(parse_errors=(), refuse_profile=None, build_fails=False, refit_errors=None, cache_mismatch=False):
    trt, log = types.ModuleType("tensorrt"), []
    trt.__version__, trt.log = "10.3.0", log
    trt.Logger = type("Logger", (), {"VERBOSE": 0, "WARNING": 2, "__init__": lambda self, severity: None})
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("Flag", {"STRONGLY_TYPED": 5})
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 INT8 REFIT")
    trt.PreviewFeature = enum.Enum("PreviewFeature", "PROFILE_SHARING_0806")

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = len(parse_errors)

        parse_from_file = lambda self, path: log.append(("parse", path)) or not parse_errors
        get_error = lambda self, i: parse_errors[i]

    class Profile(dict):
        set_shape = lambda self, name, lo, opt, hi: self.update({name: (tuple(lo), tuple(opt), tuple(hi))})

    class Config:
        profiles = []

        def set_flag(self, flag):
            log.append(("flag", flag.name))

        set_preview_feature = lambda self, feature, on: log.append(("preview", feature.name, on))
        create_timing_cache = lambda self, data: bytes(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            log.append(("timing cache", cache))
            return not (cache_mismatch and cache)  # a cache from another device is refused

        def add_optimization_profile(self, p):
            if len(self.profiles) == refuse_profile:
                return -1
            self.profiles = self.profiles + [p]
            return len(self.profiles) - 1

        get_timing_cache = lambda self: types.SimpleNamespace(serialize=lambda: b"timings")

    class Builder:
        def __init__(self, logger):
            pass

        create_network = lambda self, flags: log.append(("network", flags)) or object()
        create_builder_config = lambda self: Config()
        create_optimization_profile = lambda self: Profile()

        def build_serialized_network(self, network, config):
            log.append(("profiles", config.profiles, config.builder_optimization_level))
            return None if build_fails else b"engine"

    class Refitter:
        def __init__(self, engine, logger):
            pass

        get_missing_weights = lambda self: ["conv.weight"] if refit_errors == "missing" else []
        refit_cuda_engine = lambda self: True

    class ParserRefitter:
        def __init__(self, refitter, logger):
            self.num_errors = len(refit_errors) if isinstance(refit_errors, list) else 0

        refit_from_file = lambda self, path: not isinstance(refit_errors, list)
        get_error = lambda self, i: refit_errors[i]

    engine = types.SimpleNamespace(serialize=lambda: b"refitted")
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, blob: engine})
    trt.Builder, trt.OnnxParser, trt.Refitter, trt.OnnxParserRefitter = Builder, Parser, Refitter, ParserRefitter
    return trt


@pytest.fixture
def builder(monkeypatch):
    def make(**fake):
        monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt := fake_tensorrt(**fake))
        for name, value in {"is_available": lambda: True, "get_device_name": lambda d=None: "Fake GPU",
                            "get_device_capability": lambda d=None: (8, 9)}.items():
            monkeypatch.setattr(torch.cuda, name, value)
        return TensorRTBuilder(), trt
    return make


def plan(mode=Mode.FP16, buckets=("64x64@1-2", "128x128@1"), refittable=False):
    return ComponentPlan("unet", "/x/unet.onnx", mode, component_profiles("unet", UNET_INPUTS, parse_profiles(
        list(buckets), 64), cfg=True), opt_level=4, refittable=refittable)


@pytest.mark.parametrize("mode,refittable,network,flags", [
    (Mode.FP16, False, 0, ["FP16"]), (Mode.FP32, True, 0, ["REFIT"]), (Mode.INT8, False, 0, ["INT8", "FP16"]),
    (Mode.INT8_STRONG, False, 1 << 5, [])])  # strongly typed: the network's types are the precision, no flags
def test_a_build_asks_tensorrt_for_the_plan(builder, mode, refittable, network, flags):
    b, trt = builder()
    assert b.compute_capability == "8.9" and b.device_name == "Fake GPU"
    built = b.build(plan(mode, refittable=refittable), b"old timings", log=lambda s: None)
    assert (built.plan, built.timing_cache) == (b"engine", b"timings")
    assert ("network", network) in trt.log and [e[1] for e in trt.log if e[0] == "flag"] == flags
    assert ("timing cache", b"old timings") in trt.log and ("parse", "/x/unet.onnx") in trt.log
    (_, profiles, level), = [e for e in trt.log if e[0] == "profiles"]
    assert level == 4 and len(profiles) == 2  # in plan order: profile i of the engine is plan.profiles[i]
    assert profiles[0]["sample"] == ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8))
    assert profiles[1]["sample"] == ((1, 4, 16, 16), (2, 4, 16, 16), (2, 4, 16, 16))


def test_a_timing_cache_from_another_device_starts_a_new_one(builder):
    b, trt = builder(cache_mismatch=True)
    lines = []
    b.build(plan(), b"their timings", log=lines.append)
    assert [e for e in trt.log if e[0] == "timing cache"] == [("timing cache", b"their timings"), ("timing cache", b"")]
    assert "the timing cache was made on another device: starting a new one" in lines


@pytest.mark.parametrize("fake,message", [
    ({"parse_errors": ["node 3: Unsupported op", "node 9: bad type"]},
     "TensorRT could not parse /x/unet.onnx: node 3: Unsupported op; node 9: bad type$"),
    ({"refuse_profile": 1}, r"TensorRT refused unet's optimization profile 128x128@1 \(see its log above\)"),
    ({"build_fails": True}, r"TensorRT failed to build unet \(see its log above"),
])
def test_what_tensorrt_refuses_is_one_line(builder, fake, message):
    b, _ = builder(**fake)
    with pytest.raises(SdrtError, match=message):
        b.build(plan(), None, log=lambda s: None)


def test_a_refit_says_why_it_failed(builder):
    assert builder()[0].refit(plan(refittable=True), b"engine") == b"refitted"
    b, _ = builder(refit_errors=["weight conv.weight: shape (4, 4) != (8, 4)"])
    with pytest.raises(SdrtError, match=r"could not refit unet from /x/unet.onnx \(weight conv.weight: shape "):
        b.refit(plan(refittable=True), b"engine")
    b, _ = builder(refit_errors="missing")
    with pytest.raises(SdrtError, match=r"refitting unet: 1 weights missing \(e.g. conv.weight\); rebuild"):
        b.refit(plan(refittable=True), b"engine")
