"""Images from a checkpoint: load the generator it holds, draw n images, write them.

    load_generator(path, want=None, use_ema=True, backend=None) -> (model, meta, info)
    generate(model, meta, n, rng, labels=None, guidance=None, **sampler_args)
        -> (x (n, 1, H, W) float32 in [-1, 1], trajectory or None, info)
    sample_to_dir(SampleConfig(...), out_dir) -> info      (what `refdiff sample` does)

load_generator is the one place a diffusion checkpoint is loaded for sampling, the
likelihood, inpainting and the comparison: it returns the network seen as an eps-model
(refdiff.prediction.as_eps: an eps-network as it is, an x0- or v-network converted with the
checkpoint's schedule). Class-conditional sampling (`labels`, `guidance`: classifier-free
guidance, refdiff.prediction.EpsModel) runs the sampler chunk by chunk with each chunk's
labels, on one generator, so the images are those of one call.

Diffusion (eps) models go through refdiff.ddpm.sample_from_checkpoint (its samplers and
their options: sampler, steps, eta, variance, spacing, clip, batch) or, for the samplers in
refdiff.solvers.CHECKPOINT_SAMPLERS, refdiff.solvers.sample_from_checkpoint (sampler, steps,
batch, rtol, atol); inpainting through refdiff.inpaint; VAE and GAN through
their own `sample`. Every model's output is clipped to [-1, 1] the same way (a DDPM sampler
may overshoot; clipping, never min-max normalising: report §3.4.3). sample_to_dir writes
DIR/samples.npy, DIR/grid.png, DIR/sample.json, with `classes` DIR/labels.npy ((n,) int64,
the class asked for each image), and with `gif` DIR/denoise.gif, each atomically, holding
DIR's RunLock.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import io
from .checkpoint import CheckpointError, load_model
from .prediction import GUIDANCE_NEEDS_CLASS

KINDS = {"vae": "vae", "gan": "gan", "ddpm": "eps"}      # a row of the comparison -> the model kind it needs


@dataclass
class SampleConfig:
    checkpoint: str                     # a checkpoint.npz written by `refdiff train`
    n: int = 64                         # images drawn
    seed: int = 0                       # numpy.random.default_rng(seed) draws everything
    use_ema: bool = True                # the EMA weights where the checkpoint has them
    gif: bool = False                   # also write denoise.gif (eps models only)
    frames: int = 40                    # frames of the GIF
    backend: str = "numpy"              # where the model runs (refdiff_cuda.BACKENDS)
    sampler_args: dict = field(default_factory=dict)   # refdiff.ddpm.sample_from_checkpoint's options
    classes: list | None = None         # class-conditional models: the classes asked, n images spread over
                                        # them in contiguous blocks (refdiff.prediction.class_labels)
    guidance: float | None = None       # classifier-free guidance scale W (None: 1, the conditional model)

    def validate(self):
        for name, lo in (("n", 1), ("frames", 2), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"sample config: {name} must be an integer >= {lo}; got {v!r}")
        if self.classes is not None and (not isinstance(self.classes, (list, tuple)) or not self.classes or any(
                isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in self.classes)):
            raise ValueError(f"sample config: classes must be a non-empty list of integers; got {self.classes!r}")
        if self.guidance is not None and self.classes is None:
            raise ValueError(GUIDANCE_NEEDS_CLASS)
        if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(
                self.guidance, (int, float)) or not np.isfinite(self.guidance) or self.guidance < 0):
            raise ValueError(f"sample config: guidance must be a finite number >= 0; got {self.guidance!r}")
        return self


def load_generator(path, want=None, use_ema=True, backend=None, label="checkpoint"):
    """The model in checkpoint `path`; `want` (a kind, e.g. "eps") must match if given;
    `label` names the file in messages. -> (model, meta, info dict: checkpoint, model, kind,
    epoch, ema)."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{label} {path!r} does not exist")
    model, sections, meta = load_model(path, backend=backend, use_ema=use_ema)
    if want is not None and model.kind != want:
        raise ValueError(f"{label} {path!r} holds a {model.name!r} model (kind {model.kind!r}); "
                         f"expected kind {want!r}")
    if model.kind == "eps":
        from .ddpm import schedule_from_meta
        from .prediction import as_eps, prediction_of
        try:
            schedule_from_meta(meta)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path!r} records a DDPM schedule that cannot be used "
                                  f"({meta.get('ddpm_schedule')!r}: {exc})") from None
        try:
            prediction_of(meta)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path!r}: {exc}") from None
        # the one place a diffusion checkpoint becomes what every sampler, the likelihood and
        # inpainting expect: an eps-model (an eps-network as it is; x0 and v through refdiff.prediction)
        model = as_eps(model, meta)
    shape = meta.get("image_shape")
    if shape is not None and not (isinstance(shape, list) and shape and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise CheckpointError(f"checkpoint {path!r} records an image_shape {shape!r} that is not a list of sizes")
    info = dict(checkpoint=os.path.abspath(path), model=model.name, kind=model.kind, epoch=meta.get("epoch"),
                ema=bool(use_ema and sections["ema"]))
    if model.kind == "eps":
        info["prediction"] = meta.get("prediction", "eps")
    return model, meta, info


def _solvers():
    from . import solvers
    return solvers


def generate(model, meta, n, rng, gif=False, frames=40, labels=None, guidance=None, **sampler_args):
    """n images from a loaded model. -> (x (n, 1, H, W) float32 clipped to [-1, 1], trajectory
    (frames, n, ...) or None, info). ValueError for a model that cannot generate images.

    labels (n,) ints: the class asked for each image (a class-conditional diffusion model),
    sampled with classifier-free guidance at scale `guidance` (default 1: the conditional model;
    refdiff.prediction.EpsModel). The sampler then runs once per chunk of `batch` images, each
    with its chunk's labels, on the same `rng`: the draws, hence the images, are those of one
    call over all n (every sampler draws chunk after chunk)."""
    if labels is None:
        if guidance is not None:
            raise ValueError(GUIDANCE_NEEDS_CLASS)
        return _generate(model, meta, n, rng, gif, frames, **sampler_args)
    from .prediction import as_eps

    if getattr(model, "kind", None) != "eps":
        raise ValueError(f"--class needs a class-conditional diffusion model; the checkpoint holds a "
                         f"{model.name!r} model (kind {model.kind!r})")
    labels = np.asarray(labels)
    if labels.shape != (int(n),):
        raise ValueError(f"labels must have shape ({n},), one class per image; got {labels.shape}")
    as_eps(model, meta, labels, guidance)                 # bad labels or guidance: refused before any work
    batch = int(sampler_args.get("batch") or 256)
    xs, trajs, info, nfe = [], [], {}, 0
    for start in range(0, int(n), batch):
        part = labels[start:start + batch]
        x, traj, info = _generate(as_eps(model, meta, part, guidance), meta, len(part), rng, gif, frames,
                                  **sampler_args)
        xs.append(x)
        trajs.append(traj)
        nfe = max(nfe, info.get("nfe", 0))
    traj = np.concatenate(trajs, axis=1) if gif else None
    info = dict(info, guidance=1.0 if guidance is None else float(guidance), **({"nfe": nfe} if nfe else {}))
    return np.concatenate(xs), traj, info


def _generate(model, meta, n, rng, gif=False, frames=40, **sampler_args):
    shape = tuple((meta or {}).get("image_shape") or (1, 28, 28))
    per_image = 8 * int(np.prod(shape)) * (2 + (frames if gif else 0))      # float64 result, float32 copy, frames
    io.require_memory(int(n) * per_image, f"{n} images of {shape}")
    traj = None
    if sampler_args.get("sampler") in _solvers().CHECKPOINT_SAMPLERS:        # refuses a model that is not eps
        if gif:
            raise ValueError(f"--gif shows the denoising chain of the ddpm, ddim and em samplers; "
                             f"{sampler_args['sampler']!r} keeps no trajectory")
        x, nfe = _solvers().sample_from_checkpoint(model, meta, n, rng, **sampler_args)
        info = dict(sampler_args, nfe=nfe)
    elif model.kind == "eps":
        from . import ddpm
        out = ddpm.sample_from_checkpoint(model, meta, n, rng, return_trajectory=gif, frames=frames,
                                          **sampler_args)
        x, traj = out if gif else (out, None)
        info = dict(sampler=sampler_args.get("sampler", "ddpm"), **{k: v for k, v in sampler_args.items()
                                                                   if k != "sampler"})
    elif callable(getattr(model, "sample", None)):
        if gif:
            raise ValueError(f"--gif shows a denoising chain; a {model.kind!r} model has none")
        x, info = model.ops.to_numpy(model.sample(n, rng)), {}
    else:
        raise ValueError(f"the checkpoint holds a {model.name!r} model, which cannot generate images")
    return np.clip(np.asarray(x, dtype=np.float32), -1, 1), traj, info


def sample_to_dir(cfg, out_dir, log=None, inpaint_mask=None, inpaint_from=None):
    """Draw cfg.n images and write them into `out_dir` (module docstring); -> info dict. With
    inpaint_mask and inpaint_from (.npy paths: a 0/1 mask of one image's shape or of the
    images', and images in [-1, 1]) the first cfg.n images of inpaint_from are completed
    instead (refdiff.inpaint.inpaint_from_checkpoint; sampler "em" or "heun-sde")."""
    from .figures import save_gif, save_grid

    from .distributed import get_comm, launched_by_mpi, on_root, sample_split

    from .prediction import class_labels

    cfg.validate()
    if (inpaint_mask is None) != (inpaint_from is None):
        raise ValueError("--inpaint MASK.npy and --from IMAGES.npy go together")
    if inpaint_mask is not None:
        if cfg.classes is not None or cfg.guidance is not None:
            raise ValueError("--class and --guidance draw new images of a class; --inpaint completes given "
                             "images with the unconditional model")
        if cfg.gif:
            raise ValueError("--gif shows the denoising chain of the ddpm, ddim and em samplers; "
                             "inpainting keeps no trajectory")
        return _inpaint_to_dir(cfg, out_dir, log, inpaint_mask, inpaint_from)
    split = launched_by_mpi()       # under mpirun: per-image streams, the same images for any number of ranks
    if split and cfg.gif:
        raise ValueError("--gif shows one chain drawn in one process: run `refdiff sample --gif` without mpirun")
    comm = get_comm() if split else None
    with (on_root(io.output_run(out_dir, log=log), comm, out_dir) if split else io.output_run(out_dir, log=log)) as out:
        model, meta, info = load_generator(cfg.checkpoint, use_ema=cfg.use_ema, backend=cfg.backend)
        info.update(n=cfg.n, seed=cfg.seed)
        labels = None if cfg.classes is None else class_labels(cfg.classes, cfg.n)
        cond = dict(labels=labels, guidance=cfg.guidance)
        t0 = time.perf_counter()
        if split:           # rank r draws its share of the images, rank 0 gathers and writes them
            # in chunks of the sampler's batch: each chunk is one sampler call with one stream per image
            x = sample_split(comm, _split_draw(model, meta, cfg, labels, comm), cfg.n, cfg.seed,
                             batch=cfg.sampler_args.get("batch"))
            traj, extra = None, dict(cfg.sampler_args, ranks=comm.size, streams="per image: default_rng([seed, k])")
        else:
            x, traj, extra = generate(model, meta, cfg.n, np.random.default_rng(cfg.seed), gif=cfg.gif,
                                      frames=cfg.frames, **cond, **cfg.sampler_args)
        if labels is not None:
            extra = dict(extra, classes=[int(c) for c in cfg.classes],
                         guidance=1.0 if cfg.guidance is None else float(cfg.guidance))
        info.update(extra, sample_seconds=time.perf_counter() - t0)
        if split and not comm.is_root:
            return info
        io.save_npy(os.path.join(out, "samples.npy"), x)
        if labels is not None:          # the class asked for each image, for refdiff evaluate's per-class scores
            io.save_npy(os.path.join(out, "labels.npy"), labels.astype(np.int64))
        elif os.path.lexists(os.path.join(out, "labels.npy")):     # an earlier run's: not these images' classes
            os.remove(os.path.join(out, "labels.npy"))
        save_grid(os.path.join(out, "grid.png"), x)
        if traj is not None:
            save_gif(os.path.join(out, "denoise.gif"), traj)
        io.write_json(os.path.join(out, "sample.json"), dict(info, config=dataclasses.asdict(cfg)))
    return info


def _split_draw(model, meta, cfg, labels, comm):
    """sample_split's `draw(count, rng)` for this rank: its chunks come in order over its images
    [lo, hi) (refdiff.distributed.sample_split), so a running offset gives each chunk its labels."""
    from .distributed import share_bounds

    offset = [share_bounds(cfg.n, comm.rank, comm.size)[0]]

    def draw(k, rng):
        part = None if labels is None else labels[offset[0]:offset[0] + k]
        offset[0] += k
        return generate(model, meta, k, rng, labels=part, guidance=cfg.guidance, **cfg.sampler_args)[0]
    return draw


def _inpaint_to_dir(cfg, out_dir, log, inpaint_mask, inpaint_from):
    """sample_to_dir's inpainting: one process (under mpirun it is refused)."""
    from .distributed import launched_by_mpi
    from .figures import save_grid
    from .inpaint import inpaint_from_checkpoint

    if launched_by_mpi():
        raise ValueError("--inpaint runs in one process: run it without mpirun")
    args = dict(cfg.sampler_args)
    sampler = args.get("sampler", "em")
    if sampler not in ("em", "heun-sde"):
        raise ValueError(f"--inpaint runs the reverse SDE: use --sampler em or heun-sde; got {sampler!r}")
    with io.output_run(out_dir, log=log) as out:
        model, meta, info = load_generator(cfg.checkpoint, want="eps", use_ema=cfg.use_ema, backend=cfg.backend)
        rng, t0 = np.random.default_rng(cfg.seed), time.perf_counter()
        images, mask = (_load_npy(p, flag) for p, flag in ((inpaint_from, "--from"), (inpaint_mask, "--inpaint")))
        if cfg.n > len(images):
            raise ValueError(f"--n {cfg.n} is more than the {len(images)} images in --from {inpaint_from!r}")
        if mask.shape == images.shape:
            mask = mask[:cfg.n]
        x = inpaint_from_checkpoint(model, meta, images[:cfg.n], mask, rng, steps=args.get("steps") or 1000,
                                    step="em" if sampler == "em" else "heun", batch=args.get("batch", 256),
                                    resample=args.get("resample", 1), jump=args.get("jump", 1))
        x = np.clip(np.asarray(x, dtype=np.float32), -1, 1)
        info.update(inpaint=os.path.abspath(inpaint_mask), source=os.path.abspath(inpaint_from), sampler=sampler,
                    n=cfg.n, seed=cfg.seed, sample_seconds=time.perf_counter() - t0)
        io.save_npy(os.path.join(out, "samples.npy"), x)
        save_grid(os.path.join(out, "grid.png"), x)
        io.write_json(os.path.join(out, "sample.json"), dict(info, config=dataclasses.asdict(cfg)))
    return info


def _load_npy(path, flag):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{flag} {path!r} is not a .npy array file ({exc})") from None
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{flag} {path!r} must hold one array, not an .npz archive")
    return a
