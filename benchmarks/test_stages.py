"""pytest-benchmark: each pipeline stage per backend, on the inputs `sdrt bench` uses (`make bench`).

    text encoder     (2, 77) token ids: [negative; prompt]
    UNet step        the CFG batch (2, 4, h/8, w/8), 77 text tokens
    VAE decode       (1, 4, h/8, w/8) -> (1, 3, h, w)
Grouped by stage, so each table compares the backends (eager first: the baseline). SDRT_BENCH_MODEL (default tiny),
SDRT_BENCH_BACKENDS (default eager,onnxruntime,openvino) and SDRT_BENCH_SIZE (default: the model's) pick the rows;
e.g. SDRT_BENCH_MODEL=sd15 SDRT_BENCH_SIZE=256 for the real model. Not part of `make test` (tests/ is the testpath).
"""

import os

import pytest

MODEL = os.environ.get("SDRT_BENCH_MODEL", "tiny")
BACKENDS = [b for b in os.environ.get("SDRT_BENCH_BACKENDS", "eager,onnxruntime,openvino").split(",") if b]
SIZE = int(os.environ["SDRT_BENCH_SIZE"]) if os.environ.get("SDRT_BENCH_SIZE") else None
STAGES = ("text_encoder", "unet_step", "vae_decode")


@pytest.fixture(scope="module")
def context():
    from sdrt.backends import default_device
    from sdrt.bench import DEFAULT_PROMPT
    from sdrt.bench_rows import Context, stage_inputs
    from sdrt.models import load_model
    from sdrt.pipeline import GenerationRequest, ModelInfo, Pipeline

    c = load_model(MODEL)
    info = ModelInfo.from_components(c)
    request = Pipeline(info, c.tokenizers, None).resolve(GenerationRequest(DEFAULT_PROMPT, height=SIZE, width=SIZE))
    inputs = stage_inputs(c, request.batch, request.height, request.width, DEFAULT_PROMPT)
    return Context(MODEL, default_device(), info, list(c.tokenizers), request), inputs


@pytest.fixture(scope="module", params=BACKENDS)
def row(request, context):
    from sdrt.bench_rows import parse_row, setup_row

    ctx, inputs = context
    try:
        live = setup_row(parse_row(request.param), ctx)
    except Exception as e:  # noqa: BLE001  (a backend that cannot run here is a skip with its reason)
        pytest.skip(f"{request.param}: {e}")
    live.inputs = inputs.to(live.device)
    yield live


def call(row, stage: str):
    from sdrt.bench_rows import sync

    x, b = row.inputs, row.backend
    fn = {"text_encoder": lambda: [b.text_encoder(i, ids) for i, ids in enumerate(x.input_ids)],
          "unet_step": lambda: b.unet(x.sample, x.timestep, x.encoder_hidden_states, x.text_embeds, x.time_ids),
          "vae_decode": lambda: b.vae_decoder(x.latent)}[stage]
    return lambda: (fn(), sync(row.device))


@pytest.mark.parametrize("stage", STAGES)
def test_stage(benchmark, row, stage):
    benchmark.group = f"{MODEL} {stage}"
    benchmark.extra_info.update(backend=row.spec.name, precision=row.precision, device=str(row.device))
    fn = call(row, stage)
    fn()  # warm-up: lazy session/kernel initialisation is a cold-start cost, not a stage time
    benchmark.pedantic(fn, rounds=5 if MODEL.startswith("tiny") else 3, iterations=1)
