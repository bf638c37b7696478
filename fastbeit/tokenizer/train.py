"""Train a dVAE tokenizer on an image folder: DALL-E's recipe, scaled down.

    python -m fastbeit.tokenizer.train --data DIR --output runs/tok --n-hid 16 --max-minutes 30

Codes are Gumbel-softmax relaxed; the temperature decays exponentially from
``--temperature-start`` to ``--temperature-end`` over the first ``--anneal-fraction`` of
training, the KL weight rises (cosine) from ``--kl-weight-start`` to ``--kl-weight-end`` over
the first ``--kl-warmup`` of it, and the learning rate follows a warm-up + cosine. "Training"
is measured as ``max(step / total steps, elapsed / --max-minutes)``, so a wall-clock budget
still runs the whole schedule. Beyond DALL-E's β-ELBO, ``--diversity-weight`` adds
``s·mean H(q) − H(batch-mean q)`` (see ``DiscreteVAE.forward``): without it short runs collapse
onto a handful of codes (benchmarks/results/tokenizer_training.md). At the end the held-out
images give the reconstruction MSE of ``decode(encode(x))`` on [0, 1] pixels (hard ids, as the
BEiT paper reports it), the number of distinct codes used, a PNG of originals over
reconstructions, and the exported tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.utils import save_image
from tqdm import tqdm

from fastbeit.checkpoint import atomic_save, load_checkpoint
from fastbeit.cli import save_after_interrupt, save_checkpoint_or_warn, whole_step
from fastbeit.data.folder import ImageFolderDataset, ImageLoader
from fastbeit.data.transforms import map_pixels, sample_crop_box, unmap_pixels
from fastbeit.errors import UserError, cli_entry
from fastbeit.logging_utils import JsonlLogger
from fastbeit.rundir import claim_output
from fastbeit.tokenizer.dvae import LOSSES, DiscreteVAE, DVAEConfig, GumbelNoisePool, save_tokenizer
from fastbeit.validate import FlagChecks, check_output_dir, resolve_device

CHECKPOINT = "checkpoint.pt"
RESUME_KEYS = ("model", "optimizer", "config", "step", "epoch", "elapsed")
LOG = "log.jsonl"
OUTPUTS = (CHECKPOINT, LOG, "tokenizer.safetensors", "tokenizer.json", "metrics.json", "recon.png")


class TrainTransform:
    """Random crop (area ``scale``) + horizontal flip, resized (Lanczos, as BEiT's tokenizer
    view) to ``size`` and ``map_pixels``'d."""

    def __init__(self, size: int, scale: Tuple[float, float] = (0.35, 1.0)) -> None:
        self.size, self.scale = size, scale

    def __call__(self, img: Image.Image) -> torch.Tensor:
        top, left, h, w = sample_crop_box(img.width, img.height, self.scale)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.LANCZOS)
        if torch.rand(1).item() < 0.5:
            img = TF.hflip(img)
        return map_pixels(TF.to_tensor(img))


