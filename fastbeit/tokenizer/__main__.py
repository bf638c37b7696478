"""Look at what a tokenizer does to your images: ids and reconstructions.

    python -m fastbeit.tokenizer photo.jpg [more.jpg ...] [--tokenizer PATH] [--output recon.png]

Training lives in ``python -m fastbeit.tokenizer.train``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch
from torchvision.utils import save_image

from fastbeit.data.folder import load_rgb
from fastbeit.data.transforms import unmap_pixels
from fastbeit.errors import UserError, cli_entry
from fastbeit.tokenizer.dvae import load_tokenizer
from fastbeit.tokenizer.train import EvalTransform


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Encode the images (centre crop at the tokenizer's size); print ids; save a comparison PNG."""
    p = argparse.ArgumentParser(prog="python -m fastbeit.tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--tokenizer", default=None, help="default: the shipped tokenizer")
    p.add_argument("--output", default="tokenizer_recon.png", help="originals over reconstructions")
    a = p.parse_args(argv)
    model = load_tokenizer(a.tokenizer)
    transform = EvalTransform(model.config.image_size)
    xs = []
    for name in a.images:
        try:
            xs.append(transform(load_rgb(name)))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read image {name}: {exc}") from None
    x = torch.stack(xs)
    ids = model.encode(x)
    for name, grid in zip(a.images, ids):
        print(f"{name}: {tuple(grid.shape)} ids, {grid.unique().numel()} distinct")
        print(f"  first row: {grid[0].tolist()}")
    if model.decoder is not None:
        save_image(torch.cat([unmap_pixels(x), model.decode(ids)]), a.output, nrow=len(xs), padding=2)
        print(f"wrote {Path(a.output)}")
    return ids


if __name__ == "__main__":
    main()
