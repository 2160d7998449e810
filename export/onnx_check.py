"""Check an exported graph against its PyTorch module on ONNX Runtime (CPU EP) at a batch and size it was not
traced with.

Error measure: max_rel = max|onnx - torch| / max|torch| per output (worst output reported). Normalising by the
output's largest magnitude, not elementwise, because elementwise relative error is unbounded where the reference
crosses zero, while this one reads as "fraction of the output's range".

Tolerances (max_rel):
- fp32 graphs: 1e-3. Reassociation and ORT's fused kernels give ~1e-6 on these models (tiny: 3e-7..3e-6; the
  issue measured 1.5e-6 on SD1.5's UNet); a wrong graph (a size baked in, a wrong branch) is off by O(1). 1e-3
  leaves three decades for deeper models while still failing any real export bug.
- fp16 graphs, against the fp32 module: 2e-2. Each fp16 rounding is 4.9e-4 relative; through a UNet's ~50 layers
  of residual adds the measured error on tiny is 0.7e-3..1.4e-3 (text encoders ~1e-3); 2e-2 is ~15x that, and
  an fp16 overflow shows up as inf/NaN, which fails separately and regardless of the tolerance.
"""

from __future__ import annotations

import numpy as np
import torch

from sdrt.errors import SdrtError

TOLERANCE = {"float32": 1e-3, "float16": 2e-2}


def session(path, threads: int = 0):
    """A CPU ONNX Runtime session (external data is found beside `path`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT warns about every fp16 node it runs through a Cast on CPU
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess, args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Feed torch tensors in input order, cast to the dtypes the graph declares (fp16 graphs take fp16 latents)."""
    dtypes = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64}
    feeds = {i.name: a.numpy().astype(dtypes[i.type]) for i, a in zip(sess.get_inputs(), args, strict=True)}
    return sess.run(None, feeds)


def compare(outs: list[np.ndarray], refs: list[torch.Tensor]) -> tuple[float, float, bool]:
    """(max_abs, max_rel, all_finite) over all outputs; max_rel as defined in the module docstring."""
    max_abs = max_rel = 0.0
    finite = True
    for o, r in zip(outs, refs, strict=True):
        o, r = o.astype(np.float32), r.float().numpy()
        finite &= bool(np.isfinite(o).all())
        err = float(np.abs(o - r).max())
        max_abs, max_rel = max(max_abs, err), max(max_rel, err / max(float(np.abs(r).max()), 1e-12))
    return max_abs, max_rel, finite


def check_graph(spec, path, batch: int, height: int, width: int, dtype: str, seed: int = 1) -> dict:
    """Run `path` and spec.module on the same inputs; the manifest's `validation` block. Raises SdrtError when the
    graph produces inf/NaN or exceeds the tolerance for its dtype."""
    args = spec.sample_inputs(batch, height, width, seed=seed)
    with torch.no_grad():
        refs = spec.module(*args)
    refs = list(refs) if isinstance(refs, tuple) else [refs]
    sess = session(path)
    outs = run_onnx(sess, args)
    del sess
    if len(outs) != len(refs):  # a graph that lost an output is not checked on the rest of them
        raise SdrtError(f"{spec.name}: the ONNX graph has {len(outs)} outputs, its module {len(refs)}")
    max_abs, max_rel, finite = compare(outs, refs)
    tol = TOLERANCE[dtype]
    where = f"batch {batch}, {height}x{width}"
    if not finite:
        raise SdrtError(f"{spec.name}: the {dtype} ONNX graph produced inf/NaN on ONNX Runtime ({where})")
    if max_rel > tol:
        raise SdrtError(f"{spec.name}: ONNX Runtime differs from PyTorch by max_rel {max_rel:.2e} > {tol:.0e} "
                        f"(max_abs {max_abs:.2e}, {where})")
    return {"batch": batch, "height": height, "width": width, "max_abs": max_abs, "max_rel": max_rel,
            "tolerance": tol}
