"""Latent training trusts nothing it has not checked (training/latents.py, training/run_state.py, train_mmf.py).

* Every latent-cache file is verified before use (`latents.read_cache`): a file that is garbage, truncated, empty,
  of another shape, dtype, image count, key or format, non-finite, edited, or holding another VAE's latents (even
  under this file's metadata) is never used: the images are encoded again, the log says why in one line, and the
  latents returned are exactly those of a clean encoding.
* A VAE whose ``scaling_factor`` is zero or not finite (or whose ``shift_factor`` is not finite) is refused before
  anything is encoded, in one line.
* The VAE is part of the run: a resume with another VAE (weights, config or class), or from pixels to latents and
  back, is refused in one line before any encoding; the same VAE in another folder resumes.

Tiny random `AutoencoderKL` (factor 2, 4 latent channels) on 8x8 digits, CPU, float32.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from test_latent import image_dataset, latent_pipeline, tiny_vae, uint8_digits
from test_training import check, run_script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import latents as latent_lib  # noqa: E402
import run_state  # noqa: E402

N = 24


def _rewrite(path, tensors=None, **metadata_changes):
    """Rewrite the cache file with other tensors and/or metadata (the rest kept)."""
    with safe_open(path, "np") as f:
        metadata = dict(f.metadata())
    tensors = load_file(path) if tensors is None else tensors
    metadata.update(metadata_changes)
    save_file(tensors, path, metadata=metadata)


def _with_digest(path, tensors):
    """Tensors written with a correct SHA-256 in the metadata: only the spot check or the shape checks can tell."""
    _rewrite(path, tensors, sha256=latent_lib._tensors_digest(tensors))


# name -> (how the good file at ``path`` is spoiled, given the other VAE's file; the reason logged)
SPOILED = {
    "garbage bytes": (lambda p, o: Path(p).write_bytes(os.urandom(2048)), "not a readable safetensors file"),
    "truncated": (lambda p, o: Path(p).write_bytes(Path(p).read_bytes()[:-700]), "not a readable safetensors file"),
    "empty": (lambda p, o: Path(p).write_bytes(b""), "it is empty"),
    "a symlink to another file": (lambda p, o: (os.remove(p), os.symlink(o, p)), "not a regular file"),
    "wrong shape": (lambda p, o: _with_digest(p, {"latents": load_file(p)["latents"].reshape(N, 4, 2, 8).copy()}),
                    "has shape (24, 4, 2, 8), expected (24, 4, 4, 4)"),
    "float64": (lambda p, o: _with_digest(p, {"latents": load_file(p)["latents"].astype(np.float64)}),
                "is F64, not float32"),
    "8 latents for 24 images": (lambda p, o: _with_digest(p, {"latents": load_file(p)["latents"][:8].copy()}),
                                "has shape (8, 4, 4, 4)"),
    "claims 8 images": (lambda p, o: _rewrite(p, num_images="8"), "claims 8 images, the data has 24"),
    "no 'latents' tensor": (lambda p, o: _with_digest(p, {"z": load_file(p)["latents"]}),
                            "holds the tensors ['z'], expected ['latents']"),
    "an extra tensor": (lambda p, o: _with_digest(p, {**load_file(p), "extra": np.zeros(1, np.float32)}),
                        "holds the tensors ['extra', 'latents']"),
    "NaN": (lambda p, o: _with_digest(p, {"latents": np.where(np.arange(N * 64).reshape(N, 4, 4, 4) == 77, np.nan,
                                                              load_file(p)["latents"]).astype(np.float32)}),
            "'latents' holds non-finite values"),
    "one value edited": (lambda p, o: _rewrite(p, {"latents": load_file(p)["latents"] + np.float32(1e-3)}),
                         "do not match the SHA-256 in its metadata"),
    "another key in the metadata": (lambda p, o: _rewrite(p, key="0" * 64), "names the key '0000000000000000'"),
    "an older cache format": (lambda p, o: _rewrite(p, format="1"), "cache format '1', not 2"),
    "another VAE's file under this name": (lambda p, o: shutil.copyfile(o, p), "names the key"),
    "another VAE's latents, this file's metadata": (lambda p, o: _with_digest(p, load_file(o)),
                                                    "not what this VAE encodes for the first 4 images"),
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A clean cache file of VAE A for 24 digits, and VAE B's file for the same digits."""
    root = tmp_path_factory.mktemp("caches")
    pixels = uint8_digits(N)
    good, _ = latent_lib.cached_latents(tiny_vae(0), image_dataset(pixels), str(root / "a"), log=lambda m: None)
    latent_lib.cached_latents(tiny_vae(1), image_dataset(pixels), str(root / "b"), log=lambda m: None)
    (file_a,), (file_b,) = list((root / "a").iterdir()), list((root / "b").iterdir())
    return {"pixels": pixels, "good": good, "file": file_a, "other": file_b}