class EvalTransform:
    """Deterministic: shorter side to ``size`` then a centre crop, ``map_pixels``'d."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = TF.resize(img, self.size, InterpolationMode.LANCZOS)
        return map_pixels(TF.to_tensor(TF.center_crop(img, [self.size, self.size])))


def split_indices(n: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """A seeded (train, held-out) split of ``range(n)``; both sides non-empty."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise UserError(f"need at least 2 images (training + held-out), found {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


class Schedule:
    """Temperature, KL weight and learning rate as functions of training progress p ∈ [0, 1]."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args

    def temperature(self, p: float) -> float:
        a = self.a
        q = min(1.0, p / a.anneal_fraction) if a.anneal_fraction > 0 else 1.0
        return a.temperature_start * (a.temperature_end / a.temperature_start) ** q

    def kl_weight(self, p: float) -> float:
        a = self.a
        q = min(1.0, p / a.kl_warmup) if a.kl_warmup > 0 else 1.0
        return a.kl_weight_start + (a.kl_weight_end - a.kl_weight_start) * 0.5 * (1 - math.cos(math.pi * q))

    def lr(self, p: float) -> float:
        a = self.a
        if p < a.warmup:
            return a.lr * p / a.warmup
        q = min(1.0, (p - a.warmup) / max(1e-8, 1 - a.warmup))
        return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * q)))


@torch.no_grad()
def evaluate(model: DiscreteVAE, loader: DataLoader, device: torch.device) -> Dict[str, float]:
    """Held-out reconstruction MSE of decode(encode(x)) on [0, 1] pixels, and code usage."""
    was_training = model.training
    model.eval()
    sq_err, count, n_images = 0.0, 0, 0
    counts = torch.zeros(model.vocab_size, dtype=torch.long, device=device)
    for x in loader:
        x = x.to(device)
        ids = model.encode(x)
        recon = model.decode(ids)
        sq_err += float(((recon - unmap_pixels(x.float())) ** 2).sum())
        count += recon.numel()
        n_images += x.shape[0]
        counts += torch.bincount(ids.flatten(), minlength=model.vocab_size)
    model.train(was_training)
    probs = counts.double() / counts.sum().clamp(min=1)
    entropy = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
    return {
        "recon_mse": sq_err / max(1, count),
        "codes_used": int((counts > 0).sum()),
        "code_perplexity": math.exp(entropy),
        "vocab_size": model.vocab_size,
        "heldout_images": n_images,
    }


@torch.no_grad()
def save_recon_grid(model: DiscreteVAE, x: torch.Tensor, path: Path) -> None:
    """PNG: held-out originals (top row) over their decode(encode(x)) (bottom row)."""
    recon = model.decode(model.encode(x))
    save_image(torch.cat([unmap_pixels(x.float()), recon]).cpu(), str(path), nrow=x.shape[0], padding=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbeit.tokenizer.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="image folder (recursive)")
    p.add_argument("--output", required=True, help="folder for checkpoint, tokenizer, PNG, metrics")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock training budget")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=float, default=0.02, help="lr warm-up, fraction of training")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--n-hid", type=int, default=256)
    p.add_argument("--n-blk-per-group", type=int, default=2)
    p.add_argument("--n-init", type=int, default=128, help="decoder width after the code embedding")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--loss", choices=LOSSES, default="mse")
    p.add_argument("--temperature-start", type=float, default=1.0)
    p.add_argument("--temperature-end", type=float, default=1 / 16)
    p.add_argument("--anneal-fraction", type=float, default=0.7, help="temperature reaches its end here")
    p.add_argument("--kl-weight-start", type=float, default=0.0)
    p.add_argument("--kl-weight-end", type=float, default=0.1, help="β of the β-ELBO (DALL-E: 6.6)")
    p.add_argument("--kl-warmup", type=float, default=0.1, help="KL weight reaches its end here")
    p.add_argument("--diversity-weight", type=float, default=0.2,
                   help="weight of s·mean H(q) - H(batch-mean q), against codebook collapse (0: DALL-E)")
    p.add_argument("--sharpness", type=float, default=0.25, help="s in --diversity-weight's term")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.35, 1.0))
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of the images")
    p.add_argument("--grid-images", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", choices=("none", "bf16"), default=None, help="default: bf16 on cuda, none on cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the Gumbel-softmax + KL")
    p.add_argument("--noise-pool", choices=("auto", "on", "off"), default="auto",
                   help="recycle Gumbel noise from a pool (auto: on for cpu, where fresh noise is slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (default: OUTPUT/checkpoint.pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the earlier run in --output and start afresh (without it, a folder that holds a "
                        "run is refused unless --resume continues it)")
    return p


def _check_args(a: argparse.Namespace) -> None:
    checks = FlagChecks(a, dashes=True)
    checks.positive("epochs", "batch_size", "max_minutes", "temperature_start", "temperature_end", "lr", "log_every",
                    "grid_images", "threads")
    checks.non_negative("num_workers", "weight_decay", "min_lr_ratio", "kl_weight_start", "kl_weight_end",
                        "anneal_fraction", "kl_warmup", "diversity_weight", "sharpness")
    checks.within("warmup", 0, 1, high_open=True)
    checks.within("crop_scale", 0, 1, low_open=True)
    a.device = resolve_device(a.device)
    check_output_dir(a.output)


def _loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int) -> ImageLoader:
    return ImageLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      drop_last=shuffle and len(dataset) >= batch_size, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def _resume_path(a: argparse.Namespace, out: Path) -> Optional[Path]:
    if a.resume is None:
        return None
    path = out / CHECKPOINT if a.resume == "auto" else Path(a.resume)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from at {path}")
    return path


@dataclass
class RunState:
    """What a checkpoint carries besides the weights: where training stands."""

    step: int = 0
    epoch: int = 0  # completed epochs (an interrupted epoch restarts on --resume)
    elapsed: float = 0.0  # training wall-clock seconds so far, data loading included


def build_data(a: argparse.Namespace) -> Tuple[DataLoader, DataLoader]:
    """Training (augmented) and held-out (centre crop) loaders over a seeded split."""
    train_set = ImageFolderDataset(a.data, TrainTransform(a.image_size, tuple(a.crop_scale)))
    val_set = ImageFolderDataset(a.data, EvalTransform(a.image_size), on_bad="drop")
    train_idx, val_idx = split_indices(len(train_set), a.val_fraction, a.seed)
    return (_loader(Subset(train_set, train_idx), a.batch_size, True, a.num_workers, a.seed),
            _loader(Subset(val_set, val_idx), a.batch_size, False, 0, a.seed))


def read_resume(path: Optional[Path]) -> Optional[Dict]:
    """The --resume checkpoint, checked to be one of this script's (one clear line if not)."""
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path} is not a tokenizer training checkpoint (no {', '.join(missing)})")
    try:
        DVAEConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError, UserError) as exc:
        raise UserError(f"--resume {path} has an unusable tokenizer config: {exc}") from None
    return ckpt


