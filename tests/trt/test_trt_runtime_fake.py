"""The TensorRT runtime (sdrt/backends/tensorrt.py) without TensorRT or a GPU. A fake `tensorrt` has the TensorRT 10
calls the backend makes; its engines (the fake builder's, loaded through engines.json) read their inputs from and
write their outputs to the addresses bound with set_tensor_address, and refuse what TensorRT refuses: a shape outside
the context's profile, an output shape asked before every input shape is set, an enqueue with a tensor unbound or
too little activation memory. torch.cuda's devices, streams and graphs are faked over CPU memory: a captured
enqueue is recorded, not run, and replay runs it on the bindings of the capture."""

import contextlib
import ctypes
import enum
import functools
import itertools
import json
import math
import sys
import types

import pytest
import torch
from sdrt.export.trt_build import BuildOptions, build_engines
from sdrt.export.trt_profiles import parse_profiles

from sdrt.backends import make_backend
from sdrt.backends.tensorrt import TensorRTBackend, component_name, create
from sdrt.errors import SdrtError

HIDDEN = 8  # the toy text encoders' width (conftest)
OUTPUTS = {"text_encoder": ["last_hidden_state", "pooled_output"], "unet": ["noise_pred"], "vae_decoder": ["image"],
           "vae_encoder": ["latent"]}


def model(component: str, t: dict) -> dict:
    """What each fake engine computes (in float32), with the contract's output shapes."""
    f = {n: v.float() for n, v in t.items()}
    if component.startswith("text_encoder"):
        h = f["input_ids"][..., None] * 2 + 1 + torch.arange(HIDDEN)
        return {"last_hidden_state": h, "pooled_output": h.mean(1), "penultimate_hidden_state": h - 1}
    if component == "unet":  # noise_pred: the sample's shape
        cond = f["timestep"] + f["encoder_hidden_states"].mean((1, 2))
        if "text_embeds" in f:
            cond = cond + f["text_embeds"].mean(1) + f["time_ids"].mean(1)
        return {"noise_pred": f["sample"] * 0.5 + 1e-3 * cond[:, None, None, None]}
    if component == "vae_decoder":  # 3 channels at 8x the latent's size
        return {"image": (f["latent"][:, :3] * 0.1).repeat_interleave(8, 2).repeat_interleave(8, 3)}
    pooled = torch.nn.functional.avg_pool2d(f["image"], 8).mean(1, keepdim=True)  # 8 moments at 1/8
    return {"latent": (pooled * 2 + 1).expand(-1, 8, -1, -1)}


