"""Latent-space training for `train_mmf.py` (``--vae_name_or_path``): a frozen VAE, and every image encoded once.

The UNet is trained on ``x = (E(image) - shift_factor) * scaling_factor`` (the VAE config's factors; the same
`mmf_diffusers.pipeline_mmf.encode_images` the pipeline's `decode_latents` inverts), with the latent's channels and
size, and the saved `MMFPipeline` carries the VAE as its ``vae`` component, so sampling decodes once per image.

* **The VAE is frozen**: loaded once (``AutoencoderKL``, ``AutoencoderTiny`` or ``VQModel``, from a folder or a Hub
  id with ``--vae_subfolder``), ``eval()``, ``requires_grad_(False)``, never given to the optimiser, EMA, accelerate
  or a checkpoint; it is only used before training starts.
* **Posterior mean, not a sample** (`AutoencoderKL`): the cache holds ``E[z | x]``. A sample drawn once and cached
  would freeze one draw of the posterior noise for every epoch, which is neither the mean nor fresh sampling; fresh
  sampling per step (what latent-diffusion training does with an online encoder) would need the posterior's std in
  the cache and adds noise the decoder mostly ignores: for a VAE trained with a small KL weight the posterior std is
  small against the spread of the means (the demonstration VAE: see ``pipelines/mmf-mnist-latent``). The mean is
  deterministic, so the cache is exact and reproducible, and sampling starts from the same scaled space.
* **The cache** lives in ``--latent_cache_dir`` (default ``<output_dir>/latent_cache``) as
  ``<key>.safetensors``: ``latents`` ``(N, c, h, w)`` float32 and, with ``--random_flip``, ``latents_flipped``, plus
  the ingredients of the key as metadata. The key is a SHA-256 of: the VAE's class, config (scaling and shift
  included) and weights; the prepared pixels of every image (so a changed, added or removed image changes it); the
  resolution, channels and crop; whether flips are cached; the cache format. Anything that changes the latents
  therefore changes the file name: a resumed run or a second run on the same data and VAE reuses the file, and any
  change encodes again into a new file (old files are left in place; delete the folder to reclaim the space).
  Finding the key costs one pass of image preparation (no VAE call); the file is written to a temporary name and
  renamed, so a killed run never leaves a partial cache.
* **A cache file is verified before use** (`read_cache`): it must be a readable safetensors file of this format whose
  metadata names this key and image count, holding exactly the expected tensors, float32, ``(N, c, h, w)`` for this
  VAE and resolution, finite, with the SHA-256 of their bytes that the metadata records; and the first images,
  encoded again now, must give its first latents (so another VAE's latents under this name are caught, whatever the
  metadata says). A file that fails any check is never used: the images are encoded again and the file replaced, and
  the log says why in one line. Encoded latents that are not finite are refused, not cached.
* **The VAE is part of the run**: `vae_identity` (class, public config, SHA-256 of config and weights) is saved in the
  checkpoint's configuration, and a resume with another VAE is refused (``run_state.resume_conflicts``). A VAE whose
  ``scaling_factor`` is zero or not finite, or whose ``shift_factor`` is not finite, is refused at start
  (`check_scaling`): its latents, or their decoding, would be NaN.
* **Flips are encoded, not applied to latents**: a VAE's encoder is not equivariant to a left-right flip (for the
  demonstration VAE and a random one ``E(flip(x)) != flip(E(x))``: tests/test_latent.py measures it), so with
  ``--random_flip`` both orientations are encoded and cached, and `LatentDataset` picks one per ``(seed, epoch,
  index)`` with exactly the draw `data.ImageDataset` makes for the same item.
* **Crops**: the cache holds one latent per image and orientation, so the crop must be deterministic:
  ``--center_crop`` is required.

This module imports numpy only at import time (train_mmf.py checks its arguments before the heavy imports).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from typing import Callable, Optional

import numpy as np

CACHE_FORMAT = 2  # 2: the metadata records the latents' shape and SHA-256 (verified on reuse)
ENCODE_BATCH = 64
KEY_CHUNK = 1024  # images per digest of the cache key (the key does not depend on how many processes computed it)
#: How many of the first images are encoded again to check a cache file's latents against the VAE.
SPOT_CHECK_IMAGES = 4
#: Largest relative L2 difference between cached and freshly encoded latents: encodings differ by float rounding
#: across batch sizes and devices (~1e-6 on CPU, ~1e-3 with TF32), another VAE's latents by order 1.
SPOT_CHECK_TOLERANCE = 1e-2


class LatentError(ValueError):
    """Bad input for latent training: a VAE of the wrong class, sizes or channels that do not fit."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("latent space (train the UNet on the latents of a frozen VAE)")
    g.add_argument("--vae_name_or_path", type=str, default=None,
                   help="A diffusers AutoencoderKL, AutoencoderTiny or VQModel (folder or Hub id). The UNet is then "
                   "built for its latent channels and size (--resolution / the VAE's factor), every image is encoded "
                   "once into the latent cache, and the saved pipeline includes the VAE. The VAE stays frozen (eval "
                   "mode, outside the optimiser). Latents are the posterior mean E[z|x], scaled by the VAE config's "
                   "scaling_factor (and shift_factor): deterministic, so the cache is exact; a sample cached once would "
                   "freeze one draw of noise for every epoch. Needs --center_crop (one cached latent per image).")
    g.add_argument("--vae_subfolder", type=str, default=None,
                   help="Subfolder of --vae_name_or_path holding the VAE (e.g. 'vae' for a pipeline repository).")
    g.add_argument("--latent_cache_dir", type=str, default=None,
                   help="Where encoded latents are cached (default: <output_dir>/latent_cache), as <key>.safetensors; "
                   "the key hashes the VAE (class, config, weights), the prepared pixels, resolution, channels and "
                   "--random_flip (both orientations are encoded), so any change encodes again into a new file.")


