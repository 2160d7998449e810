"""TensorRT backend: runs the engines `sdrt build` wrote, with the contract's verbs.

Per component one deserialized engine. Per distinct input-shape signature of a component one `_Slot`: an
execution context set to the profile that fits the shapes (`select_profile`), static torch CUDA buffers bound
with `set_tensor_address`, and a CUDA graph captured on the first call (after a warm-up run, which TensorRT
needs to finish lazy initialisation outside the capture) and replayed after. Every context runs on torch's
current stream (where that is the legacy default stream, on the backend's own stream, ordered with it both ways:
TensorRT 10 adds a cudaStreamSynchronize around each enqueue on the default stream) and shares one scratch
allocation (`activation memory`), sized once for the largest engine and profile: the components run one after
another on one stream, never at the same time. Several contexts on one
profile need TensorRT 10 (profile sharing; `sdrt build` also sets the 8.6 preview flag where it exists).

Engines are only loaded through `engine_cache.load_trusted`: same TensorRT version, same GPU compute
capability, same sha256 as engines.json, or a one-line error that says to rebuild.
"""

from __future__ import annotations

from pathlib import Path

from sdrt.errors import SdrtError

INSTALL_HINT = ("TensorRT is not installed: `pip install tensorrt` (10.x) on a machine that can reach NVIDIA's "
                "package index (pypi.nvidia.com), or run in NVIDIA's container nvcr.io/nvidia/tensorrt")


