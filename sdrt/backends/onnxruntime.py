"""ONNX Runtime: one InferenceSession per exported graph (the ONNX contract in sdrt.export), behind the backend verbs.

CPU: torch tensors cross as numpy arrays without copies (torch.from_numpy / .numpy() share memory); sessions use
every graph optimization (ORT_ENABLE_ALL: constant folding, GELU/LayerNorm/attention fusions, NCHWc layouts) and
one intra-op thread per physical core (hyper-threads share a core's FMA units and only add contention).
CUDA (onnxruntime-gpu): IO binding hands ORT the torch tensors' device pointers, and outputs are preallocated torch
tensors, so latents never leave the GPU. The CUDA path cannot be tested on the CPU-only CI machine; the binding code
itself is shared with CPU and tested there (`io_binding=True`).

Without an ONNX directory, `create` exports the model once into a cache, `~/.cache/sdrt/onnx/<hash16>-<precision>`
(or $SDRT_CACHE/onnx/...), and reuses it while its manifest matches the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sdrt.backends import Precision, default_device
from sdrt.errors import SdrtError

NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(double)": np.float64}
TORCH_DTYPES = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64,
                np.int32: torch.int32, np.float64: torch.float64}


def create(precision: Precision | None, components=None, onnx_dir=None, device=None) -> OnnxRuntimeBackend:
    precision = precision or Precision.FP32
    if onnx_dir is None or not (Path(onnx_dir) / "manifest.json").is_file():
        if components is None:
            raise SdrtError("the onnxruntime backend needs an ONNX directory (sdrt export) or the model to export")
        onnx_dir = ensure_onnx(components, precision, onnx_dir)
    return OnnxRuntimeBackend(onnx_dir, precision, device, expect_hash=getattr(components, "source_hash", None))


def preflight(precision=None, device=None) -> None:
    """The checks that need no model (sdrt.backends.preflight): onnxruntime, and its CUDA provider on a GPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SdrtError("the onnxruntime backend needs onnxruntime: pip install onnxruntime") from None
    if default_device(device).type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SdrtError("onnxruntime has no CUDA provider here: install onnxruntime-gpu, or use --device cpu")


def size_bounds(onnx_dir: Path, manifest: dict) -> tuple[int, int]:
    """(size_multiple, min_size) in pixels that the export's graphs serve, from its manifest."""
    bounds = {**manifest.get("model", {}), **manifest}  # wherever the exporter put them
    multiple, min_size = bounds.get("size_multiple", 8), bounds.get("min_size", 64)
    for key, v in (("size_multiple", multiple), ("min_size", min_size)):
        if type(v) is not int or v < 8 or v % 8:  # a hand-edited manifest: "abc", 0, 12
            raise SdrtError(f"{onnx_dir}: the manifest's {key} is {v!r}, not a multiple of 8; re-export")
    return multiple, min_size


def cache_root() -> Path:
    return Path(os.environ.get("SDRT_CACHE") or Path.home() / ".cache" / "sdrt").expanduser()


def cache_dir(source_hash: str, precision: str) -> Path:
    """The shared export cache's directory for one set of weights (their hash) at one precision."""
    return cache_root() / "onnx" / f"{source_hash[:16]}-{precision}"


def ensure_onnx(components, precision: Precision, onnx_dir=None, log=None) -> Path:
    """An export of `components` at `precision` in onnx_dir (default: the cache), exported only if missing or stale.
    log: a callable for the exporter's progress lines (None: quiet)."""
    from sdrt.export.onnx_export import export_model

    if onnx_dir is not None:
        if Path(onnx_dir).exists() and not Path(onnx_dir).is_dir():
            raise SdrtError(f"--onnx-dir {onnx_dir} is a file, not a directory")
        refuse_foreign_export(Path(onnx_dir), components, precision)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else cache_dir(components.source_hash, precision.value)
    if not manifest_matches(onnx_dir, components, precision):
        if log is not None:
            log(f"exporting {components.name} to ONNX ({precision.value}) in {onnx_dir}: once, reused after")
        if precision is Precision.INT8:  # calibrated on the model's own denoising steps, over the fp32 export
            from sdrt.export.int8 import export_int8

            export_int8(components, None, onnx_dir, progress=log is not None)
        else:
            export_model(components, onnx_dir, precision=precision.value, progress=log is not None)
    return onnx_dir


