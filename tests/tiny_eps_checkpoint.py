"""A real, tiny eps-model checkpoint for run-level tests of refdiff.solvers, likelihood and
inpaint: an MLP (width 8) trained one epoch on 16 MNIST images through `refdiff train` (as
tests/test_cli_errors.py), and a copy whose meta records a cosine DDPM chain (no VP limit)."""
import contextlib
import io


def make(root):
    """-> (linear-chain checkpoint path, cosine-chain checkpoint path) under `root`."""
    from refdiff import checkpoint
    from refdiff.cli import main
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--out", str(root / "run"), "--model", "mlp", "--model-arg", "widths=[8]",
                     "--limit", "16", "--epochs", "1"]) == 0
    path = str(root / "run" / "checkpoint.npz")
    arrays, meta = checkpoint.load(path)
    meta = {k: v for k, v in meta.items() if k not in ("format", "sha256")}
    meta["ddpm_schedule"] = dict(meta.get("ddpm_schedule") or {}, kind="cosine")
    cosine = str(root / "cosine.npz")
    checkpoint.save(cosine, arrays, meta)
    return path, cosine