def tensorrt_available() -> tuple[bool, str]:
    """(True, "TensorRT 10.x on <GPU>") or (False, why not): the GPU suite runs TensorRT rows only when True."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, INSTALL_HINT
    except Exception as e:  # a stub wheel or a missing libnvinfer raises other errors at import
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return False, f"TensorRT is installed but does not import ({type(e).__name__}: {first}); reinstall it: " \
                      + INSTALL_HINT.split(": ", 1)[1]
    if not hasattr(trt, "Builder"):  # a bare directory named tensorrt on sys.path imports as a namespace package
        return False, INSTALL_HINT
    if str(trt.__version__).split(".")[0] != "10":  # 8.x lacks the runtime's calls; 11 drops weak typing (FP16)
        return False, f"TensorRT {trt.__version__} is installed; sdrt runs TensorRT 10.x: `pip install " \
                      "'tensorrt>=10,<11'`"
    import torch

    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but torch sees no CUDA GPU"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def require_tensorrt():
    """The tensorrt module, or SdrtError with the one line that says how to get it."""
    ok, why = tensorrt_available()
    if not ok:
        raise SdrtError(why)
    import tensorrt

    return tensorrt


def component_name(text_encoder_index: int) -> str:
    return "text_encoder" if text_encoder_index == 0 else f"text_encoder_{text_encoder_index + 1}"


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.UINT8: torch.uint8}
    return table[dtype]


def _device_memory_size(engine) -> int:
    # TensorRT 10.1 renamed the size query (v2: int64); feature detection, not version strings.
    return engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size


class _Slot:
    """One (component, input shapes): context on its profile, bound buffers, CUDA graph after the first call."""

    def __init__(self, owner: _Engine, shapes: dict[str, tuple[int, ...]], profile: int):
        import torch

        trt, engine = owner.trt, owner.engine
        self.owner, self.shapes, self.graph, self.tried_graph = owner, shapes, None, False
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        scratch = owner.scratch()
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(scratch.data_ptr(), scratch.numel())
        else:
            self.context.device_memory = scratch.data_ptr()
        stream = torch.cuda.current_stream(owner.device).cuda_stream
        # Chosen to fit, a refusal here is a mismatch between engines.json and the engine, which must not run on
        # the previous call's shapes. The profile call raises RuntimeError on refusal (its binding asserts);
        # set_input_shape returns False (TensorRT logs why).
        try:
            self.context.set_optimization_profile_async(profile, stream)  # a shared profile: TensorRT >= 8.6
        except RuntimeError as e:
            raise SdrtError(f"{owner.name}: TensorRT refused optimization profile {profile} ({e})") from None
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise SdrtError(f"{owner.name}: TensorRT refused {name} {shape} on profile {profile}")
        self.buffers = {}
        # Normal tensors even when a shape's first call runs under torch.inference_mode(): inference tensors would
        # refuse the in-place copy_ of every later call made outside it
        with torch.inference_mode(False):
            for name in owner.inputs + owner.outputs:  # output shapes resolve once every input shape is set
                shape = tuple(self.context.get_tensor_shape(name))
                if min(shape, default=0) < 0:  # -1: the input shapes do not fit together (a sample batch of 4
                    # beside a timestep batch of 2), each one inside its profile
                    raise SdrtError(f"{owner.name}: TensorRT cannot resolve {name}'s shape from the inputs {shapes}")
                self.buffers[name] = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)),
                                                 device=owner.device)
                if not self.context.set_tensor_address(name, self.buffers[name].data_ptr()):  # a name the engine
                    # lacks, or an address TensorRT cannot use: it would run on whatever was bound before
                    raise SdrtError(f"{owner.name}: TensorRT refused the address of {name}")

    def _enqueue(self) -> None:
        import torch

        current = torch.cuda.current_stream(self.owner.device)
        stream = current if current.cuda_stream != 0 else self.owner.side_stream()  # a capture's is never 0
        if stream is not current:
            stream.wait_stream(current)  # the inputs copied in on the caller's stream
        ok = self.context.execute_async_v3(stream.cuda_stream)
        if stream is not current:
            current.wait_stream(stream)  # the caller reads the outputs on its stream
        if not ok:
            raise SdrtError(f"TensorRT failed to run {self.owner.name} on {self.shapes}")

    def run(self) -> None:
        import torch

        if self.graph is not None:
            self.graph.replay()
            return
        self._enqueue()  # warm-up, and this call's result
        if self.owner.cuda_graphs and not self.tried_graph:
            self.tried_graph = True
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._enqueue()
                self.graph = graph
            except (RuntimeError, SdrtError) as e:  # some plugins can't be captured: run without a graph
                print(f"sdrt: tensorrt: no CUDA graph for {self.owner.name} {self.shapes} ({e}); running eagerly")


class _Engine:
    def __init__(self, name: str, trt, engine, entry: dict, device, scratch, cuda_graphs: bool, side_stream):
        from sdrt.export.trt_profiles import ComponentProfile

        self.name, self.trt, self.engine, self.device = name, trt, engine, device
        self.scratch, self.cuda_graphs, self.side_stream = scratch, cuda_graphs, side_stream
        self.profiles = [ComponentProfile.from_json(p) for p in entry["profiles"]]
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in io if n not in self.inputs]
        self.slots: dict[tuple, _Slot] = {}

    def __call__(self, feeds: dict) -> dict:
        import torch

        from sdrt.export.trt_profiles import select_profile

        if sorted(feeds) != sorted(self.inputs):
            raise SdrtError(f"the {self.name} engine takes {', '.join(self.inputs)}; got {', '.join(feeds)}")
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        sig = tuple(shapes.items())
        # TensorRT creates contexts and enqueues on the current CUDA device: the engine's (cuda:1 with
        # `--device cuda:1`), not whichever the caller had current
        with torch.cuda.device(self.device):
            slot = self.slots.get(sig)
            if slot is None:
                slot = self.slots[sig] = _Slot(self, shapes, select_profile(self.name, self.profiles, shapes))
            for n, t in feeds.items():
                slot.buffers[n].copy_(t)  # the graph reads these exact addresses; copy_ also casts the dtype
            slot.run()
            return {n: slot.buffers[n].clone() for n in self.outputs}  # the next call overwrites the buffers


def create(precision=None, components=None, onnx_dir=None, device=None) -> TensorRTBackend:
    """The backends' factory (sdrt/backends/__init__.py). `onnx_dir` is an `sdrt export` directory whose engines
    `sdrt build` wrote to ONNX_DIR/tensorrt (its default -o), or an engine directory itself. The engines fix the
    precision; asking for another one is an error, not a silent substitution."""
    if onnx_dir is None:
        raise SdrtError("the tensorrt backend runs engines from `sdrt build ONNX_DIR`: pass the export directory "
                        "with --onnx-dir")
    from sdrt.export.engine_cache import read_manifest

    d = Path(onnx_dir)
    engine_dir = d if (d / "engines.json").is_file() else d / "tensorrt"
    manifest = read_manifest(engine_dir)  # refusals from engines.json alone, before any engine is loaded
    have, want = manifest.get("precision", "fp16"), getattr(precision, "value", precision)
    if manifest["engines"] and want is not None and want != have:
        raise SdrtError(f"{engine_dir} holds {have} engines, not {want}: pick tensorrt:{have} or rebuild with "
                        f"`sdrt build --precision {want}`")
    source = getattr(components, "source_hash", None)
    if manifest["engines"] and source and (manifest.get("model") or {}).get("source_hash") not in (None, source):
        raise SdrtError(f"{engine_dir} was built from other weights than the model given; re-export and rebuild")
    return TensorRTBackend(engine_dir, device or "cuda")


class TensorRTBackend:
    name = "tensorrt"
    size_multiple = 8  # the VAE's factor; the UNet graph takes any latent size its profiles allow

    def __init__(self, engine_dir: str | Path, device: str = "cuda", cuda_graphs: bool = True):
        trt = require_tensorrt()
        import torch

        from sdrt.export.engine_cache import load_trusted, read_manifest

        self.engine_dir = Path(engine_dir)
        self.device = torch.device(device)
        manifest = read_manifest(self.engine_dir)
        self.model = manifest.get("model") or {}
        self.profiles = manifest.get("profiles", [])
        self.precision = manifest.get("precision", "fp16")
        self.cfg = manifest.get("cfg", True)
        # int8 engines quantize weights; activations stay fp16. Outputs keep each engine's I/O dtype.
        self.dtype = torch.float32 if self.precision == "fp32" else torch.float16
        if self.device.type != "cuda":
            raise SdrtError(f"TensorRT runs on a CUDA GPU, not {self.device}")
        with torch.cuda.device(self.device):
            cc = "{}.{}".format(*torch.cuda.get_device_capability())
            blobs = load_trusted(self.engine_dir, trt.__version__, cc)
            logger = trt.Logger(trt.Logger.WARNING)
            trt.init_libnvinfer_plugins(logger, "")
            runtime = trt.Runtime(logger)
            engines = {}
            for name, data in blobs.items():
                engines[name] = runtime.deserialize_cuda_engine(data)
                if engines[name] is None:
                    raise SdrtError(f"TensorRT could not load {self.engine_dir / manifest['engines'][name]['file']}; "
                                    "rebuild it with `sdrt build --force`")
            size = max(_device_memory_size(e) for e in engines.values())
            self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        self._runtime = runtime  # engines must not outlive their runtime
        self._stream = None  # one for all engines: they share the scratch memory, so they must not overlap
        self.engines = {n: _Engine(n, trt, e, manifest["engines"][n], self.device, lambda: self._scratch,
                                   cuda_graphs, self._side_stream) for n, e in engines.items()}

    def _side_stream(self):
        """The stream engines run on when the caller's is the legacy default stream (made on first use)."""
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _engine(self, name: str) -> _Engine:
        if name not in self.engines:
            raise SdrtError(f"{self.engine_dir} has no {name} engine; build it with `sdrt build`")
        return self.engines[name]

    def bucket(self, height: int, width: int, batch: int):
        """The resolution bucket serving a request; a clear error before any work when none does."""
        from sdrt.export.trt_profiles import bucket_for, parse_profile

        return bucket_for([parse_profile(p) for p in self.profiles], height, width, batch)

    def check_size(self, height: int, width: int, images: int, guided: bool = False) -> None:
        """The pipeline asks before any work: a request no profile serves is refused here, not at the UNet after
        the text encoders ran. (An engines.json without its profiles, from a build that did not finish, has none
        to ask: the engines themselves refuse then.) Engines built with --no-cfg take guided requests only at
        half their batch: each image's two UNet rows count as two."""
        if not self.profiles:
            return
        if guided and not self.cfg:
            try:
                self.bucket(height, width, 2 * images)
            except SdrtError:
                raise SdrtError(f"{self.engine_dir} was built with --no-cfg: {images} guided image(s) need UNet "
                                f"batch {2 * images}, outside its profiles ({', '.join(self.profiles)}); use "
                                "--guidance 1, or rebuild without --no-cfg") from None
        self.bucket(height, width, images)

    def text_encoder(self, index: int, input_ids):
        return self._engine(component_name(index))({"input_ids": input_ids.to(self.device)})

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        batch = sample.shape[0]
        timestep = timestep.to(self.device).reshape(-1)
        if timestep.numel() == 1:  # the contract is one value per sample; a scalar broadcasts
            timestep = timestep.expand(batch)
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        if text_embeds is not None:
            feeds.update(text_embeds=text_embeds, time_ids=time_ids)
        return self._engine("unet")(feeds)["noise_pred"]

    def vae_decoder(self, latent):
        return self._engine("vae_decoder")({"latent": latent})["image"]

    def vae_encoder(self, image):
        return self._engine("vae_encoder")({"image": image})["latent"]
