"""Training objectives: one class per model kind, each the loss of its paper and the update
it drives. refdiff.train.Trainer picks one by `model.kind` from OBJECTIVES.

    eps         EpsObjective        noise prediction: Ho et al. 2020's simple loss on the DDPM
                                    chain (eq. 14), or a continuous loss of refdiff.losses
                                    (DSM, sliced score matching) on a VP SDE; Adam, EMA
    vae         VAEObjective        the negative ELBO (Kingma & Welling 2014, eq. 10); AdamW
    gan         GANObjective        Goodfellow et al. 2014, Alg. 1 (k = 1), non-saturating G loss
    classifier  ClassifierObjective cross-entropy with shift augmentation; Adam, EMA

An objective implements:

    __init__(model, config)   config: dict(TrainConfig); read the keys you use, None
                              meaning "your default"
    defaults                  dict; its "batch" is used when config["batch"] is None
    optimizers()              dict name -> refdiff.optim.Adam, the same objects every call
                              (saved as optim/<name>/..., restored on resume)
    step(x, y, rng)           one update on x (B, C, H, W), a backend array in the model's
                              dtype, and labels y (B,) int64 (host); every random draw from
                              `rng`; -> dict name -> float, with a "loss" entry
    ema (optional)            a refdiff.optim.EMA updated by step(); saved under ema/, and
                              what `refdiff sample` uses unless --no-ema
    state() / load_state(d)   (optional) any other arrays a resume needs

The models (refdiff.nn.vae, .gan, .classifier, .unet, .mlp) hold only parameters and the
forward/backward passes; the losses and their optimisers live here.
"""
from __future__ import annotations

import math

import numpy as np

from ._checks import check_real
from .ddpm import ddpm_loss, model_input_shape
from .nn.classifier import random_shift
from .optim import EMA, Adam, ParamSubset, clip_grad_norm, lr_factor
from .prediction import check_prediction, num_classes
from .sde import VP, DDPMSchedule

OBJECTIVES = {
    "eps": "EpsObjective",
    "vae": "VAEObjective",
    "gan": "GANObjective",
    "classifier": "ClassifierObjective",
}


def get_objective(kind):
    """The objective class registered for a model kind."""
    if kind not in OBJECTIVES:
        raise ValueError(f"no training objective for models of kind {kind!r}; known: {sorted(OBJECTIVES)}")
    return globals()[OBJECTIVES[kind]]


def lr_schedule(config):
    """The lr multiplier of refdiff.optim.lr_factor for a trainer config (its keys warmup,
    lr_schedule and total_steps, the run's epochs x batches per epoch), or None when the
    config asks for a constant lr without warm-up (Adam then uses lr itself)."""
    config = dict(config or {})
    warmup, kind, total = int(config.get("warmup") or 0), config.get("lr_schedule") or "constant", \
        config.get("total_steps")
    if warmup == 0 and kind == "constant":
        return None
    lr_factor(0, warmup, kind, total)          # a bad kind or total fails now, not at the first step
    return lambda k: lr_factor(k, warmup, kind, total)


def _known(config, defaults):
    """The keys of `config` this objective uses; anything else belongs to the trainer."""
    config = dict(config or {})
    return {k: config[k] for k in defaults if k in config and config[k] is not None}


class _Objective:
    """What the objectives share: `config` is `defaults` overridden by the keys of the given
    config that the objective knows (not None); `optimizers()` builds them on first use
    (`_make_optimizers`), so a resumed run can load their state before any step."""

    defaults = {}

    def __init__(self, model, config=None):
        self.model = model
        self.config = dict(self.defaults, **_known(config, self.defaults))
        self.lr_schedule = lr_schedule(config)
        self._opt = None

    def optimizers(self):
        if self._opt is None:
            self._opt = self._make_optimizers()
        return self._opt