@pytest.mark.parametrize("name", list(SPOILED))
def test_a_bad_cache_file_is_never_used_but_encoded_again(name, caches, tmp_path):
    spoil, reason = SPOILED[name]
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / caches["file"].name
    shutil.copyfile(caches["file"], path)
    spoil(str(path), str(caches["other"]))
    logs = []
    latents, flipped = latent_lib.cached_latents(tiny_vae(0), image_dataset(caches["pixels"]), str(cache),
                                                 log=logs.append)
    assert np.array_equal(latents, caches["good"]) and flipped is None  # a clean encoding, bit for bit
    refusal = [line for line in logs if "not using" in line]
    assert len(refusal) == 1 and reason in refusal[0] and refusal[0].endswith("encoding the images again"), logs
    assert "\n" not in refusal[0]
    assert any("Latent cache: encoding 24 images" in line for line in logs)
    # The file was replaced by one that verifies (and is reused as it is).
    reused = []
    again, _ = latent_lib.cached_latents(tiny_vae(0), image_dataset(caches["pixels"]), str(cache), log=reused.append)
    assert np.array_equal(again, caches["good"]) and "reusing" in reused[-1] and "verified" in reused[-1]
    assert sorted(os.listdir(cache)) == [path.name]


def test_the_clean_file_verifies_and_the_flipped_latents_are_checked_too(caches, tmp_path):
    pixels = caches["pixels"]
    vae = tiny_vae(0)
    key = latent_lib.cache_key(vae, image_dataset(pixels))
    shape = latent_lib.expected_latent_shape(vae, image_dataset(pixels))
    latents, flipped = latent_lib.read_cache(str(caches["file"]), key, shape, False)
    assert np.array_equal(latents, caches["good"]) and flipped is None
    # With flips: a file whose flipped latents are another VAE's fails the spot check on them.
    flips = image_dataset(pixels, random_flip=True)
    cache = tmp_path / "flip"
    latent_lib.cached_latents(vae, flips, str(cache), log=lambda m: None)
    (path,) = list(cache.iterdir())
    tensors = load_file(str(path))
    other_flipped, _ = latent_lib.cached_latents(tiny_vae(1), image_dataset(pixels), str(tmp_path / "o"),
                                                 log=lambda m: None)
    _with_digest(str(path), {"latents": tensors["latents"], "latents_flipped": other_flipped})
    logs = []
    _, flipped = latent_lib.cached_latents(vae, flips, str(cache), log=logs.append)
    assert np.array_equal(flipped, tensors["latents_flipped"])
    assert any("'latents_flipped' are not what this VAE encodes" in line for line in logs), logs
    # A file of the flipped run lacks nothing, one of the unflipped run lacks the flipped latents.
    _with_digest(str(path), {"latents": tensors["latents"]})
    logs = []
    latent_lib.cached_latents(vae, flips, str(cache), log=logs.append)
    assert any("expected ['latents', 'latents_flipped']" in line for line in logs), logs


def test_an_unwritable_cache_and_a_vae_that_encodes_nan_are_refused(caches, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / caches["file"].name).mkdir()  # a folder where the file must go: it cannot be replaced
    with pytest.raises(latent_lib.LatentError, match="Cannot write the latent cache .*set --latent_cache_dir"):
        latent_lib.cached_latents(tiny_vae(0), image_dataset(caches["pixels"]), str(cache), log=lambda m: None)
    assert not [name for name in os.listdir(cache) if ".tmp-" in name]
    broken = tiny_vae(0)
    with torch.no_grad():
        broken.encoder.conv_in.bias[0] = float("nan")
    with pytest.raises(latent_lib.LatentError, match=r"encodes \w+ of the 24 images to non-finite latents"):
        latent_lib.cached_latents(broken, image_dataset(caches["pixels"]), str(tmp_path / "nan"), log=lambda m: None)
    assert not (tmp_path / "nan").exists() or not os.listdir(tmp_path / "nan")


