"""The image tokenizer: a DALL-E dVAE whose encoder turns a 112 px image into 14×14 ids.

``load_tokenizer()`` gives the small tokenizer shipped in ``fastbeit/assets``; ``load_tokenizer(
"encoder.pkl")`` loads DALL-E's released encoder; ``python -m fastbeit.tokenizer.train`` trains
your own. ``build_tokenizer(path, device, precision)`` gives the frozen inference form pre-training
runs (:mod:`fastbeit.tokenizer.infer`).
"""

from fastbeit.tokenizer.dalle import load_dalle_encoder
from fastbeit.tokenizer.dvae import (
    DEFAULT_TOKENIZER,
    DiscreteVAE,
    DVAEConfig,
    DVAELosses,
    load_tokenizer,
    save_tokenizer,
)
from fastbeit.tokenizer.infer import PRECISIONS, InferenceTokenizer, build_tokenizer

__all__ = [
    "DEFAULT_TOKENIZER",
    "DiscreteVAE",
    "DVAEConfig",
    "DVAELosses",
    "InferenceTokenizer",
    "PRECISIONS",
    "build_tokenizer",
    "load_dalle_encoder",
    "load_tokenizer",
    "save_tokenizer",
]