def build_model(a: argparse.Namespace, ckpt: Optional[Dict], device: torch.device):
    """Model, AdamW and run state: fresh, or restored from the --resume checkpoint."""
    config = DVAEConfig.from_dict(ckpt["config"]) if ckpt else DVAEConfig(
        n_hid=a.n_hid, n_blk_per_group=a.n_blk_per_group, vocab_size=a.vocab_size,
        image_size=a.image_size, n_init=a.n_init, loss=a.loss)
    model = DiscreteVAE(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=a.weight_decay)
    state = RunState()
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"--resume: the checkpoint's weights do not fit its config ({str(exc)[:200]})") from None
        state = RunState(ckpt["step"], ckpt["epoch"], ckpt["elapsed"])
        print(f"resumed: epoch {state.epoch}, step {state.step}, {state.elapsed / 60:.1f} min trained")
    return model, opt, state


def train(a: argparse.Namespace, model: DiscreteVAE, opt: torch.optim.Optimizer, state: RunState,
          loader: DataLoader, device: torch.device, amp: bool, out: Path) -> float:
    """The loop: schedule → relaxed forward → AdamW step; log, checkpoint each epoch and on Ctrl-C.

    Returns the final training progress in [0, 1].
    """
    sched = Schedule(a)
    total_steps = a.epochs * len(loader)
    budget = a.max_minutes * 60 if a.max_minutes else None
    pool = None
    if a.noise_pool == "on" or (a.noise_pool == "auto" and device.type == "cpu"):
        pool = GumbelNoisePool(2 * a.batch_size * model.config.grid_size**2, model.vocab_size, device=device)
    if a.compile:
        model.compile_relaxation()

    def progress() -> float:
        p = state.step / total_steps
        return min(1.0, max(p, state.elapsed / budget) if budget else p)

    def checkpoint() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "config": model.config.to_dict(), "step": state.step, "epoch": state.epoch,
                     "elapsed": state.elapsed, "args": vars(a)}, out / CHECKPOINT)

    model.train()
    JsonlLogger(out / LOG).keep_until(state.step)  # a resumed run logs its lost stretch again
    try:
        with open(out / LOG, "a") as log:
            while state.epoch < a.epochs and progress() < 1.0:
                bar = tqdm(loader, desc=f"epoch {state.epoch + 1}", dynamic_ncols=True, mininterval=2.0)
                tick, batches = time.perf_counter(), 0
                for x in bar:
                    batches += 1
                    p = progress()
                    tau, beta, lr = sched.temperature(p), sched.kl_weight(p), sched.lr(p)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    logging = (state.step + 1) % a.log_every == 0 or state.step == 0
                    with whole_step():
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                            losses = model(x.to(device, non_blocking=True), temperature=tau, kl_weight=beta,
                                           diversity_weight=a.diversity_weight, sharpness=a.sharpness,
                                           noise_pool=pool, count_codes=logging)
                        opt.zero_grad(set_to_none=True)
                        losses.loss.backward()
                        opt.step()
                        state.step += 1
                    now = time.perf_counter()
                    state.elapsed, tick = state.elapsed + now - tick, now
                    if logging:
                        row = {"step": state.step, "epoch": state.epoch,
                               "minutes": round(state.elapsed / 60, 3), "lr": lr, "temperature": tau,
                               "kl_weight": beta,
                               "loss": float(losses.loss.detach()), "recon": float(losses.recon),
                               "kl": float(losses.kl), "usage_kl": float(losses.usage_kl),
                               "mse": float(losses.mse), "batch_codes": losses.codes}
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        bar.set_postfix(loss=f"{row['loss']:.4f}", mse=f"{row['mse']:.4f}",
                                        kl=f"{row['kl']:.2f}", tau=f"{tau:.3f}", codes=losses.codes)
                    if progress() >= 1.0:
                        break
                state.epoch += batches == len(loader)  # a budget stop mid-epoch leaves it unfinished
                save_checkpoint_or_warn(checkpoint, final=state.epoch >= a.epochs or progress() >= 1.0)
    except KeyboardInterrupt:
        save_after_interrupt(checkpoint)
        print(f"\ninterrupted: checkpoint saved to {out / CHECKPOINT}; continue with --resume")
        raise SystemExit(130) from None
    return progress()