# ---------------------------------------------------------------------------------------------------- scaling
@pytest.mark.parametrize("config, message", [
    ({"scaling_factor": 0.0}, "scaling_factor is 0.0"),
    ({"scaling_factor": float("nan")}, "scaling_factor is nan"),
    ({"scaling_factor": float("inf")}, "scaling_factor is inf"),
    ({"scaling_factor": None}, "scaling_factor is None"),
    ({"scaling_factor": "0.18"}, "scaling_factor is '0.18'"),
    ({"shift_factor": float("nan")}, "shift_factor is nan"),
    ({"shift_factor": float("-inf")}, "shift_factor is -inf"),
])
def test_a_vae_with_a_zero_or_non_finite_factor_is_refused(config, message):
    vae = tiny_vae()
    vae.register_to_config(**config)
    with pytest.raises(latent_lib.LatentError, match=message.replace(".", r"\.").replace("(", r"\(")):
        latent_lib.LatentSpace(vae, 8, 1)


def test_a_pipeline_refuses_such_a_vae_built_or_loaded(tmp_path, capsys):
    """The pipeline's decode divides by scaling_factor: a hand-edited 0 (or NaN) would give NaN images. Refused when
    the pipeline is built, when a saved folder is loaded, and by mmf-generate in one line."""
    from mmf_diffusers import MMFPipeline, generate

    pipe = latent_pipeline()
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.0)
    with pytest.raises(ValueError, match=r"scaling_factor is 0\.0: it must be a finite non-zero number"):
        MMFPipeline(pipe.unet, pipe.scheduler, vae=vae)
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["scaling_factor"] = float("nan")
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="scaling_factor is nan"):
        MMFPipeline.from_pretrained(str(folder))
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--pipeline", str(folder), "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "scaling_factor is nan" in err and "Traceback" not in err and err.count("\n") <= 3, err
    assert not (tmp_path / "x.png").exists()