def refuse_foreign_export(onnx_dir: Path, components, precision: Precision) -> None:
    """A directory the user named that holds another model's or another precision's export is never overwritten."""
    from sdrt.export.onnx_manifest import read_manifest as read_raw

    m = read_raw(onnx_dir) if onnx_dir.is_dir() else None
    if m is None:
        return
    if m.get("precision") != precision.value:
        raise SdrtError(f"{onnx_dir} holds a {m.get('precision')} export, not {precision.value}: pass another "
                        "--onnx-dir (or none, to use the cache)")
    if m.get("model", {}).get("source_hash") != components.source_hash:
        raise SdrtError(f"{onnx_dir} holds an export of other weights ({m.get('model', {}).get('name')}; or of "
                        "these before their weights or configs changed): pass another --onnx-dir (or none, to use "
                        "the cache), or delete it to export again")


def manifest_matches(onnx_dir: Path, components, precision: Precision) -> bool:
    """The quick check on every start: same weights, precision and sdrt version, every graph present with its
    recorded size (the exporter itself re-hashes the files before it skips anything)."""
    from sdrt import __version__
    from sdrt.export.onnx_manifest import entry_problem
    from sdrt.export.onnx_manifest import read_manifest as read_raw

    m = read_raw(onnx_dir)
    if m is None:
        return False
    comps = m["components"]
    encoders = ["text_encoder", "text_encoder_2"][: len(components.text_encoders)]
    needed = [*encoders, "unet", "vae_decoder", "vae_encoder"]
    return (m.get("precision") == precision.value and m.get("sdrt_version") == __version__
            and m.get("model", {}).get("source_hash") == components.source_hash
            and all(n in comps and entry_problem(onnx_dir, comps[n], verify_hashes=False) is None for n in needed))


def read_manifest(onnx_dir: Path) -> dict:
    """The export's validated manifest (file sizes checked; hashing a 3.4 GB UNet on every start is too slow).
    The VAE encoder is optional: txt2img runs without it."""
    from sdrt.export.onnx_manifest import load_manifest

    m = load_manifest(onnx_dir, require=["unet", "vae_decoder"], verify_hashes=False)
    n_text = 2 if m.get("model", {}).get("family") == "sdxl" else 1
    missing = [c for c in ["text_encoder", "text_encoder_2"][:n_text] if c not in m["components"]]
    if missing:
        raise SdrtError(f"{onnx_dir}: partial export, missing {', '.join(missing)} (re-run `sdrt export`)")
    return m


