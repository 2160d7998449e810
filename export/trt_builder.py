"""The real `Builder` for `trt_build.build_engines`: TensorRT 10's Python API (parse ONNX, build with the plan's
flags and profiles, refit). Needs TensorRT and a CUDA GPU; everything it decides is in `trt_build`'s tested plan."""

from __future__ import annotations

import time

from sdrt.export.trt_build import BuiltEngine, ComponentPlan

from sdrt.errors import SdrtError


class TensorRTBuilder:
    """The real builder: TensorRT 10's Python API. Needs TensorRT and a CUDA GPU (checked here, once)."""

    def __init__(self, verbose: bool = False):
        from sdrt.backends.tensorrt import require_tensorrt

        self.trt = trt = require_tensorrt()
        import torch

        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.trt_version = trt.__version__
        self.compute_capability = "{}.{}".format(*torch.cuda.get_device_capability())
        self.device_name = torch.cuda.get_device_name()

    def build(self, plan: ComponentPlan, timing_cache: bytes | None, log=print) -> BuiltEngine:
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
        network = builder.create_network(flags)  # explicit batch is TensorRT 10's only mode
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(plan.onnx_path)):  # resolves external data next to the .onnx
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise SdrtError(f"TensorRT could not parse {plan.onnx_path}: {errors or 'unknown error'}")
        config = builder.create_builder_config()
        config.builder_optimization_level = plan.opt_level
        if hasattr(trt.PreviewFeature, "PROFILE_SHARING_0806"):
            # The backend keeps one context per input shape (each with its CUDA graph), so several contexts use
            # one profile. TensorRT 10 allows that by default; 8.6 needed this preview feature.
            config.set_preview_feature(trt.PreviewFeature.PROFILE_SHARING_0806, True)
        for flag in plan.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        # A cache from another GPU of the same compute capability (e.g. an RTX 4090's on an L4) is refused:
        # set_timing_cache returns False, and the build then starts an empty cache instead of attaching none.
        if not config.set_timing_cache(config.create_timing_cache(timing_cache or b""), ignore_mismatch=False):
            log("the timing cache was made on another device: starting a new one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        for prof in plan.profiles:  # added in order: profile index i in the engine = plan.profiles[i]
            p = builder.create_optimization_profile()
            for name, r in prof.inputs.items():
                p.set_shape(name, r.min, r.opt, r.max)
            if config.add_optimization_profile(p) < 0:  # -1: invalid; later indices would no longer match the plan
                raise SdrtError(f"TensorRT refused {plan.name}'s optimization profile {prof.name} (see its log "
                                "above)")
        monitor = _progress_monitor(trt, log)
        if monitor is not None:
            config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise SdrtError(f"TensorRT failed to build {plan.name} (see its log above; --verbose shows more)")
        timings = config.get_timing_cache()
        return BuiltEngine(serialized, None if timings is None else bytes(memoryview(timings.serialize())))

    def refit(self, plan: ComponentPlan, engine: bytes) -> object:
        """New weights into an engine built with REFIT, straight from the ONNX file's initializers."""
        trt = self.trt
        cuda_engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine)
        if cuda_engine is None:
            raise SdrtError(f"TensorRT could not load the {plan.name} engine to refit it; rebuild with --force")
        refitter = trt.Refitter(cuda_engine, self.logger)
        parser = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser.refit_from_file(str(plan.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no parser error"
            raise SdrtError(f"TensorRT could not refit {plan.name} from {plan.onnx_path} ({errors}); rebuild with "
                            "--force")
        missing = list(refitter.get_missing_weights())
        if missing:  # the ONNX file lacks weights the engine needs: a structure change the hash missed
            raise SdrtError(f"refitting {plan.name}: {len(missing)} weights missing (e.g. {missing[0]}); "
                            "rebuild with --force")
        if not refitter.refit_cuda_engine():
            raise SdrtError(f"TensorRT refused the new {plan.name} weights; rebuild with --force")
        return cuda_engine.serialize()


def _progress_monitor(trt, log):
    """Top-level build phases as log lines (TensorRT calls back from its build thread)."""
    if not hasattr(trt, "IProgressMonitor"):  # feature, not version, detection
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"    {time.perf_counter() - self.t0:7.1f} s  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()
