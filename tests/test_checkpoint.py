"""Single-file (original LDM layout) checkpoints: round trip through tests/ldm_layout.py, and bad files."""

from __future__ import annotations

import hashlib

import pytest
import torch
from ldm_layout import to_ldm_state_dict  # tests/ is on sys.path (pytest's rootdir-relative import)
from safetensors.torch import save_file

from sdrt.checkpoint import checkpoint_files, detect_preset, load_single_file, load_tokenizers
from sdrt.errors import SdrtError
from sdrt.models import build_preset, hash_files, load_model
from sdrt.specs import PRESETS
from sdrt.tokenizer import CLIP_BPE, builtin_tokenizer

EXPECTED = {"tiny": ("sd1", "epsilon", 1), "tiny-sd2": ("sd2", "v_prediction", 1), "tiny-sdxl": ("sdxl", "epsilon", 2)}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """preset name -> (original components, path of its LDM-layout .safetensors)."""
    out = {}
    for name in EXPECTED:
        c = build_preset(PRESETS[name], seed=3)
        path = tmp_path_factory.mktemp(name) / f"{name}-finetune.safetensors"
        save_file(to_ldm_state_dict(c), path)
        out[name] = (c, path)
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_round_trip_is_exact(files, name):
    orig, path = files[name]
    c = load_model(str(path))
    family, prediction, n_text = EXPECTED[name]
    assert (c.family.value, c.prediction_type, len(c.text_encoders), len(c.tokenizers)) == (family, prediction,
                                                                                            n_text, n_text)
    assert c.name == f"{name}-finetune" and c.source == str(path)
    assert c.source_hash == hash_files(checkpoint_files(path)) and checkpoint_files(path) == [path, CLIP_BPE]
    assert c.default_size == PRESETS[name].default_size and c.vae_scale == PRESETS[name].vae_scale
    assert list(c.modules) == list(orig.modules)
    for mod_name, m in c.modules.items():
        want, got = orig.modules[mod_name].state_dict(), m.state_dict()
        assert list(got) == list(want), mod_name
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, f"{mod_name}: {bad[:3]}"
        assert not m.training


@pytest.mark.parametrize("name, want", [("sd15", "sd15"), ("sd21", "sd21"), ("sdxl", "sdxl"),
                                        ("sd-turbo", "sd21")])  # turbo has sd21's shapes: needs arch="sd-turbo"
def test_detects_full_size_presets(name, want):
    with torch.device("meta"):  # the layout and shapes of the real models, without their memory
        sd = to_ldm_state_dict(build_preset(PRESETS[name]))
    assert detect_preset("x.safetensors", sd) == want


def test_arch_override_and_mismatch(files):
    _, path = files["tiny-sd2"]
    c = load_single_file(path, arch="tiny-sd2")
    assert c.name == "tiny-sd2-finetune"
    with pytest.raises(SdrtError, match="does not match preset 'tiny'"):
        load_single_file(path, arch="tiny")
    with pytest.raises(SdrtError, match="unknown arch 'nope'"):
        load_single_file(path, arch="nope")