def physical_cores() -> int:
    """Physical cores this process may run on (ORT's default counts hyper-threads)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        cores, core = set(), [None, None]
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                core[0] = value.strip()
            elif key.strip() == "core id":
                core[1] = value.strip()
                cores.add(tuple(core))
        physical = len(cores) or usable
    except OSError:
        physical = usable
    return max(1, min(physical, usable))


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, onnx_dir, precision: Precision = Precision.FP32, device=None, io_binding: bool | None = None,
                 expect_hash: str | None = None):
        import onnxruntime as ort

        self.onnx_dir = Path(onnx_dir)
        self.manifest = read_manifest(self.onnx_dir)
        got = self.manifest.get("precision", "fp32")
        if got != precision.value:
            raise SdrtError(f"{onnx_dir} holds a {got} export, not {precision.value}: re-export or pick {got}")
        if expect_hash and self.manifest.get("model", {}).get("source_hash") not in (None, expect_hash):
            raise SdrtError(f"{onnx_dir} was exported from other weights than the model given; re-export it")
        self.precision = precision
        self.device = default_device(device)
        self.dtype = precision.torch_dtype
        self.size_multiple, self.min_size = size_bounds(self.onnx_dir, self.manifest)
        preflight(precision, self.device)
        if self.device.type == "cuda":
            self.providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        self.io_binding = self.device.type == "cuda" if io_binding is None else io_binding
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.intra_op_num_threads = physical_cores()
        if self.device.type == "cpu":
            # ORT's pool spins after each run by default; here it has every physical core, the same cores torch's
            # own threads use between UNet calls (scheduler step, guidance), so spinning slows those, and, in
            # `sdrt bench`, whatever row is timed next (eager's UNet: 5.8 -> 14 ms on the tiny model, 2 cores).
            self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.options.log_severity_level = 3  # errors only: ORT warns about every node it leaves on the CPU
        self.sessions = {}
        # txt2img never runs the VAE encoder: its session is opened on first use.
        for name in self.manifest["components"]:
            if name != "vae_encoder":
                self.session(name)

    def session(self, name: str):
        import onnxruntime as ort

        if name not in self.sessions:
            comp = self.manifest["components"].get(name)
            if comp is None:
                raise SdrtError(f"{self.onnx_dir}: the export has no {name} graph; re-export the model")
            path = self.onnx_dir / comp["file"]
            try:
                self.sessions[name] = ort.InferenceSession(str(path), self.options, providers=self.providers)
            except Exception as e:  # noqa: BLE001  ORT's pybind exception types (Fail, InvalidProtobuf, ...)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SdrtError(f"{path}: onnxruntime cannot load it: {first}") from None
        return self.sessions[name]

    def run(self, name: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sess = self.session(name)
        if any(i.name not in feeds for i in sess.get_inputs()):  # a manifest that names another graph for it
            raise SdrtError(f"{self.onnx_dir / self.manifest['components'][name]['file']}: takes "
                            f"{', '.join(i.name for i in sess.get_inputs())}, not the {name}'s inputs "
                            f"({', '.join(feeds)}); re-export")
        if self.io_binding:
            return self._run_bound(sess, feeds)
        args = {i.name: _to_numpy(feeds[i.name], NP_DTYPES[i.type]) for i in sess.get_inputs()}
        outs = sess.run(None, args)
        return {o.name: torch.from_numpy(v).to(self.device) for o, v in zip(sess.get_outputs(), outs)}

    def _run_bound(self, sess, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IO binding: ORT reads the inputs' and writes the outputs' memory in place (device pointers on CUDA)."""
        kind, index = self.device.type, self.device.index or 0
        binding = sess.io_binding()
        dims, keep = {}, []
        for i in sess.get_inputs():
            np_dtype = NP_DTYPES[i.type]
            t = feeds[i.name].to(self.device, TORCH_DTYPES[np_dtype]).contiguous()
            keep.append(t)  # alive until the run is over
            dims.update({d: n for d, n in zip(i.shape, t.shape) if isinstance(d, str)})
            binding.bind_input(i.name, kind, index, np_dtype, list(t.shape), t.data_ptr())
        outs = {}
        for o in sess.get_outputs():
            shape = [dims.get(d) if isinstance(d, str) else d for d in o.shape]
            if any(d is None for d in shape):  # a size ORT computes (e.g. the decoder's 8x): let it allocate
                binding.bind_output(o.name, kind, index)
                continue
            outs[o.name] = torch.empty(shape, dtype=TORCH_DTYPES[NP_DTYPES[o.type]], device=self.device)
            binding.bind_output(o.name, kind, index, NP_DTYPES[o.type], shape, outs[o.name].data_ptr())
        binding.synchronize_inputs()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        for o, value in zip(sess.get_outputs(), binding.get_outputs()):
            if o.name not in outs:
                outs[o.name] = torch.from_numpy(value.numpy()).to(self.device)
        return outs

    # --- the four verbs (shapes in sdrt.backends) ---
    def text_encoder(self, index: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run("text_encoder_2" if index else "text_encoder", {"input_ids": input_ids})

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) -> torch.Tensor:
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
        if text_embeds is not None:
            feeds.update(text_embeds=text_embeds, time_ids=time_ids)
        return self.run("unet", feeds)["noise_pred"]

    def vae_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        return self.run("vae_decoder", {"latent": latent})["image"]

    def vae_encoder(self, image: torch.Tensor) -> torch.Tensor:
        return self.run("vae_encoder", {"image": image})["latent"]


def _to_numpy(t: torch.Tensor, dtype) -> np.ndarray:
    # CPU, contiguous and already the right dtype: .numpy() shares memory (no copy).
    return t.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous().numpy()
