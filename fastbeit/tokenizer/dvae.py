"""The DALL-E discrete VAE (dVAE): the image tokenizer whose ids BEiT predicts.

Encoder: 7×7 input conv, four groups of residual blocks (widths ×1, ×2, ×4, ×8 of ``n_hid``)
with a 2×2 max-pool after the first three (8× down-sampling: 112 px → 14×14 ids), then ReLU and
a 1×1 conv to ``vocab_size`` logits. ids = argmax over the logits. The decoder mirrors it
(1×1 conv from the one-hot codes, groups ×8 … ×1 with nearest 2× up-sampling) and predicts, per
pixel channel, the location ``mu`` (logit of the ``map_pixels``'d value) and, for the
logit-Laplace loss, a log-scale: ``2·3`` output channels for ``logit-laplace`` (DALL-E's), 3
for ``mse`` (the training CLI's default: it is the metric BEiT reports, and it trained more
steadily in short CPU runs). Either way ``decode`` returns ``unmap_pixels(sigmoid(mu))`` in [0, 1].

Module names follow DALL-E's (``blocks.group_1.block_1.res_path.conv_1``) so released weights
map one to one (see :mod:`fastbeit.tokenizer.dalle`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fastbeit.data.transforms import unmap_pixels
from fastbeit.errors import UserError

LOSSES = ("logit-laplace", "mse")
GROUP_COUNT = 4
DOWNSAMPLE = 2 ** (GROUP_COUNT - 1)  # three 2× pools
LOG_SCALE_MIN = -6.0  # floor on the logit-Laplace log b: keeps 1/b finite when the fit gets tight


@dataclass
class DVAEConfig:
    """Architecture of a dVAE. DALL-E's released model: ``n_hid=256, n_blk_per_group=2``."""

    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    image_size: int = 112
    n_init: int = 128  # decoder width right after the code embedding (DALL-E: 128)
    loss: str = "logit-laplace"  # decides the decoder's output channels (6 or 3)
    decoder: bool = True  # False for an encoder-only tokenizer (e.g. DALL-E's encoder.pkl)
    input_channels: int = 3

    def __post_init__(self) -> None:
        if self.n_hid < 4 or self.n_hid % 4:
            raise UserError(f"n_hid must be a positive multiple of 4 (blocks narrow to n/4): {self.n_hid}")
        if self.n_blk_per_group < 1:
            raise UserError(f"n_blk_per_group must be >= 1, got {self.n_blk_per_group}")
        if self.vocab_size < 2:
            raise UserError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.image_size < DOWNSAMPLE or self.image_size % DOWNSAMPLE:
            raise UserError(f"image_size must be a multiple of {DOWNSAMPLE}, got {self.image_size}")
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.n_init < 1 or self.input_channels < 1:
            raise UserError("n_init and input_channels must be >= 1")

    @property
    def grid_size(self) -> int:
        """Side of the id grid: image_size / 8 (14 for 112 px)."""
        return self.image_size // DOWNSAMPLE

    @property
    def output_channels(self) -> int:
        """Decoder output channels: (mu, log b) per colour for logit-Laplace, mu only for MSE."""
        return 2 * self.input_channels if self.loss == "logit-laplace" else self.input_channels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DVAEConfig:
        """Build from JSON, rejecting unknown keys so a wrong file fails loudly."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown tokenizer config keys {unknown}")
        return cls(**data)


def conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """A 'same' conv with DALL-E's init (normal, std 1/sqrt(fan_in), zero bias)."""
    layer = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(layer.weight, std=1 / math.sqrt(n_in * kernel * kernel))
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """``id_path(x) + post_gain · res_path(x)``; the residual branch is a n_out/4 bottleneck.

    ``post_gain = 1 / n_layers²`` keeps the sum of many branches near identity at init.
    Encoder blocks use kernels (3, 3, 3, 1); decoder blocks (1, 3, 3, 3).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple = (3, 3, 3, 1)) -> None:
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, hid, hid, hid, n_out)
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", conv(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(n_in: int, n_out: int, cfg: DVAEConfig, kernels: tuple,
           resample: Optional[nn.Module]) -> nn.Sequential:
    n_layers = GROUP_COUNT * cfg.n_blk_per_group
    layers = [
        (f"block_{i + 1}", ResBlock(n_in if i == 0 else n_out, n_out, n_layers, kernels))
        for i in range(cfg.n_blk_per_group)
    ]
    if resample is not None:
        layers.append(("pool" if isinstance(resample, nn.MaxPool2d) else "upsample", resample))
    return nn.Sequential(OrderedDict(layers))


def _output(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", conv(n_in, n_out, 1))]))


class Encoder(nn.Module):
    """Image (``map_pixels``'d, [B, 3, S, S]) → logits [B, vocab, S/8, S/8]."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        w = [cfg.n_hid * m for m in (1, 2, 4, 8)]
        ks = (3, 3, 3, 1)
        self.blocks = nn.Sequential(OrderedDict([
            ("input", conv(cfg.input_channels, w[0], 7)),
            ("group_1", _group(w[0], w[0], cfg, ks, nn.MaxPool2d(2))),
            ("group_2", _group(w[0], w[1], cfg, ks, nn.MaxPool2d(2))),
            ("group_3", _group(w[1], w[2], cfg, ks, nn.MaxPool2d(2))),
            ("group_4", _group(w[2], w[3], cfg, ks, None)),
            ("output", _output(w[3], cfg.vocab_size)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def logits_last(self, x: torch.Tensor) -> torch.Tensor:
        """Same logits as ``forward`` but [B, h, w, vocab]: the vocab axis contiguous, so the
        softmaxes over 8192 codes in training read memory in order (faster on CPU)."""
        feats = torch.relu(self.blocks[:-1](x)).permute(0, 2, 3, 1)
        head = self.blocks.output.conv
        return F.linear(feats, head.weight.flatten(1), head.bias)


class Decoder(nn.Module):
    """Codes ([B, vocab, h, w], one-hot or relaxed) → [B, out_channels, 8h, 8w] (mu, log b)."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        w = [cfg.n_hid * m for m in (8, 4, 2, 1)]
        ks = (1, 3, 3, 3)
        up = lambda: nn.Upsample(scale_factor=2, mode="nearest")
        self.blocks = nn.Sequential(OrderedDict([
            ("input", conv(cfg.vocab_size, cfg.n_init, 1)),
            ("group_1", _group(cfg.n_init, w[0], cfg, ks, up())),
            ("group_2", _group(w[0], w[1], cfg, ks, up())),
            ("group_3", _group(w[1], w[2], cfg, ks, up())),
            ("group_4", _group(w[2], w[3], cfg, ks, None)),
            ("output", _output(w[3], cfg.output_channels)),
        ]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def forward_last(self, z: torch.Tensor) -> torch.Tensor:
        """``forward`` for codes laid out [B, h, w, vocab] (see ``Encoder.logits_last``)."""
        first = self.blocks.input
        h = F.linear(z, first.weight.flatten(1), first.bias)  # [B, h, w, n_init]
        return self.blocks[1:](h.permute(0, 3, 1, 2).contiguous())

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Same as ``forward(one_hot(ids))`` but the first 1×1 conv is a table look-up."""
        first = self.blocks.input
        table = first.weight.flatten(1).t()  # [vocab, n_init]
        h = F.embedding(ids, table) + first.bias  # [B, h, w, n_init]
        return self.blocks[1:](h.permute(0, 3, 1, 2).contiguous())


class GumbelNoisePool:
    """Recycled Gumbel(0, 1) noise for CPU training.

    On a CPU, drawing B·h·w·8192 fresh samples a step costs more than the convolutions. This
    pool hands out a random window of its ``[rows, vocab]`` table (a view: no copy; bf16 to halve
    the memory) and redraws ``refresh`` rows per call, so every value is a Gumbel(0, 1) draw and
    the whole table turns over every ``rows / refresh`` calls. On a GPU fresh noise is cheap.
    """

    def __init__(self, rows: int, vocab: int, refresh: Optional[int] = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> None:
        self.table = gumbel_noise(torch.empty(rows, vocab, device=device, dtype=dtype))
        self.refresh = max(1, refresh if refresh is not None else rows // 64)
        self.cursor = 0

    def sample(self, n_rows: int) -> torch.Tensor:
        """``[n_rows, vocab]`` noise; fresh noise when the pool is too small."""
        rows = self.table.shape[0]
        if n_rows > rows:
            return gumbel_noise(torch.empty(n_rows, self.table.shape[1], device=self.table.device))
        stop = min(rows, self.cursor + self.refresh)
        gumbel_noise(self.table[self.cursor:stop])
        self.cursor = 0 if stop == rows else stop
        start = int(torch.randint(0, rows - n_rows + 1, ()))
        return self.table[start:start + n_rows]


def gumbel_noise(out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` with Gumbel(0, 1) samples, -log(Exp(1)), in place."""
    return out.exponential_().log_().neg_()


def relax_and_kl(logits: torch.Tensor, noise: torch.Tensor, inv_tau: torch.Tensor):
    """Gumbel-softmax codes ``softmax((logits + noise) / τ)``, the mean of Σ q log q with
    q = softmax(logits), and the batch-mean q, over rows of [N, vocab].

    One function so ``torch.compile`` can fuse the ~10 passes over the [B·h·w, 8192] tensor
    (the costliest part of a CPU step after the convs); ``inv_tau`` is a 0-d tensor so a
    changing temperature does not recompile.
    """
    z = torch.softmax((logits + noise) * inv_tau, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    q = log_q.exp()
    neg_entropy = (q * log_q).sum(dim=-1).mean()
    return z, neg_entropy, q.mean(dim=0)


@dataclass
class DVAELosses:
    """One training step's numbers; ``loss`` is what to back-propagate."""

    loss: torch.Tensor
    recon: torch.Tensor  # reconstruction loss per pixel value (logit-Laplace NLL or MSE)
    kl: torch.Tensor  # KL(q(z|x) || uniform), nats per latent position
    usage_kl: torch.Tensor  # KL(batch-mean q || uniform), nats: high when few codes are favoured
    mse: torch.Tensor  # MSE on [0, 1] pixels of the relaxed reconstruction (monitoring only)
    codes: Optional[int]  # distinct argmax ids in the batch: an early warning of codebook collapse


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``x`` ∈ (0, 1) under the logit-Laplace density (DALL-E's reconstruction loss).

    p(x) = exp(-|logit x - mu| / b) / (2 b x (1 - x)); ``x`` comes through ``map_pixels`` so it
    stays inside [0.1, 0.9] and logit x is finite.
    """
    x = x.float()
    log_b = log_b.float().clamp(min=LOG_SCALE_MIN)
    logit_x = torch.log(x) - torch.log1p(-x)
    log_density_x = torch.log(x) + torch.log1p(-x)  # the change of variables from logit x to x
    nll = math.log(2) + log_b + (logit_x - mu.float()).abs() * torch.exp(-log_b) + log_density_x
    return nll.mean()


class DiscreteVAE(nn.Module):
    """Encoder + decoder; ``encode`` gives BEiT's target ids, ``forward`` trains the pair.

    ``encode``/``decode`` run without grad and accept bf16 autocast and channels_last inputs.
    """

    def __init__(self, config: Optional[DVAEConfig] = None, **overrides) -> None:
        super().__init__()
        config = config or DVAEConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config) if config.decoder else None
        self._relax = relax_and_kl

    def compile_relaxation(self) -> None:
        """Fuse the Gumbel-softmax + KL with ``torch.compile`` (≈2.5× on that part on a CPU)."""
        self._relax = torch.compile(relax_and_kl, dynamic=False)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _check_images(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.input_channels:
            raise ValueError(f"expected images [B, {self.config.input_channels}, H, W], got {tuple(x.shape)}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder logits [B, vocab, h, w] for a ``map_pixels``'d image batch."""
        self._check_images(x)
        return self.encoder(x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] (int64): argmax of the encoder logits. ``x`` is ``map_pixels``'d."""
        return self.logits(x).argmax(dim=1)

    def get_codebook_indices(self, x: torch.Tensor) -> torch.Tensor:
        """BEiT's name for :meth:`encode`."""
        return self.encode(x)

    def _decoder(self) -> Decoder:
        if self.decoder is None:
            raise UserError("this tokenizer has no decoder (encoder-only weights): it can encode, not decode")
        return self.decoder

    def _to_image(self, out: torch.Tensor) -> torch.Tensor:
        mu = out[:, : self.config.input_channels].float()
        return unmap_pixels(torch.sigmoid(mu))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, 8h, 8w] in [0, 1] (float32) from token ids [B, h, w]."""
        ids = ids.long()
        if ids.dim() != 3:
            raise ValueError(f"expected ids [B, h, w], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size})")
        return self._to_image(self._decoder().forward_ids(ids))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): the hard-code reconstruction the paper's error is measured on."""
        return self.decode(self.encode(x))

    def forward(self, x: torch.Tensor, temperature: float = 1.0, kl_weight: float = 0.0,
                diversity_weight: float = 0.0, sharpness: float = 0.25, hard: bool = False,
                noise_pool: Optional[GumbelNoisePool] = None, count_codes: bool = True) -> DVAELosses:
        """One relaxed training pass (Gumbel-softmax codes at ``temperature``).

        ``loss = recon + kl_weight · KL / (pixel values per latent) + diversity_weight · D``.
        The first two are the β-ELBO divided by the number of pixel values, so ``kl_weight`` is
        DALL-E's β (6.6 at the end of its schedule). ``D = sharpness · mean H(q) − H(mean q)``
        over the batch is not DALL-E's (at ``sharpness`` 1 it is minus the mutual information
        between a position and its code): a short run otherwise sends every position to the same
        few codes or, if only the batch-mean entropy is rewarded, flattens every q so that no
        information passes. D asks for sharp codes that differ across positions.
        ``count_codes=False`` skips the distinct-id count (a device sync on a GPU).
        """
        decoder = self._decoder()
        self._check_images(x)
        logits = self.encoder.logits_last(x).float()  # [B, h, w, vocab]
        flat = logits.flatten(0, -2)
        if noise_pool is None:
            noise = gumbel_noise(torch.empty_like(flat))
        else:
            noise = noise_pool.sample(flat.shape[0])
        inv_tau = torch.tensor(1.0 / temperature, device=flat.device)
        z, neg_entropy, mean_q = self._relax(flat, noise, inv_tau)
        if hard:  # straight-through: one-hot forward, relaxed gradient
            z = torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0) - z.detach() + z
        out = decoder.forward_last(z.view(logits.shape))
        kl = neg_entropy + math.log(self.vocab_size)
        usage_kl = (mean_q * torch.log(mean_q.clamp(min=1e-12))).sum() + math.log(self.vocab_size)
        n_ch = self.config.input_channels
        mu = out[:, :n_ch].float()
        target = x.float()
        if self.config.loss == "logit-laplace":
            recon = logit_laplace_nll(target, mu, out[:, n_ch:])
            mse = F.mse_loss(unmap_pixels(torch.sigmoid(mu.detach())), unmap_pixels(target))
        else:  # MSE on the [0, 1] scale: map_pixels is affine with slope 0.8
            recon = F.mse_loss(torch.sigmoid(mu), target) / 0.8**2
            mse = recon.detach()
        pixels_per_latent = x.shape[1] * DOWNSAMPLE**2
        diversity = usage_kl - sharpness * kl  # = sharpness·mean H(q) - H(mean q) + const
        loss = recon + kl_weight * kl / pixels_per_latent + diversity_weight * diversity
        codes = int(torch.unique(flat.detach().argmax(-1)).numel()) if count_codes else None
        return DVAELosses(loss=loss, recon=recon.detach(), kl=kl.detach(), usage_kl=usage_kl.detach(),
                          mse=mse, codes=codes)


# --- files: safetensors weights + a JSON config beside them (same stem) ---------------------

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_TOKENIZER = ASSETS_DIR / "tokenizer.safetensors"
FILE_FORMAT = "fastbeit-dvae"
FP16_MAX = 65504.0


def save_tokenizer(model: DiscreteVAE, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                   extra: Optional[dict] = None) -> Path:
    """Write ``path`` (.safetensors, float16 by default to keep it small) and ``path``.json.

    The config is also stored in the safetensors header, so the weights file alone suffices.
    Both files are written atomically (temporary file, then ``os.replace``).
    """
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if dtype == torch.float16 and any(bool(t.abs().max() > FP16_MAX) for t in tensors.values() if t.numel()):
        dtype = torch.float32  # a value would overflow: keep full precision rather than save infs
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    meta = {"format": FILE_FORMAT, "version": 1, "dtype": str(dtype).replace("torch.", ""),
            "config": model.config.to_dict(), **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"fastbeit": json.dumps(meta)})
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; a shipped or shared model should be readable
    os.replace(tmp, path)
    json_path = path.with_suffix(".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, json_path)
    return path


def _read_meta(weights: Path, header: dict) -> dict:
    json_path = weights.with_suffix(".json")
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{json_path} is not a readable tokenizer config: {exc}") from None
    elif "fastbeit" in header:
        meta = json.loads(header["fastbeit"])
    else:
        raise UserError(f"no tokenizer config for {weights}: expected {json_path} beside it")
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT or "config" not in meta:
        raise UserError(f"{json_path} is not a fastbeit tokenizer config (format {FILE_FORMAT!r})")
    return meta


def load_tokenizer(path: Optional[str | os.PathLike] = None,
                   device: str | torch.device = "cpu") -> DiscreteVAE:
    """A frozen tokenizer in eval mode (float32). ``None`` loads the shipped one.

    ``path`` may name the .safetensors file, its .json, or a DALL-E ``encoder.pkl`` (see
    :func:`fastbeit.tokenizer.dalle.load_dalle_encoder`; that unpickles the file you name).
    """
    if path is None:
        weights = DEFAULT_TOKENIZER
        if not weights.is_file():
            raise UserError(f"the shipped tokenizer {weights} is missing: reinstall or pass a tokenizer path")
    else:
        weights = Path(path)
        if weights.suffix == ".pkl":
            from fastbeit.tokenizer.dalle import load_dalle_encoder

            return load_dalle_encoder(weights, device=device)
        if weights.suffix == ".json":
            weights = weights.with_suffix(".safetensors")
        if not weights.is_file():
            raise UserError(f"tokenizer file {weights} not found")
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a malformed file
        raise UserError(f"{weights} is not a safetensors tokenizer file: {exc}") from None
    meta = _read_meta(weights, header)
    try:
        model = DiscreteVAE(DVAEConfig.from_dict(meta["config"]))
    except TypeError as exc:
        raise UserError(f"bad tokenizer config in {weights.with_suffix('.json')}: {exc}") from None
    try:
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"weights in {weights} do not fit its config: {' '.join(first[:3])}") from None
    return model.to(device).eval().requires_grad_(False)