def validate(args: argparse.Namespace, need: Callable[[bool, str], None]) -> None:
    """Checks that need no heavy import (called from train_mmf.validate_args)."""
    if args.vae_name_or_path is None:
        need(args.vae_subfolder is None, "--vae_subfolder only applies with --vae_name_or_path")
        need(args.latent_cache_dir is None, "--latent_cache_dir only applies with --vae_name_or_path")
        return
    need(bool(args.vae_name_or_path.strip()), "--vae_name_or_path is empty")
    need(args.vae_subfolder is None or bool(args.vae_subfolder.strip()), "--vae_subfolder is empty")
    need(args.modality == "image", "--vae_name_or_path applies to images, not --modality trajectory")
    need(args.center_crop,
         "--vae_name_or_path needs --center_crop: the latent cache holds one latent per image (and orientation), so "
         "random crops cannot be cached")


# ---------------------------------------------------------------------------------------------------- the VAE
def load_vae(name_or_path: str, subfolder: Optional[str] = None):
    """The frozen VAE (eval mode, no gradients) from a folder or Hub id; a LatentError for anything else."""
    from diffusers import AutoencoderKL

    from mmf_diffusers.pipeline_mmf import VAE_CLASSES

    where = name_or_path + (f" (subfolder {subfolder!r})" if subfolder else "")
    # A Hub id is "name" or "owner/name": anything else that is not a folder is a missing local path.
    if not os.path.isdir(name_or_path) and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise LatentError(f"Could not read a model config at --vae_name_or_path {where}: no such folder")
    try:
        config = AutoencoderKL.load_config(name_or_path, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise LatentError(f"Could not read a model config at --vae_name_or_path {where}: {_first_line(error)}") from None
    class_name = config.get("_class_name")
    classes = {cls.__name__: cls for cls in VAE_CLASSES}
    if class_name not in classes:
        raise LatentError(f"--vae_name_or_path {where} holds a {class_name}, not a VAE: it must be one of "
                          f"{', '.join(classes)}")
    try:
        vae = classes[class_name].from_pretrained(name_or_path, subfolder=subfolder)
    except (OSError, ValueError) as error:
        raise LatentError(f"Could not load the {class_name} at --vae_name_or_path {where}: {_first_line(error)}") from None
    vae.requires_grad_(False)
    return vae.eval()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_scaling(vae) -> None:
    """A LatentError unless the VAE's factors can be used (`mmf_diffusers.pipeline_mmf.check_vae`: a finite non-zero
    ``scaling_factor``, a finite or missing ``shift_factor``)."""
    from mmf_diffusers.pipeline_mmf import check_vae

    try:
        check_vae(vae)
    except ValueError as error:
        raise LatentError(str(error))


def vae_identity(vae, fingerprint: Optional[str] = None) -> dict:
    """What identifies the VAE of a run (saved in its configuration, compared on resume): ``{"class", "config" (the
    public config, JSON round-tripped), "sha256" (`vae_fingerprint`: class, config and weights)}``."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return {"class": type(vae).__name__, "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "sha256": fingerprint or vae_fingerprint(vae)}


def vae_fingerprint(vae) -> str:
    """SHA-256 of the VAE's class, public config (scaling and shift included) and every weight, in a fixed order."""
    import torch

    digest = hashlib.sha256(type(vae).__name__.encode())
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LatentSpace:
    """What train_mmf.py needs to train on latents: the frozen ``vae``, the UNet's ``channels`` and ``size``, and
    (after `encode_dataset`) the ``dataset`` of cached latents.

    Checks, each a LatentError with the reason: the VAE's class; the data's channels against the VAE's input;
    ``resolution`` divisible by the VAE's factor; the latent size against the UNet's levels (``unet_levels``; give
    ``None`` when the UNet is loaded later and call `check_unet` then).
    """

    def __init__(self, vae, resolution: int, num_channels: int, unet_levels: Optional[int] = None):
        from mmf_diffusers.pipeline_mmf import check_vae, vae_latent_channels, vae_scale_factor

        try:
            check_vae(vae)
        except ValueError as error:
            raise LatentError(str(error)) from None
        check_scaling(vae)
        self.vae = vae
        self._identity = None
        self.factor = vae_scale_factor(vae)
        self.channels = vae_latent_channels(vae)
        if vae.config.in_channels != num_channels:
            raise LatentError(f"The VAE encodes {vae.config.in_channels}-channel images but the data has {num_channels} "
                              "channels (set --num_channels to match)")
        if resolution % self.factor:
            raise LatentError(f"--resolution {resolution} is not divisible by the VAE's factor {self.factor} (e.g. "
                              f"{max(self.factor, resolution // self.factor * self.factor)})")
        self.size = resolution // self.factor
        self.dataset = None
        if unet_levels is not None:
            self.check_unet(unet_levels)

    def check_unet(self, levels: int, in_channels: Optional[int] = None) -> None:
        """The latent must go through a UNet with ``levels`` levels (and ``in_channels`` channels, if given)."""
        factor = 2 ** (levels - 1)
        if self.size % factor:
            raise LatentError(f"The latent is {self.size}x{self.size} (--resolution / the VAE's factor {self.factor}), "
                              f"which a UNet with {levels} levels cannot take: it must be divisible by 2**{levels - 1} "
                              f"= {factor}; use fewer UNet levels or a resolution of "
                              f"{max(factor, self.size // factor * factor) * self.factor}")
        if in_channels is not None and in_channels != self.channels:
            raise LatentError(f"The UNet takes {in_channels} channels but the VAE's latents have {self.channels}")

    @property
    def identity(self) -> dict:
        """`vae_identity` of the VAE, computed once (hashing the weights takes a pass over them)."""
        if self._identity is None:
            self._identity = vae_identity(self.vae)
        return self._identity

    def encode_dataset(self, image_dataset, cache_dir: str, log: Callable[[str], None] = print,
                       processes: Optional["Processes"] = None) -> "LatentDataset":
        """Encode ``image_dataset`` (a centre-cropped `data.ImageDataset`) once, or reuse the cache; returns (and
        keeps as ``self.dataset``) the `LatentDataset` that replaces it. With several ``processes`` each encodes its
        share (see `cached_latents`); every process must call it."""
        if not image_dataset.center_crop:
            raise LatentError("latent caching needs centre crops (--center_crop)")
        latents, flipped = cached_latents(self.vae, image_dataset, cache_dir, log,
                                          fingerprint=self.identity["sha256"], processes=processes)
        labels = None
        if image_dataset.with_labels:
            labels = np.asarray([int(image_dataset.source.labels[i]) for i in image_dataset.indices], dtype=np.int64)
        self.dataset = LatentDataset(latents, flipped, labels, seed=image_dataset.seed)
        return self.dataset


# ---------------------------------------------------------------------------------------------------- the cache
def _unflipped_images(image_dataset, start: int, stop: int) -> np.ndarray:
    """Prepared pixels ``(n, C, R, R)`` of items ``[start, stop)`` without flip (a centre crop draws nothing)."""
    arrays = []
    for i in range(start, stop):
        with image_dataset.source.open(image_dataset.indices[i]) as image:
            arrays.append(_preprocess(image, image_dataset))
    return np.stack(arrays)


def _preprocess(image, image_dataset) -> np.ndarray:
    from data import preprocess

    return preprocess(image, image_dataset.resolution, image_dataset.num_channels, center_crop=True, random_flip=False)


class Processes:
    """The processes that share the latent cache's work: this one's ``index`` of ``count``, ``gather(obj)`` (every
    process's ``obj``, in process order; a collective) and ``barrier()``. The default is one process."""

    def __init__(self, index: int = 0, count: int = 1, gather: Optional[Callable] = None,
                 barrier: Optional[Callable] = None):
        self.index, self.count = index, count
        self.gather = gather or (lambda obj: [obj])
        self.barrier = barrier or (lambda: None)

    def share(self, n: int) -> range:
        """This process's contiguous share of ``n`` items."""
        return range(n * self.index // self.count, n * (self.index + 1) // self.count)


def cache_key(vae, image_dataset, chunk: int = KEY_CHUNK, fingerprint: Optional[str] = None,
              processes: Optional[Processes] = None) -> str:
    """The SHA-256 naming the cache file (see the module docstring): VAE, prepared pixels, sizes, flips, format.
    ``fingerprint``: `vae_fingerprint` of ``vae`` when already computed. The pixels enter as one SHA-256 per ``chunk``
    images; with several ``processes`` each prepares and hashes every count-th chunk only (a collective), and the key
    is the same as one process's."""
    processes = processes or Processes()
    digest = hashlib.sha256(f"mmf-latent-cache:{CACHE_FORMAT}:posterior-mean".encode())
    digest.update((fingerprint or vae_fingerprint(vae)).encode())
    digest.update(json.dumps({"resolution": image_dataset.resolution, "num_channels": image_dataset.num_channels,
                              "center_crop": True, "random_flip": bool(image_dataset.random_flip),
                              "num_images": len(image_dataset)}, sort_keys=True).encode())
    starts = range(0, len(image_dataset), chunk)
    mine = {i: hashlib.sha256(_unflipped_images(image_dataset, start, min(start + chunk, len(image_dataset)))
                              .tobytes()).hexdigest()
            for i, start in enumerate(starts) if i % processes.count == processes.index}
    chunks = {}
    for part in processes.gather(mine):
        chunks.update(part)
    for i in range(len(starts)):
        digest.update(chunks[i].encode())
    return digest.hexdigest()


class CacheProblem(ValueError):
    """Why a latent-cache file cannot be used (one line); the caller encodes the images again."""


def _encode(vae, pixels) -> np.ndarray:
    """Scaled latents of ``pixels`` (a float tensor ``(n, C, R, R)`` in [-1, 1]) as float32 numpy ``(n, c, h, w)``."""
    from mmf_diffusers.pipeline_mmf import encode_images

    return encode_images(vae, pixels).float().cpu().numpy()


def _tensors_digest(tensors: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(f"{name}:{tensors[name].dtype}:{tensors[name].shape}".encode())
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()


def expected_latent_shape(vae, image_dataset) -> tuple:
    """``(N, c, h, w)``: the shape of the cached latents of ``image_dataset`` for ``vae``."""
    from mmf_diffusers.pipeline_mmf import vae_latent_channels, vae_scale_factor

    size = image_dataset.resolution // vae_scale_factor(vae)
    return (len(image_dataset), vae_latent_channels(vae), size, size)


def read_cache(path: str, key: str, shape: tuple, with_flip: bool, spot_check: Optional[Callable] = None):
    """``(latents, latents_flipped or None)`` from the cache file ``path`` once it is verified against what it must
    hold: this format, ``key`` and image count in its metadata, exactly ``latents`` (and ``latents_flipped`` when
    ``with_flip``), float32, ``shape``, finite, the SHA-256 its metadata records, and (``spot_check(latents,
    flipped)`` returning a problem or None) the VAE's own encoding of the first images. Raises `CacheProblem` with the
    first thing that does not hold."""
    from safetensors import safe_open

    if os.path.islink(path) or not os.path.isfile(path):
        raise CacheProblem("it is not a regular file")
    if os.path.getsize(path) == 0:
        raise CacheProblem("it is empty")
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            names = sorted(f.keys())
            expected_names = ["latents"] + (["latents_flipped"] if with_flip else [])
            if names != expected_names:
                raise CacheProblem(f"it holds the tensors {names}, expected {expected_names}")
            claims = {name: metadata.get(name) for name in ("format", "key", "num_images")}
            if claims["format"] != str(CACHE_FORMAT):
                raise CacheProblem(f"it is of cache format {claims['format']!r}, not {CACHE_FORMAT}")
            if claims["key"] != key:
                raise CacheProblem(f"its metadata names the key {str(claims['key'])[:16]!r}..., not this VAE and "
                                   f"data's {key[:16]!r}...")
            if claims["num_images"] != str(shape[0]):
                raise CacheProblem(f"its metadata claims {claims['num_images']} images, the data has {shape[0]}")
            tensors = {}
            for name in names:
                info = f.get_slice(name)
                dtype, found = info.get_dtype(), tuple(info.get_shape())
                if dtype != "F32":
                    raise CacheProblem(f"{name!r} is {dtype}, not float32 (F32)")
                if found != tuple(shape):
                    raise CacheProblem(f"{name!r} has shape {found}, expected {tuple(shape)} (images, latent "
                                       "channels, latent size)")
                tensors[name] = f.get_tensor(name)
    except CacheProblem:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ValueError, ...
        raise CacheProblem(f"it is not a readable safetensors file ({_first_line(error)})") from None
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise CacheProblem(f"{name!r} holds non-finite values")
    if metadata.get("sha256") != _tensors_digest(tensors):
        raise CacheProblem("its tensors do not match the SHA-256 in its metadata (damaged or edited)")
    latents, flipped = tensors["latents"], tensors.get("latents_flipped")
    problem = spot_check(latents, flipped) if spot_check is not None else None
    if problem:
        raise CacheProblem(problem)
    return latents, flipped


def _spot_check(vae, image_dataset, with_flip: bool) -> Callable:
    """A ``spot_check`` for `read_cache`: the first `SPOT_CHECK_IMAGES` images (and their flips), encoded now, must
    match the cached latents to `SPOT_CHECK_TOLERANCE` (relative L2)."""
    import torch

    def check(latents, flipped) -> Optional[str]:
        k = min(SPOT_CHECK_IMAGES, len(image_dataset))
        pixels = torch.from_numpy(_unflipped_images(image_dataset, 0, k))
        pairs = [("latents", latents, pixels)] + ([("latents_flipped", flipped, pixels.flip(-1))] if with_flip else [])
        for name, cached, images in pairs:
            fresh = _encode(vae, images)
            error = float(np.linalg.norm(cached[:k] - fresh) / max(np.linalg.norm(fresh), 1e-12))
            if not error <= SPOT_CHECK_TOLERANCE:
                return (f"its {name!r} are not what this VAE encodes for the first {k} images (relative difference "
                        f"{error:.3g}): another VAE's or other images' latents")
        return None

    return check


def cached_latents(vae, image_dataset, cache_dir: str, log: Callable[[str], None] = print,
                   fingerprint: Optional[str] = None, processes: Optional[Processes] = None):
    """``(latents, latents_flipped or None)``, float32 numpy ``(N, c, h, w)``, from ``cache_dir`` when a verified file
    of the same key is there (`read_cache`), else encoded now (both orientations with ``random_flip``) and written
    there, replacing a file that failed verification. ``fingerprint``: `vae_fingerprint` of ``vae`` if known.

    With several ``processes`` (a collective: every process calls it) the first one decides whether the file can be
    reused; otherwise each encodes its contiguous share of the images (on the VAE's device) into a part file, the
    first one merges the parts into the cache file, and the others then read it. No process waits while another
    does the whole job."""
    from safetensors.numpy import load_file, save_file

    processes = processes or Processes()
    first = processes.index == 0
    key = cache_key(vae, image_dataset, fingerprint=fingerprint, processes=processes)
    path = os.path.join(cache_dir, f"{key[:32]}.safetensors")
    with_flip = bool(image_dataset.random_flip)
    shape = expected_latent_shape(vae, image_dataset)
    reuse = None
    if first and os.path.lexists(path):
        try:
            reuse = read_cache(path, key, shape, with_flip, _spot_check(vae, image_dataset, with_flip))
        except CacheProblem as problem:
            log(f"Latent cache: not using {path}: {problem}; encoding the images again")
        else:
            log(f"Latent cache: reusing {path} ({shape[0]} images{', both orientations' if with_flip else ''}, "
                "verified)")
    if processes.gather(reuse is not None)[0]:
        return reuse if first else _read_merged(path, key, shape, with_flip)
    n = len(image_dataset)
    start_time = time.time()
    log(f"Latent cache: encoding {n} images{' in both orientations' if with_flip else ''} with the "
        f"{type(vae).__name__} into {path}" + (f" ({processes.count} processes share them)" if processes.count > 1
                                               else ""))
    share = processes.share(n)
    tensors = _encode_images(vae, image_dataset, share.start, share.stop, with_flip)
    problems = [p for p in processes.gather(_non_finite_problem(tensors, share.start)) if p]
    if problems:
        raise LatentError(f"The VAE encodes some of the {n} images to non-finite latents ({problems[0]}): check the "
                          "VAE's weights and scaling_factor")
    if processes.count > 1:  # each process's share into a part file; the first one merges them in order
        part = f"{path}.part-{processes.index}-of-{processes.count}"
        _write_or_explain(lambda: (os.makedirs(cache_dir, exist_ok=True), save_file(tensors, part)), part)
        processes.barrier()
        if first:
            parts = [load_file(f"{path}.part-{i}-of-{processes.count}") for i in range(processes.count)]
            tensors = {name: np.ascontiguousarray(np.concatenate([p[name] for p in parts])) for name in tensors}
    written = None  # the first process's error message, shared so that no process waits for a file never written
    if first:
        metadata = {"key": key, "format": str(CACHE_FORMAT), "vae_class": type(vae).__name__,
                    "encoding": "posterior mean", "num_images": str(n), "resolution": str(image_dataset.resolution),
                    "random_flip": str(with_flip), "scaling_factor": str(vae.config.scaling_factor),
                    "shift_factor": str(getattr(vae.config, "shift_factor", None)),
                    "shape": json.dumps(list(shape)), "sha256": _tensors_digest(tensors)}
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            _write_or_explain(lambda: (os.makedirs(cache_dir, exist_ok=True),
                                       save_file(tensors, temporary, metadata=metadata),
                                       os.replace(temporary, path)), path)
        except LatentError as error:
            written = str(error)
        finally:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            for i in range(processes.count if processes.count > 1 else 0):
                with contextlib.suppress(OSError):
                    os.remove(f"{path}.part-{i}-of-{processes.count}")
        if written is None:
            log(f"Latent cache: {n * (2 if with_flip else 1)} encodings in {time.time() - start_time:.1f} s")
    written = processes.gather(written)[0]
    if written is not None:
        raise LatentError(written)
    return (tensors["latents"], tensors.get("latents_flipped")) if first else _read_merged(path, key, shape, with_flip)


def _encode_images(vae, image_dataset, start: int, stop: int, with_flip: bool) -> dict:
    """``{"latents": (n, c, h, w)[, "latents_flipped": ...]}`` of items ``[start, stop)``, float32 numpy."""
    import torch

    outputs = {"latents": [], "latents_flipped": []}
    for lo in range(start, stop, ENCODE_BATCH):
        pixels = torch.from_numpy(_unflipped_images(image_dataset, lo, min(lo + ENCODE_BATCH, stop)))
        outputs["latents"].append(_encode(vae, pixels))
        if with_flip:  # flip the pixels, then encode: E(flip(x)) is not flip(E(x)) for a VAE
            outputs["latents_flipped"].append(_encode(vae, pixels.flip(-1)))
    names = ["latents"] + (["latents_flipped"] if with_flip else [])
    empty = (0, *expected_latent_shape(vae, image_dataset)[1:])  # a share of no images (more processes than images)
    return {name: np.ascontiguousarray(np.concatenate(outputs[name])) if outputs[name]
            else np.zeros(empty, dtype=np.float32) for name in names}


def _non_finite_problem(tensors: dict, offset: int) -> Optional[str]:
    for name, array in tensors.items():
        bad = np.flatnonzero(~np.isfinite(array).reshape(len(array), -1).all(axis=1))
        if len(bad):
            return f"{len(bad)} images of {name}, first image {offset + int(bad[0])}"
    return None


def _write_or_explain(write: Callable, path: str) -> None:
    try:
        write()
    except OSError as error:
        raise LatentError(f"Cannot write the latent cache {path}: {error.strerror or error} (set --latent_cache_dir "
                          "to a writable folder)") from None


def _read_merged(path: str, key: str, shape: tuple, with_flip: bool):
    """The cache file the first process wrote or verified, read (and verified) by another process."""
    try:
        return read_cache(path, key, shape, with_flip)
    except CacheProblem as problem:
        raise LatentError(f"The latent cache {path} that the main process wrote is not readable here: {problem} "
                          "(--latent_cache_dir must be a folder every process shares)") from None


class LatentDataset:
    """Cached latents in place of `data.ImageDataset`, for the same sampler and ``data.collate``.

    Items are addressed by ``(index, epoch)`` (a plain integer: epoch 0) and return float32 ``(c, h, w)`` latents, or
    ``(latent, label id)`` pairs when ``labels`` are given. With ``flipped`` (the latents of the flipped images), item
    ``(i, e)`` is flipped exactly when `data.ImageDataset` (centre crop, ``random_flip``) would flip it: the same
    ``default_rng([seed, epoch, index]).random() < 0.5`` draw.
    """

    def __init__(self, latents: np.ndarray, flipped: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                 seed: int = 0):
        if flipped is not None and flipped.shape != latents.shape:
            raise ValueError(f"flipped latents {flipped.shape} do not match the latents {latents.shape}")
        self.latents, self.flipped, self.labels, self.seed = latents, flipped, labels, seed

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        latent = self.latents[index]
        if self.flipped is not None and np.random.default_rng([self.seed, epoch, index]).random() < 0.5:
            latent = self.flipped[index]
        if self.labels is not None:
            return latent, int(self.labels[index])
        return latent