def test_the_training_script_refuses_such_a_vae_at_start(tmp_path, capsys):
    import train_mmf

    data = digit_folder(tmp_path / "images")
    for i, (key, value) in enumerate((("scaling_factor", 0), ("scaling_factor", float("nan")),
                                      ("shift_factor", float("inf")))):
        vae_dir = tmp_path / f"vae{i}"
        tiny_vae().save_pretrained(vae_dir)
        config = json.loads((vae_dir / "config.json").read_text())
        config[key] = value
        (vae_dir / "config.json").write_text(json.dumps(config))  # NaN / Infinity, as json writes them
        out = tmp_path / f"out{i}"
        assert train_mmf.main(train_args(data, out, vae_dir)) == 2
        err = capsys.readouterr().err
        # One line (the image folder's loading bars aside), no traceback.
        assert f"The VAE's {key} is {value!r}" in err.strip().splitlines()[-1] and "Traceback" not in err, err
        assert err.count("error:") == 1, err
        assert not (out / "latent_cache").exists() and not list(out.glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------------- resume
def identity(vae):
    return latent_lib.vae_identity(vae)


def test_the_vae_identity_and_its_conflicts():
    a = identity(tiny_vae(0))
    assert a == identity(tiny_vae(0)) and a["class"] == "AutoencoderKL" and len(a["sha256"]) == 64
    assert json.loads(json.dumps(a)) == a  # as the checkpoint stores it
    nudged = tiny_vae(0)
    with torch.no_grad():
        nudged.decoder.conv_out.bias[0] += 1e-6
    saved_latent = {"vae_name_or_path": "vae_a", "vae": a}
    cases = [  # (saved configuration, current identity, what the refusal names; "" = accepted)
        (saved_latent, a, ""),
        ({"vae_name_or_path": "moved/elsewhere", "vae": a}, a, ""),  # the same VAE in another folder
        (saved_latent, identity(nudged), "the VAE's weights (SHA-256"),
        (saved_latent, identity(tiny_vae(0, scaling_factor=3.4)), "the VAE's config: scaling_factor 1.7 -> 3.4"),
        (saved_latent, dict(a, **{"class": "VQModel"}), "the VAE: a AutoencoderKL -> a VQModel"),
        (saved_latent, None, "the latents of a AutoencoderKL -> pixels"),
        ({"vae_name_or_path": None, "vae": None}, a, "pixels -> the latents of a VAE"),
        ({"resolution": 8}, a, "pixels -> the latents of a VAE"),  # a pixel checkpoint of an older version
        ({"resolution": 8}, None, ""),
        ({"vae_name_or_path": "vae_a"}, a, "does not record which VAE"),  # a latent checkpoint of an older version
        ({"vae_name_or_path": "vae_a", "vae": "sha"}, a, "malformed"),
    ]
    for saved, current, expected in cases:
        problems = run_state.vae_conflicts(saved, current)
        assert (problems == []) if not expected else (len(problems) == 1 and expected in problems[0]), \
            (saved, expected, problems)
        # resume_conflicts reports the same, beside the flags
        assert run_state.resume_conflicts(saved, {"vae": current}) == problems


def digit_folder(root: Path, n: int = 32) -> Path:
    root.mkdir(parents=True)
    for i, pixels in enumerate(uint8_digits(n)):
        Image.fromarray((pixels.astype(np.float32) * 255 / 16).astype(np.uint8), "L").save(root / f"{i:02d}.png")
    return root


def train_args(data, out, vae_dir, steps=1, *extra):
    return ["--train_data_dir", str(data), "--center_crop", "--vae_name_or_path", str(vae_dir), "--resolution", "8",
            "--block_out_channels", "8", "16", "--num_sample_images", "2", "--lr_warmup_steps", "0", "--seed", "0",
            "--train_batch_size", "16", "--max_train_steps", str(steps), "--checkpointing_steps", "1",
            "--logger", "none", "--output_dir", str(out), *extra]


@pytest.mark.slow
def test_resume_with_another_vae_is_refused_and_a_bad_cache_is_encoded_again(tmp_path):
    """Through train_mmf.py as launched: train 1 step on VAE A's latents; resuming with VAE B (other weights, same
    config) is refused in one line before anything is encoded; resuming with A copied to another folder, with the cache
    file truncated meanwhile, encodes again (one line says why) and trains on."""
    data = digit_folder(tmp_path / "images")
    vae_a, vae_b, moved = tmp_path / "vae_a", tmp_path / "vae_b", tmp_path / "moved" / "vae"
    tiny_vae(0).save_pretrained(vae_a)
    tiny_vae(1).save_pretrained(vae_b)
    shutil.copytree(vae_a, moved)
    out = tmp_path / "run"
    check(run_script(tmp_path, train_args(data, out, vae_a)))
    (cache_file,) = list((out / "latent_cache").iterdir())
    saved = json.loads((out / "checkpoint-1" / "training_state.json").read_text())["config"]["vae"]
    assert saved == identity(tiny_vae(0))

    refused = run_script(tmp_path, train_args(data, out, vae_b, 2, "--resume_from_checkpoint", "latest"))
    check(refused, 2)
    assert "Traceback" not in refused.stderr and refused.stderr.count("error:") == 1, refused.stderr
    assert "Cannot resume: the run changed (the VAE's weights (SHA-256" in refused.stderr.strip().splitlines()[-1]
    assert "Latent cache" not in refused.stdout and list((out / "latent_cache").iterdir()) == [cache_file]

    cache_file.write_bytes(cache_file.read_bytes()[:-300])
    resumed = run_script(tmp_path, train_args(data, out, moved, 2, "--resume_from_checkpoint", "latest"))
    check(resumed)
    assert "Resuming from" in resumed.stdout and "Traceback" not in resumed.stderr
    assert f"Latent cache: not using {cache_file}: it is not a readable safetensors file" in resumed.stdout
    assert (out / "checkpoint-2").is_dir()
    with safe_open(str(cache_file), "np") as f:
        key = f.metadata()["key"]
    latents, _ = latent_lib.read_cache(str(cache_file), key, (32, 4, 4, 4), False)  # replaced by a verified file
    assert np.isfinite(latents).all()