# --- noise prediction (DDPM, score matching) -----------------------------------------------------------------
class EpsObjective(_Objective):
    """Diffusion networks. loss "ddpm": Ho et al.'s simple loss on the discrete chain
    (refdiff.ddpm.ddpm_loss, mean over pixels) for the prediction target `pred` (eps, x0 or v:
    refdiff.prediction), with the dataset's labels for a class-conditional network, dropped
    to the null label with probability `label_dropout`; any name in refdiff.losses.LOSSES
    ("dsm", "ssm", ...): that continuous loss on VP(beta_min, beta_max) (its own scale: a sum
    over pixels; eps target, unconditional). Adam (with the config's lr schedule), optional
    global-norm clipping, then the EMA update."""

    defaults = dict(lr=1e-4, batch=128, loss="ddpm", ema_decay=0.999, grad_clip=None, pred="eps", label_dropout=0.0)
    # True under data parallelism (refdiff.distributed.DataParallel): the norm to clip is the
    # global batch's, so the optimizer's wrapped step clips after averaging over ranks
    clip_after_reduce = False

    def __init__(self, model, config=None):
        from .losses import LOSSES

        config = dict(config or {})
        c = dict(self.defaults, **_known(config, self.defaults))
        if getattr(model, "kind", None) != "eps":
            raise ValueError(f"EpsObjective needs a noise-prediction model (kind 'eps'); got {model.kind!r}")
        if c["loss"] != "ddpm" and c["loss"] not in LOSSES:
            raise ValueError(f"loss must be 'ddpm' or one of {sorted(LOSSES)}; got {c['loss']!r}")
        check_prediction(c["pred"])
        c["label_dropout"] = check_real(c["label_dropout"], "label_dropout", lo=0, hi=1, hi_open=True)
        if c["label_dropout"] > 0 and not num_classes(model):
            raise ValueError(f"label_dropout = {c['label_dropout']} needs a class-conditional model (model_args "
                             f"num_classes K > 0); {model.name!r} is unconditional")
        if c["loss"] != "ddpm" and (c["pred"] != "eps" or num_classes(model)):
            raise ValueError(f"loss {c['loss']!r} trains an unconditional eps-model; pred {c['pred']!r} and "
                             f"class conditioning need loss 'ddpm'")
        self.model, self.config = model, c
        self.lr_schedule = lr_schedule(config)
        if c["loss"] != "ddpm" and getattr(model, "uses_dropout", False) and (model.config.get("dropout") or 0) > 0:
            raise ValueError(f"loss {c['loss']!r} calls the network without a dropout generator, so "
                             f"{model.name}'s dropout {model.config['dropout']} would be silently off: use "
                             f"--loss ddpm, or --model-arg dropout=0 with --loss {c['loss']}")
        self.loss_fn = None if c["loss"] == "ddpm" else LOSSES[c["loss"]]
        sched = {k: config[k] for k in ("num_steps", "beta_start", "beta_end") if config.get(k) is not None}
        self.schedule = DDPMSchedule(kind=config.get("schedule") or "linear", **sched)
        self.sde = VP(config.get("beta_min") or 0.1, config.get("beta_max") or 20.0)
        self.input_shape = model_input_shape(model)
        self.ema = EMA(model, decay=c["ema_decay"])
        self._opt = {"model": Adam(model, lr=c["lr"], lr_schedule=self.lr_schedule)}

    def step(self, x, y, rng):
        m = self.model
        x0 = np.asarray(m.ops.to_numpy(x)).reshape((x.shape[0],) + self.input_shape)
        m.zero_grad()
        if self.loss_fn is None:
            c = self.config
            loss = ddpm_loss(m, self.schedule, x0, rng, pred=c["pred"], y=y if num_classes(m) else None,
                             label_dropout=c["label_dropout"])
        else:
            loss = self.loss_fn(m, self.sde, x0, rng)
        if self.config["grad_clip"] is not None and math.isfinite(loss) and not self.clip_after_reduce:
            clip_grad_norm(m, self.config["grad_clip"])
        if math.isfinite(loss):               # a NaN loss is reported by the Trainer, no update
            self._opt["model"].step()
            self.ema.update()
        return {"loss": loss}


# --- VAE -----------------------------------------------------------------------------------------------------
class VAEObjective(_Objective):
    """Negative ELBO, BCE(sum) + KL(sum), AdamW(lr 1e-3, weight decay 0.01 = PyTorch's AdamW
    default), batch 128 (the report's code). Reported losses are per image."""

    defaults = dict(lr=1e-3, weight_decay=0.01, batch=128)

    def _make_optimizers(self):
        return {"vae": Adam(self.model, lr=self.config["lr"], weight_decay=self.config["weight_decay"],
                            lr_schedule=self.lr_schedule)}

    def loss_and_grad(self, x, eps):
        """-ELBO summed over the batch; leaves its gradient in model.grads (zeroed first).
        Returns (loss, bce, kl) as floats."""
        m, F = self.model, self.model.ops
        m.zero_grad()
        logits, u, mu, logvar = m.forward(x, eps)
        bce, c_bce = F.bce_with_logits_forward(logits, u, reduction="sum")
        kl, c_kl = F.gaussian_kl_forward(mu, logvar)
        dmu, dlogvar = F.gaussian_kl_backward(1.0, c_kl)
        m.backward(F.bce_with_logits_backward(1.0, c_bce), dmu, dlogvar)
        return bce + kl, bce, kl

    def step(self, x, y, rng):
        """One AdamW step on a batch x (B, 1, 28, 28); labels y are ignored."""
        m = self.model
        eps = m.ops.asarray(rng.standard_normal((x.shape[0], m.config["latent"])).astype(m.dtype))
        loss, bce, kl = self.loss_and_grad(x, eps)
        self.optimizers()["vae"].step()
        b = x.shape[0]
        return {"loss": loss / b, "bce": bce / b, "kl": kl / b}