def finish(a: argparse.Namespace, model: DiscreteVAE, state: RunState, final_progress: float,
           train_loader: DataLoader, val_loader: DataLoader, device: torch.device, out: Path) -> Dict:
    """Held-out metrics, the reconstruction PNG, the exported tokenizer and metrics.json."""
    final_temperature = Schedule(a).temperature(final_progress)
    model.eval()
    metrics = evaluate(model, val_loader, device)
    metrics.update({"train_minutes": round(state.elapsed / 60, 2), "steps": state.step,
                    "epochs": round(state.step / len(train_loader), 2),
                    "images_seen": state.step * a.batch_size, "final_temperature": final_temperature,
                    "params": sum(p.numel() for p in model.parameters())})
    readable = (x for x in (val_loader.dataset[i] for i in range(len(val_loader.dataset))) if x is not None)
    grid = [x for _, x in zip(range(a.grid_images), readable)]
    if grid:
        save_recon_grid(model, torch.stack(grid).to(device), out / "recon.png")
    save_tokenizer(model, out / "tokenizer.safetensors", extra={"metrics": metrics})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"held-out reconstruction MSE {metrics['recon_mse']:.5f} on {metrics['heldout_images']} images; "
          f"codes used {metrics['codes_used']} / {metrics['vocab_size']} "
          f"(perplexity {metrics['code_perplexity']:.1f}); {metrics['train_minutes']:.1f} min, "
          f"{state.step} steps")
    print(f"wrote {out / 'tokenizer.safetensors'}, {out / 'recon.png'}, {out / 'metrics.json'}")
    return metrics


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Run training; returns the final metrics (also written to OUTPUT/metrics.json)."""
    a = build_parser().parse_args(argv)
    _check_args(a)
    with claim_output(a.output, OUTPUTS, a.resume is not None, a.overwrite) as out:
        return run(a, out)


def run(a: argparse.Namespace, out: Path) -> Dict[str, float]:
    """Set up from the parsed flags and train into the claimed folder ``out``."""
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    amp = (a.amp or ("bf16" if device.type == "cuda" else "none")) == "bf16"
    ckpt = read_resume(_resume_path(a, out))
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    train_loader, val_loader = build_data(a)
    model, opt, state = build_model(a, ckpt, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(train_loader.dataset)} training / {len(val_loader.dataset)} held-out images; dVAE "
          f"{n_params / 1e6:.2f} M params on {device}{' (bf16 autocast)' if amp else ''}")
    final_progress = train(a, model, opt, state, train_loader, device, amp, out)
    return finish(a, model, state, final_progress, train_loader, val_loader, device, out)


if __name__ == "__main__":
    main()