def test_tokenizer_folder_beside_file_is_used(files, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(files["tiny"][1].read_bytes())
    tok = builtin_tokenizer()
    tok.add_tokens(["<sdrt-test-token>"])  # a marker the builtin tokenizer doesn't have
    tok.save_pretrained(tmp_path / "tokenizer")
    c = load_single_file(path)
    assert "<sdrt-test-token>" in c.tokenizers[0].get_vocab()


@pytest.mark.parametrize("name, pads", [("sd15", ["<|endoftext|>"]), ("sd21", ["!"]),
                                        ("sdxl", ["<|endoftext|>", "!"])])
def test_a_real_checkpoint_alone_gets_clips_own_tokenizer(tmp_path, name, pads):
    # A file downloaded alone used to get the builtin 914-token vocabulary, whose ids are not CLIP's: every prompt
    # came out as other words, silently. The ids below are CLIP's (openai/clip-vit-large-patch14's tokenizer).
    toks = load_tokenizers(tmp_path, PRESETS[name])
    assert [t.pad_token for t in toks] == pads  # as the released tokenizers pad (OpenCLIP's with id 0)
    for tok in toks:
        assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tok("Hello, world").input_ids == [49406, 3306, 267, 1002, 49407]
        ids = tok("A PHOTO of  a Cat", padding="max_length", max_length=77).input_ids
        assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and len(ids) == 77
        assert set(ids[7:]) == {tok.pad_token_id} and tok.pad_token_id in (0, 49407)


def test_each_text_encoder_pools_at_its_own_tokenizers_end_of_text(files, tmp_path):
    # tokenizer_2/ without tokenizer/: encoder 1 takes the builtin one, encoder 2 this one, whose end-of-text id
    # differs; both encoders were built with the first's id, so the second pooled at a token it never sees.
    path = tmp_path / "model.safetensors"
    path.write_bytes(files["tiny-sdxl"][1].read_bytes())
    tok = builtin_tokenizer(pad_token="!")
    tok.add_special_tokens({"eos_token": "<sdrt-eos>"})  # an end-of-text id of its own (914)
    tok.save_pretrained(tmp_path / "tokenizer_2")
    c = load_single_file(path)
    eos = [t.eos_token_id for t in c.tokenizers]
    assert eos[0] != eos[1] and [te.config.eos_token_id for te in c.text_encoders] == eos


def test_a_tokenizer_beside_the_file_is_part_of_its_identity(files, tmp_path):
    # The export and engine caches key on source_hash; the text encoders pool at the tokenizer's end-of-text id,
    # which is baked into the exported graph, so adding or editing tokenizer/ must not reuse the old export.
    from sdrt.models import source_hash

    path = tmp_path / "model.safetensors"
    path.write_bytes(files["tiny"][1].read_bytes())
    alone = source_hash(str(path))
    assert alone != hash_files([path])  # CLIP's merge table stands in, and is part of it
    builtin_tokenizer().save_pretrained(tmp_path / "tokenizer")
    beside = source_hash(str(path))
    assert beside != alone and load_single_file(path).source_hash == beside
    tok = builtin_tokenizer()
    tok.add_tokens(["<sdrt-test-token>"])
    tok.save_pretrained(tmp_path / "tokenizer")
    assert source_hash(str(path)) not in (alone, beside)


def test_empty_tokenizer_folder_beside_file_is_refused(files, tmp_path):
    # transformers makes a 2-token tokenizer with model_max_length 1e30 of an empty folder; generate overflowed
    path = tmp_path / "model.safetensors"
    path.write_bytes(files["tiny"][1].read_bytes())
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(SdrtError, match="tokenizer: no tokenizer vocabulary"):
        load_single_file(path)


def one_line_error(path, match: str) -> str:
    with pytest.raises(SdrtError, match=match) as e:
        load_single_file(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_truncated_file(files, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(files["tiny"][1].read_bytes()[:-100])
    one_line_error(path, "not a valid safetensors file")


def test_garbage_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + bytes(64))
    one_line_error(path, "not a valid safetensors file")
    path.write_bytes(b"")
    one_line_error(path, "not a valid safetensors file")


def test_unrelated_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(2, 4)}, path)
    one_line_error(path, r"no UNet weights \(model\.diffusion_model\.\*\) found")


def test_missing_component_and_unknown_unet(files, tmp_path):
    sd = to_ldm_state_dict(files["tiny"][0])
    path = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, path)
    one_line_error(path, r"no weights under first_stage_model\.\*")
    # An inpainting-style UNet (9 input channels) has a known width but no preset's shapes.
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(sd, path)
    msg = one_line_error(path, "matches no preset")
    assert "closest 'tiny'" in msg and "conv_in.weight" in msg


def test_missing_path(tmp_path):
    with pytest.raises(SdrtError, match="no such file"):
        load_single_file(tmp_path / "absent.safetensors")
    with pytest.raises(SdrtError, match="neither a preset"):
        load_model(str(tmp_path / "absent.safetensors"))


def test_cli_info(files, tmp_path, capsys):
    from sdrt.cli import main

    path = files["tiny-sdxl"][1]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:      sdxl" in out and hash_files(checkpoint_files(path))[:16] in out and "text_encoder_2" in out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(hashlib.sha256(b"x").digest())
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a valid safetensors file" in err and "Traceback" not in err