# --- GAN -----------------------------------------------------------------------------------------------------
class GANObjective(_Objective):
    """Alternating updates, one D step then one G step per batch (Goodfellow et al. 2014,
    Alg. 1 with k = 1); Adam 2e-4, betas (0.5, 0.999), batch 128 (the report's code)."""

    defaults = dict(lr=2e-4, beta1=0.5, beta2=0.999, batch=128)

    def _make_optimizers(self):
        c = self.config
        betas = (c["beta1"], c["beta2"])
        return {"G": Adam(ParamSubset(self.model, "G."), lr=c["lr"], betas=betas, lr_schedule=self.lr_schedule),
                "D": Adam(ParamSubset(self.model, "D."), lr=c["lr"], betas=betas, lr_schedule=self.lr_schedule)}

    def d_loss_and_grad(self, x, z):
        """L_D on real x and fake G(z); its gradient w.r.t. D's parameters is left in
        model.grads (all grads zeroed first). Returns (L_D, mean D(x), mean D(G(z)))."""
        m, F = self.model, self.model.ops
        m.zero_grad()
        fake, _ = m.generate_forward(z)                      # held fixed: no G backward
        xp = F.xp
        losses, probs = [], []
        for batch, target in ((x, 1.0), (fake, 0.0)):
            logit, cache = m.discriminate_forward(batch)
            loss, c_bce = F.bce_with_logits_forward(logit, xp.full(logit.shape, target, dtype=logit.dtype), "mean")
            m.discriminate_backward(F.bce_with_logits_backward(1.0, c_bce), cache)
            losses.append(loss)
            probs.append(float(xp.mean(F.sigmoid_forward(logit)[0])))
        return losses[0] + losses[1], probs[0], probs[1]

    def g_loss_and_grad(self, z):
        """Non-saturating L_G = BCE(D(G(z)), 1); its gradient w.r.t. G's parameters is left
        in model.grads (all grads zeroed first; D's stay zero)."""
        m, F = self.model, self.model.ops
        m.zero_grad()
        fake, g_cache = m.generate_forward(z)
        logit, d_cache = m.discriminate_forward(fake)
        loss, c_bce = F.bce_with_logits_forward(logit, F.xp.ones(logit.shape, dtype=logit.dtype), "mean")
        dfake = m.discriminate_backward(F.bce_with_logits_backward(1.0, c_bce), d_cache, accumulate=False)
        m.generate_backward(dfake, g_cache)
        return loss

    def step(self, x, y, rng):
        """One D step then one G step, each on fresh z; labels y are ignored."""
        m, F = self.model, self.model.ops
        opt = self.optimizers()
        draw = lambda: F.asarray(rng.standard_normal((x.shape[0], m.config["z_dim"])).astype(m.dtype))
        d_loss, d_real, d_fake = self.d_loss_and_grad(x, draw())
        opt["D"].step()
        g_loss = self.g_loss_and_grad(draw())
        opt["G"].step()
        # "loss" (the trainer's progress line) is the sum; d_loss and g_loss are what to read
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss, "d_real": d_real, "d_fake": d_fake}


# --- the MNIST classifier ------------------------------------------------------------------------------------
class ClassifierObjective(_Objective):
    """Cross-entropy, Adam 1e-3, batch 64, 10 epochs (the report's code); `shift` > 0 adds
    random translations of up to that many pixels (0 = the report's plain training);
    `self.ema` averages the weights (`ema_decay`; 0 = the last weights)."""

    defaults = dict(lr=1e-3, batch=64, epochs=10, shift=2, ema_decay=0.999)

    def __init__(self, model, config=None):
        super().__init__(model, config)
        if int(self.config["shift"]) < 0 or int(self.config["shift"]) > 13:
            raise ValueError(f"classifier shift must be an integer in [0, 13]; got {self.config['shift']}")
        self.ema = EMA(model, decay=float(self.config["ema_decay"]))

    def _make_optimizers(self):
        return {"classifier": Adam(self.model, lr=self.config["lr"], lr_schedule=self.lr_schedule)}

    def loss_and_grad(self, x, y):
        """Mean cross-entropy of a batch; its gradient is left in model.grads (zeroed first).
        Returns (loss, accuracy on the batch)."""
        m, F = self.model, self.model.ops
        m.zero_grad()
        logits = m.forward(x)
        loss, cache = F.log_softmax_cross_entropy_forward(logits, y)
        m.backward(F.log_softmax_cross_entropy_backward(1.0, cache))
        acc = float(F.xp.mean(F.xp.argmax(logits, axis=1) == F.asarray(y)))
        return loss, acc

    def step(self, x, y, rng):
        if y is None:
            raise ValueError("the classifier objective needs labels")
        F = self.model.ops
        x = F.asarray(random_shift(F.to_numpy(x), rng, int(self.config["shift"])))
        loss, acc = self.loss_and_grad(x, y)
        self.optimizers()["classifier"].step()
        self.ema.update()
        return {"loss": loss, "acc": acc}