def at(ptr: int, shape, dtype) -> torch.Tensor:
    """What a kernel sees through a binding: `shape` x `dtype` at address `ptr`."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).view(tuple(shape))


class FakeStream:
    cuda = None  # the FakeCuda installed

    def __init__(self, device=None, handle=None):
        self.cuda_stream = next(self.cuda.handles) if handle is None else handle

    def wait_stream(self, other):
        self.cuda.log.append(("wait", self.cuda_stream, other.cuda_stream))


class FakeGraph(list):  # the enqueues of the capture
    def replay(self):
        for op in self:
            op()


class FakeCuda:
    """torch.cuda as the backend uses it; stream 0 is the legacy default stream."""

    def __init__(self, monkeypatch):
        self.handles, self.devices, self.log, self.capture = itertools.count(1), [], [], None
        monkeypatch.setattr(FakeStream, "cuda", self)
        self.current = FakeStream(handle=0)
        for name, value in {"is_available": lambda: True, "get_device_name": lambda d=None: "Fake GPU",
                            "get_device_capability": lambda d=None: (8, 9), "device": self.device,
                            "current_stream": lambda d=None: self.current, "Stream": FakeStream,
                            "graph": self.graph, "CUDAGraph": FakeGraph}.items():
            monkeypatch.setattr(torch.cuda, name, value)
        empty = torch.empty  # "GPU" buffers are CPU memory
        monkeypatch.setattr(torch, "empty", lambda *a, device=None, **kw: empty(
            *a, device="cpu" if device is not None and torch.device(device).type == "cuda" else device, **kw))

    @contextlib.contextmanager
    def device(self, d):
        self.devices.append(torch.device(d))
        yield
        self.devices.pop()

    @contextlib.contextmanager
    def graph(self, g):  # torch.cuda.graph: capture on a stream of its own, made current
        outer, self.current = self.current, FakeStream()
        self.capture = (self.current.cuda_stream, g)
        try:
            yield
        finally:
            self.current, self.capture = outer, None


class FakeContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy, self.device = engine, strategy, engine.trt.cuda.devices[-1]
        self.profile, self.shapes, self.addresses, self.memory = 0, {}, {}, None
        if engine.trt.v2:  # TensorRT >= 10.1; 10.0 has the device_memory attribute only
            self.set_device_memory = lambda ptr, size: setattr(self, "memory", (ptr, size))

    device_memory = property(None, lambda self, ptr: setattr(self, "memory", (ptr, None)))

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < len(self.engine.profiles):  # the binding asserts: RuntimeError, never False
            raise RuntimeError("Error in set optimization profile async.")
        self.profile, self.shapes = index, {}  # a profile change drops the input shapes
        return True

    def set_input_shape(self, name, shape):
        r = self.engine.profiles[self.profile]["inputs"][name]
        if ok := len(shape) == len(r["min"]) and all(lo <= s <= hi for s, lo, hi in zip(shape, r["min"], r["max"])):
            self.shapes[name] = tuple(shape)
        return ok

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        batches = {s[0] for s in self.shapes.values()}  # dim 0 of every input is the graph's one `batch`
        if name in self.engine.inputs or len(self.shapes) < len(self.engine.inputs) or len(batches) > 1:
            return (-1,)  # not known until every input shape is set, and consistently
        return tuple(model(self.engine.component, {n: torch.zeros(s) for n, s in self.shapes.items()})[name].shape)

    set_tensor_address = lambda self, name, ptr: self.addresses.update({name: ptr}) or True

    def execute_async_v3(self, stream):
        e, cuda = self.engine, self.engine.trt.cuda
        captured = cuda.capture is not None and cuda.capture[0] == stream
        e.trt.enqueued.append((e.component, stream, cuda.devices[-1], captured))
        size = e.memory_size if self.memory is None or self.memory[1] is None else self.memory[1]
        if (set(self.addresses) != set(e.io) or len(self.shapes) < len(e.inputs) or self.memory is None
                or size < e.memory_size or e.trt.fail == "all" or (e.trt.fail == "capture" and captured)):
            return False
        run = functools.partial(self._run, dict(self.addresses), dict(self.shapes))  # the bindings of now
        if captured:
            cuda.capture[1].append(run)
        else:
            run()
        return True

    def _run(self, addresses, shapes):
        e = self.engine
        out = model(e.component, {n: at(addresses[n], s, e.torch_dtype(n)) for n, s in shapes.items()})
        for n in e.outputs:
            at(addresses[n], out[n].shape, e.torch_dtype(n)).copy_(out[n])
        e.trt.ran.append(e.component)


class FakeEngine:
    def __init__(self, trt, blob):
        d = json.loads(blob)
        self.trt, self.component, self.profiles, self.contexts = trt, d["component"], d["profiles"], []
        base = "text_encoder" if self.component.startswith("text_encoder") else self.component
        self.inputs = list(self.profiles[0]["inputs"])
        self.outputs = OUTPUTS[base] + (["penultimate_hidden_state"] if base == "text_encoder" and trt.sdxl else [])
        floats = trt.DataType.FLOAT if d["mode"] == "fp32" else trt.DataType.HALF
        self.io = {n: (trt.TensorIOMode.OUTPUT, floats) for n in self.outputs}  # outputs first: order is free
        self.io |= {n: (trt.TensorIOMode.INPUT, trt.DataType.INT64 if n == "input_ids" else floats)
                    for n in self.inputs}
        self.num_io_tensors, self.memory_size = len(self.io), 5000 if self.component == "unet" else 1000
        setattr(self, "device_memory_size_v2" if trt.v2 else "device_memory_size", self.memory_size)

    get_tensor_name = lambda self, i: list(self.io)[i]
    get_tensor_mode = lambda self, name: self.io[name][0]
    get_tensor_dtype = lambda self, name: self.io[name][1]
    torch_dtype = lambda self, name: getattr(torch, {"FLOAT": "float32", "HALF": "float16"}.get(
        self.io[name][1].name, "int64"))

    def create_execution_context(self, strategy):
        self.contexts.append(FakeContext(self, strategy))
        return self.contexts[-1]


def fake_tensorrt(cuda, version="10.0.1", v2=True, sdxl=False, fail=None):
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.Builder, trt.cuda, trt.v2, trt.sdxl, trt.fail = version, object, cuda, v2, sdxl, fail
    trt.enqueued, trt.ran = [], []  # (component, stream, device, captured) per execute_async_v3; engine runs
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 FP8 BF16 INT64 INT4")
    trt.ExecutionContextAllocationStrategy = enum.Enum("Strategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    deserialize = lambda rt, blob: None if fail == "deserialize" else FakeEngine(trt, blob)
    trt.Runtime = type("Runtime", (), {"__init__": lambda rt, logger: None, "deserialize_cuda_engine": deserialize})
    return trt


@pytest.fixture(scope="module")
def tiny():  # loaded before torch.cuda is faked: diffusers' annotations use torch.cuda at import
    from sdrt.models import load_model

    return load_model("tiny")


@pytest.fixture
def cuda(monkeypatch):
    return FakeCuda(monkeypatch)


@pytest.fixture
def engines(tmp_path, monkeypatch, make_onnx_dir, fake_builder, cuda):
    """make(profiles, precision, family, **fake) -> (engine dir, fake tensorrt), the fake installed."""
    def make(profiles=("64x64@1-2",), precision="fp16", family="sd1", cfg=True, **fake):
        onnx = make_onnx_dir(tmp_path / "onnx", precision=precision, family=family)
        options = BuildOptions(precision=precision, profiles=parse_profiles(list(profiles), 64), cfg=cfg)
        build_engines(onnx, onnx / "tensorrt", options, fake_builder(), log=lambda s: None)
        monkeypatch.setitem(sys.modules, "tensorrt", trt := fake_tensorrt(cuda, sdxl=family == "sdxl", **fake))
        return onnx / "tensorrt", trt
    return make


def backend(engine_dir, device="cuda", cuda_graphs=True) -> TensorRTBackend:
    be = TensorRTBackend(engine_dir, device, cuda_graphs)
    be.device = torch.device("cpu")  # for the verbs' .to(device) only: the buffers are CPU memory already
    return be


def reference(component: str, feeds: dict, dtype) -> dict:  # the model on the inputs as the engine holds them
    out = model(component, {n: v.to(torch.int64 if n == "input_ids" else dtype) for n, v in feeds.items()})
    return {n: v.to(dtype) for n, v in out.items()}


def check(out: dict, component: str, feeds: dict, dtype=torch.float16):
    want = reference(component, feeds, dtype)
    for n, v in out.items():
        assert v.dtype == dtype and v.shape == want[n].shape, n
        torch.testing.assert_close(v, want[n], rtol=0, atol=0)


def unet_feeds(batch=4, hw=(8, 8), seed=0, t=500.0):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, *hw, generator=g), "timestep": torch.full((batch,), t),
            "encoder_hidden_states": torch.randn(batch, 77, HIDDEN, generator=g)}


@pytest.mark.parametrize("precision,v2", [("fp16", True), ("fp32", False)])  # v2: TensorRT >= 10.1's memory calls
def test_every_verb_computes_through_the_bound_buffers_in_one_scratch(engines, precision, v2):
    be, dt = backend(engines(precision=precision, v2=v2)[0]), {"fp16": torch.float16, "fp32": torch.float32}[precision]
    ids = torch.randint(0, 900, (2, 77), generator=torch.Generator().manual_seed(1))
    out = be.text_encoder(0, ids)
    assert sorted(out) == ["last_hidden_state", "pooled_output"]
    check(out, "text_encoder", {"input_ids": ids}, dt)
    f, g = unet_feeds(), unet_feeds(seed=1, t=20.0)
    first = be.unet(f["sample"], torch.tensor(500.0), f["encoder_hidden_states"])  # a scalar: one per sample
    check({"noise_pred": first}, "unet", f, dt)
    check({"noise_pred": be.unet(**g)}, "unet", g, dt)
    check({"noise_pred": first}, "unet", f, dt)  # a clone: the next call did not overwrite it
    latent, pixels = torch.randn(2, 4, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    assert be.vae_decoder(latent).shape == (2, 3, 64, 64)
    check({"image": be.vae_decoder(latent)}, "vae_decoder", {"latent": latent}, dt)
    check({"latent": be.vae_encoder(pixels)}, "vae_encoder", {"image": pixels}, dt)
    contexts = [c for e in be.engines.values() for c in e.engine.contexts]  # one scratch, the largest engine's
    assert len(contexts) == 4 and be._scratch.numel() == 5000
    assert {(c.strategy.name, c.memory) for c in contexts} == {("USER_MANAGED", (be._scratch.data_ptr(),
                                                                                  5000 if v2 else None))}


def test_each_shape_gets_the_profile_nearest_its_opt_and_keeps_its_slot(engines):
    be = backend(engines(profiles=("64-128x64-128@1", "96-128x96-128@1"))[0])
    dec = be.engines["vae_decoder"]
    for hw in (12, 8, 16, 12):  # 12 and 16 fit both, nearer profile 1's opt (12); 8 fits profile 0 only
        latent = torch.randn(1, 4, hw, hw)
        check({"image": be.vae_decoder(latent)}, "vae_decoder", {"latent": latent})
    assert [c.profile for c in dec.engine.contexts] == [1, 0, 1]  # the repeat reused its slot
    assert [s for ((_, s),) in dec.slots] == [(1, 4, 12, 12), (1, 4, 8, 8), (1, 4, 16, 16)]
    for bad in ["1, 4, 20, 20", "2, 4, 8, 8"]:
        with pytest.raises(SdrtError, match=rf"vae_decoder: latent \({bad}\) fits none of the engine's profiles "
                                            r"\(64-128x64-128@1, 96-128x96-128@1\); rebuild"):
            be.vae_decoder(torch.randn(*map(int, bad.split(", "))))
    assert len(dec.engine.contexts) == len(dec.slots) == 3
    assert str(be.bucket(96, 96, 1)) == "96-128x96-128@1" and str(be.bucket(64, 72, 1)) == "64-128x64-128@1"


def test_first_call_runs_then_captures_and_later_calls_replay(engines, cuda, capsys):
    engine_dir, trt = engines()
    be = backend(engine_dir, device="cuda:1")
    for seed in range(3):  # the warm-up, then two replays of the inputs copied into the captured buffers
        f = unet_feeds(seed=seed)
        check({"noise_pred": be.unet(**f)}, "unet", f)
    (_, side, dev, warm), (_, capture, _, captured) = trt.enqueued
    assert trt.ran == ["unet"] * 3 and not warm and captured and side != 0 and capture not in (0, side)
    assert cuda.log == [("wait", side, 0), ("wait", 0, side)]  # legacy default stream: a side stream, both ways
    assert dev == torch.device("cuda:1") and be.engines["unet"].engine.contexts[0].device == dev
    be.text_encoder(0, torch.zeros(1, 77, dtype=torch.int64))
    assert trt.enqueued[2][1] == side  # one side stream for every engine (they share the scratch)

    cuda.current, cuda.log, trt.enqueued = FakeStream(handle=42), [], []  # the caller's own stream: run on it
    be2 = backend(engine_dir, cuda_graphs=False)
    for _ in range(2):
        be2.unet(**unet_feeds())
    assert [(c, s, k) for c, s, _, k in trt.enqueued] == [("unet", 42, False)] * 2 and cuda.log == []

    trt.fail, trt.enqueued, be3 = "capture", [], backend(engine_dir)  # a graph that cannot be captured: eager
    for seed in range(2):
        f = unet_feeds(seed=seed)
        check({"noise_pred": be3.unet(**f)}, "unet", f)
    assert "sdrt: tensorrt: no CUDA graph for unet" in capsys.readouterr().out
    assert [k for *_, k in trt.enqueued] == [False, True, False]  # one capture tried
    trt.fail = "all"
    with pytest.raises(SdrtError, match=r"TensorRT failed to run unet on \{'sample': \(2, 4, 8, 8\), 'timestep': "):
        be3.unet(**unet_feeds(batch=2))


def test_a_slot_made_under_inference_mode_serves_calls_outside_it(engines):
    be = backend(engines()[0])
    for seed, mode in [(0, True), (1, False), (2, True)]:  # callers with their own loop often use inference_mode
        with torch.inference_mode(mode):
            f = unet_feeds(seed=seed)
            check({"noise_pred": be.unet(**f)}, "unet", f)


def test_inputs_that_do_not_fit_together_are_refused_by_name(engines):
    # Each within its profile, but a batch of 4 samples beside 2 timesteps has no output shape (-1): a clear error,
    # not a tensor of negative size.
    be, f = backend(engines()[0]), unet_feeds(batch=4)
    with pytest.raises(SdrtError, match="unet: TensorRT cannot resolve noise_pred's shape from the inputs"):
        be.unet(f["sample"], torch.full((2,), 500.0), f["encoder_hidden_states"])


def test_a_shape_the_engine_refuses_is_an_error_not_a_run(engines, monkeypatch):
    # Profiles are chosen from engines.json; an engine that disagrees (False from set_input_shape) must not run on
    # whatever shapes the context had.
    be = backend(engines()[0])
    monkeypatch.setattr(FakeContext, "set_input_shape", lambda self, name, shape: False)
    with pytest.raises(SdrtError, match=r"unet: TensorRT refused sample \(2, 4, 8, 8\) on profile 0"):
        be.unet(**unet_feeds(batch=2))


def test_a_profile_the_engine_lacks_is_an_error_not_a_run(engines, monkeypatch):
    # engines.json listing a profile the engine does not have (a hand-edited or mismatched manifest)
    be = backend(engines()[0])
    monkeypatch.setattr("sdrt.export.trt_profiles.select_profile", lambda *a: 3)
    with pytest.raises(SdrtError, match=r"unet: TensorRT refused optimization profile 3 \(Error in set"):
        be.unet(**unet_feeds(batch=2))


def test_an_address_the_engine_refuses_is_an_error_not_a_run(engines, monkeypatch):
    be = backend(engines()[0])
    monkeypatch.setattr(FakeContext, "set_tensor_address", lambda self, name, ptr: name != "noise_pred")
    with pytest.raises(SdrtError, match="unet: TensorRT refused the address of noise_pred"):
        be.unet(**unet_feeds(batch=2))


def test_sdxl_verbs_take_the_pooled_embeddings_and_time_ids(engines):
    be = backend(engines(family="sdxl")[0])
    ids = torch.randint(0, 900, (2, 77))
    for i, name in enumerate(["text_encoder", "text_encoder_2"]):
        out = be.text_encoder(i, ids)
        assert sorted(out) == ["last_hidden_state", "penultimate_hidden_state", "pooled_output"]
        check(out, name, {"input_ids": ids})
    f = unet_feeds(batch=2) | {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
    check({"noise_pred": be.unet(**f)}, "unet", f)
    with pytest.raises(SdrtError, match="takes sample, timestep, encoder_hidden_states, text_embeds, time_ids; got "
                                        "sample, timestep, encoder_hidden_states$"):
        be.unet(**unet_feeds(batch=2))


def test_a_pipeline_over_the_engines_matches_the_model_run_directly(tiny, engines):
    from dataclasses import replace

    from sdrt.pipeline import GenerationRequest, Pipeline

    class Direct:  # the same model, no TensorRT backend in between
        device, size_multiple = torch.device("cpu"), 8
        text_encoder = lambda self, i, ids: reference(component_name(i), {"input_ids": ids}, torch.float16)
        unet = lambda self, s, t, e, *_: reference("unet", {"sample": s, "timestep": t, "encoder_hidden_states": e},
                                                   torch.float16)["noise_pred"]
        vae_decoder = lambda self, latent: reference("vae_decoder", {"latent": latent}, torch.float16)["image"]

    engine_dir, trt = engines()
    r = GenerationRequest(prompt=("a cat", "a dog"), steps=3, guidance=7.5, height=64, width=64)
    got, want = (Pipeline.from_components(tiny, be).generate(r) for be in (backend(engine_dir), Direct()))
    assert torch.equal(got.latents, want.latents) and (got.pixels == want.pixels).all() and got.pixels.std() > 0
    assert [c for c, *_ in trt.enqueued] == ["text_encoder"] * 2 + ["unet"] * 2 + ["vae_decoder"] * 2
    assert trt.ran.count("unet") == 4  # PNDM's 3 steps take 4 UNet runs: one eager, three replays
    trt.ran.clear()  # 4 images where the profile serves 1-2: refused before the text encoders run
    with pytest.raises(SdrtError, match=r"64x64 at batch 4 is outside every engine profile \(64x64@1-2\)"):
        Pipeline.from_components(tiny, backend(engine_dir)).generate(replace(r, batch=2))
    assert trt.ran == []


def test_engines_built_without_cfg_refuse_guided_requests_past_half_their_batch(tiny, engines):
    from sdrt.pipeline import GenerationRequest, Pipeline

    engine_dir, trt = engines(cfg=False)
    pipe = Pipeline.from_components(tiny, backend(engine_dir))
    r = GenerationRequest(prompt=("a cat", "a dog"), steps=2, guidance=7.5, height=64, width=64)
    with pytest.raises(SdrtError, match=r"built with --no-cfg: 2 guided image\(s\) need UNet batch 4, outside its "
                                        r"profiles \(64x64@1-2\); use --guidance 1"):
        pipe.generate(r)
    assert trt.ran == []  # refused before the text encoders
    assert pipe.generate(GenerationRequest(prompt="a cat", steps=2, guidance=7.5, height=64, width=64)).pixels.shape
    assert pipe.generate(GenerationRequest(prompt=("a cat", "a dog"), steps=2, guidance=1.0, height=64,
                                           width=64)).pixels.shape[0] == 2


@pytest.mark.parametrize("version", ["8.6.1", "11.0.0"])
def test_only_tensorrt_10_is_taken(cuda, monkeypatch, version):
    from sdrt.backends.tensorrt import tensorrt_available

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(cuda, version=version))
    assert tensorrt_available() == (False, f"TensorRT {version} is installed; sdrt runs TensorRT 10.x: `pip install "
                                           "'tensorrt>=10,<11'`")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(cuda, version="10.13.2"))
    assert tensorrt_available() == (True, "TensorRT 10.13.2 on Fake GPU")


def test_loading_refuses_what_it_cannot_run(engines, monkeypatch):
    engine_dir, _ = engines(version="10.3.0")
    with pytest.raises(SdrtError, match="built with TensorRT 10.0.1, this is TensorRT 10.3.0; rebuild"):
        backend(engine_dir)
    engines(fail="deserialize")
    with pytest.raises(SdrtError, match=r"could not load .*text_encoder.plan; rebuild it with `sdrt build --force`"):
        backend(engine_dir)
    engines()
    with pytest.raises(SdrtError, match="TensorRT runs on a CUDA GPU, not cpu"):
        backend(engine_dir, device="cpu")
    with pytest.raises(SdrtError, match="holds fp16 engines, not fp32: pick tensorrt:fp16 or rebuild"):
        make_backend("tensorrt:fp32", onnx_dir=engine_dir.parent)  # the export directory: engines in tensorrt/
    with pytest.raises(SdrtError, match="was built from other weights than the model given"):
        create(None, components=types.SimpleNamespace(source_hash="other"), onnx_dir=engine_dir)
    assert create("fp16", components=types.SimpleNamespace(source_hash="h"), onnx_dir=engine_dir).precision == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    with pytest.raises(SdrtError, match="compute capability 8.9, this GPU is 9.0; rebuild it on this GPU"):
        backend(engine_dir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SdrtError, match="TensorRT 10.0.1 is installed but torch sees no CUDA GPU"):
        backend(engine_dir)