def test_cli_arch_picks_what_the_weights_cannot_say(files, capsys):
    # SD 2.x 512-px base models have sd21's exact shapes but predict epsilon: detection says sd21, --arch corrects it.
    from sdrt.checkpoint import unet_mismatch
    from sdrt.cli import main

    with torch.device("meta"):
        sd = to_ldm_state_dict(build_preset(PRESETS["sd21"]))
    assert detect_preset("x.safetensors", sd) == "sd21" and unet_mismatch(PRESETS["sd21-base"], sd) is None
    assert (PRESETS["sd21"].prediction_type, PRESETS["sd21-base"].prediction_type) == ("v_prediction", "epsilon")

    path = str(files["tiny-sd2"][1])
    assert main(["info", path, "--arch", "tiny-sd2"]) == 0
    assert "prediction:  v_prediction" in capsys.readouterr().out
    for argv, match in ((["info", path, "--arch", "tiny"], "does not match preset 'tiny'"),
                        (["info", "tiny", "--arch", "tiny"], "--arch is for single-file"),
                        (["generate", "tiny", "x", "--arch", "sd21-base"], "--arch is for single-file")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err and "Traceback" not in err


def _edited(files, tmp_path, name: str, edit):
    sd = to_ldm_state_dict(files[name][0])
    edit(sd)
    path = tmp_path / f"{name}-edited.safetensors"
    save_file(sd, path)
    return path


def _put(key, value):
    return lambda sd: sd.__setitem__(key, value)


U, V = "model.diffusion_model.", "first_stage_model."


@pytest.mark.parametrize("name, edit, match", [
    # weights that would have been cast to fp32 garbage
    ("tiny", lambda sd: sd.update({k: v.to(torch.int8) for k, v in sd.items() if k.startswith(U)}),
     r"model\.diffusion_model\..* is int8; sdrt reads floating-point weights only"),
    ("tiny", lambda sd: sd.update({k: v.to(torch.complex64) for k, v in sd.items() if k.startswith(V)}),
     r"first_stage_model\..* is complex64"),
    # keys the converters would have dropped: a different model loading as this one
    ("tiny-sd2", lambda sd: sd.update({U + "label_emb.0.0.weight": torch.zeros(32, 8)}),
     r"unet: 1 of its 325 tensors have no place in 'tiny-sd2' \(label_emb\)"),
    ("tiny", _put(U + "extra.weight", torch.zeros(4)), r"unet: 1 of its 325 tensors .* \(extra\)"),
    ("tiny", _put(V + "decoder.conv_in.lora_down.weight", torch.zeros(4, 4)), "vae: 1 of its 177 tensors"),
    # tensors of the wrong rank, once IndexErrors
    ("tiny-sd2", lambda sd: sd.update({k: v[0] for k, v in sd.items() if k.endswith("in_proj_weight")}),
     "text_encoder: unexpected layout"),
    ("tiny", lambda sd: sd.update({k: v.flatten() for k, v in sd.items() if k.endswith("attn2.to_k.weight")}),
     "matches no preset"),
    ("tiny-sdxl", lambda sd: sd.update({k: v[0] for k, v in sd.items() if k.endswith("text_projection")}),
     r"text_encoder_2: 1 wrong shape \(text_projection.weight"),
    # a missing key the VAE converter indexes: named with its component
    ("tiny", lambda sd: sd.pop(next(k for k in sd if k.startswith(V) and "upsample.conv.bias" in k)),
     r"vae: unexpected layout, key .*upsample\.conv\.bias"),
    ("tiny-sdxl", _put("edm_mean", torch.zeros(4)), "an EDM checkpoint"),
    ("tiny", lambda sd: [sd.__setitem__(k.replace(U, "model_ema."), sd.pop(k)) for k in list(sd) if k.startswith(U)],
     r"holds only EMA weights \(model_ema\.\*\)"),
], ids=["int8 unet", "complex vae", "unclip label_emb", "unknown unet key", "lora key in vae", "1-d in_proj",
        "1-d cross-attention", "1-d projection", "vae key missing", "edm", "ema only"])
def test_variants_that_are_not_the_model_are_refused(files, tmp_path, capsys, name, edit, match):
    from sdrt.cli import main

    path = _edited(files, tmp_path, name, edit)
    one_line_error(path, match)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err  # no library warnings before the line either


def test_a_baked_in_vaes_training_leftovers_are_ignored(files, tmp_path):
    # merges that bake in a standalone VAE file carry its discriminator loss and EMA counter (an int)
    path = _edited(files, tmp_path, "tiny", lambda sd: sd.update({
        V + "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4), V + "loss.logvar": torch.zeros(()),
        V + "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32), V + "model_ema.decay": torch.tensor(0.9)}))
    c = load_single_file(path)
    want = files["tiny"][0].vae.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in c.vae.state_dict().items())


def test_marker_keys_set_the_prediction_and_zero_snr(files, tmp_path):
    # ComfyUI saves v-prediction and zero-terminal-SNR models with these empty marker tensors
    path = _edited(files, tmp_path, "tiny-sdxl", lambda sd: sd.update(v_pred=torch.zeros(0), ztsnr=torch.zeros(0)))
    c = load_single_file(path)
    assert c.prediction_type == "v_prediction"
    assert c.scheduler_config["rescale_betas_zero_snr"] and c.scheduler_config["timestep_spacing"] == "trailing"
    assert load_single_file(files["tiny-sdxl"][1]).prediction_type == "epsilon"  # unmarked: the preset's


def test_a_tokenizer_longer_than_the_embedding_is_refused(files, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(files["tiny"][1].read_bytes())
    tok = builtin_tokenizer()
    tok.add_tokens([f"<emb{i}>" for i in range(200)])  # a textual inversion's tokens, without its embeddings
    tok.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(SdrtError, match="tokenizer has 1114 tokens but text_encoder embeds only 1024"):
        load_model(str(path))


def test_a_malformed_tokenizer_beside_the_file_is_one_line(files, tmp_path):
    path = tmp_path / "MODEL.SAFETENSORS"  # the suffix in any case
    path.write_bytes(files["tiny"][1].read_bytes())
    builtin_tokenizer().save_pretrained(tmp_path / "tokenizer")
    for f in ("tokenizer.json", "vocab.json"):
        if (tmp_path / "tokenizer" / f).exists():
            (tmp_path / "tokenizer" / f).write_text("[1, 2]")  # the tokenizers library raises a bare Exception
    with pytest.raises(SdrtError, match="tokenizer: cannot load tokenizer"):
        load_model(str(path))
