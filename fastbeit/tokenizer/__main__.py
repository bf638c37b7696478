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

from fastbeit.data.folder import read_image, shown
from fastbeit.data.transforms import unmap_pixels
from fastbeit.errors import cli_entry
from fastbeit.tokenizer.dvae import load_tokenizer
from fastbeit.tokenizer.train import EvalTransform
from fastbeit.validate import check_output_file


@cli_entry
def main(argv: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Encode the images (centre crop at the tokenizer's size); print ids; save a comparison PNG."""
    p = argparse.ArgumentParser(prog="python -m fastbeit.tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--tokenizer", default=None, help="default: the shipped tokenizer")
    p.add_argument("--output", default="tokenizer_recon.png", help="originals over reconstructions")
    a = p.parse_args(argv)
    check_output_file(a.output)
    images = [read_image(name) for name in a.images]  # every image readable before the model loads
    model = load_tokenizer(a.tokenizer)
    transform = EvalTransform(model.config.image_size)
    xs = [transform(img) for img in images]
    x = torch.stack(xs)
    ids = model.encode(x)
    for name, grid in zip(a.images, ids):
        print(f"{shown(name)}: {tuple(grid.shape)} ids, {grid.unique().numel()} distinct")
        print(f"  first row: {grid[0].tolist()}")
    if model.decoder is not None:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        save_image(torch.cat([unmap_pixels(x), model.decode(ids)]), a.output, nrow=len(xs), padding=2)
        print(f"wrote {Path(a.output)}")
    return ids


if __name__ == "__main__":
    main()
