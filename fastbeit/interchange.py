"""Convert BEiT checkpoints between fastbeit, the original unilm code, timm and Hugging Face.

Our key names are the original unilm ones, so unilm checkpoints (pre-training: shared table,
``mask_token``, ``lm_head``; fine-tuned: per-layer tables, ``fc_norm``, ``head``) load as they
are. timm's ``Beit`` uses the same names but does not store the ``relative_position_index``
buffers. Hugging Face's ``BeitForMaskedImageModeling`` / ``BeitForImageClassification`` split
``qkv`` into ``query``/``key``/``value``, call LayerScale ``lambda_1``/``lambda_2`` and put the
modules under ``beit.embeddings`` / ``beit.encoder.layer.{i}``.

    sd = load_any("model.safetensors").state_dict   # any format → our names (says which it found)
    torch.save(to_timm(sd), "for_timm.pt")           # timm.create_model("beit_base_patch16_224", ...)

    python -m fastbeit.interchange runs/base/checkpoint.pt beit_timm.safetensors --to timm
    python -m fastbeit.interchange runs/base/checkpoint.pt beit_hf --to hf   # a from_pretrained folder

The head count and depth are never guessed: they come from a relative position table, a config
(fastbeit's, a Hugging Face ``config.json``, or the ``fastbeit_config`` metadata this module writes
into every file it makes) or ``--num_heads``. Missing encoder weights are an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from fastbeit.config import BeitConfig
from fastbeit.errors import UserError, cli_entry
from fastbeit.hf_config import config_to_hf, hf_to_config
from fastbeit.layers import relative_position_index
from fastbeit.validate import check_output_file
from fastbeit.weights_check import check_complete, check_encoder

FORMATS = ("fastbeit", "unilm", "timm", "hf")
META_KEY = "fastbeit_config"  # our BeitConfig fields, in safetensors metadata or beside a unilm "model"
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.weight$")
INDEX_SUFFIX = "relative_position_index"
TABLE_SUFFIX = "relative_position_bias_table"

# (our name, Hugging Face name); "{i}" is the block number.
HF_BLOCK_KEYS: List[Tuple[str, str]] = [
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("attn.proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
]
HF_BLOCK_PARAMS: List[Tuple[str, str]] = [
    ("gamma_1", "lambda_1"),
    ("gamma_2", "lambda_2"),
    ("attn.q_bias", "attention.attention.query.bias"),
    ("attn.v_bias", "attention.attention.value.bias"),
    ("attn.relative_position_bias_table", "attention.attention.relative_position_bias.relative_position_bias_table"),
]
HF_TOP_KEYS: List[Tuple[str, str]] = [
    ("cls_token", "beit.embeddings.cls_token"),
    ("mask_token", "beit.embeddings.mask_token"),
    ("pos_embed", "beit.embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "beit.embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "beit.embeddings.patch_embeddings.projection.bias"),
    ("rel_pos_bias.relative_position_bias_table", "beit.encoder.relative_position_bias.relative_position_bias_table"),
    ("fc_norm.weight", "beit.pooler.layernorm.weight"),
    ("fc_norm.bias", "beit.pooler.layernorm.bias"),
    ("head.weight", "classifier.weight"),
    ("head.bias", "classifier.bias"),
    ("lm_head.weight", "lm_head.weight"),
    ("lm_head.bias", "lm_head.bias"),
]


def _block_maps() -> Tuple[List[Tuple[re.Pattern, str]], List[Tuple[re.Pattern, str]]]:
    """Regex → template pairs for both directions of the per-block names."""
    pairs = [(f"{a}.{p}", f"{b}.{p}") for a, b in HF_BLOCK_KEYS for p in ("weight", "bias")] + HF_BLOCK_PARAMS
    to_hf = [(re.compile(rf"^blocks\.(\d+)\.{re.escape(a)}$"), f"beit.encoder.layer.{{}}.{b}") for a, b in pairs]
    from_hf = [(re.compile(rf"^beit\.encoder\.layer\.(\d+)\.{re.escape(b)}$"), f"blocks.{{}}.{a}") for a, b in pairs]
    return to_hf, from_hf


BLOCKS_TO_HF, BLOCKS_FROM_HF = _block_maps()


def _strip(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def add_index_buffers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Add the ``relative_position_index`` buffer beside every table (timm and HF do not store it)."""
    from fastbeit.classifier import table_grid

    out = dict(state)
    for key, table in state.items():
        if key.endswith(TABLE_SUFFIX):
            out[key[: -len(TABLE_SUFFIX)] + INDEX_SUFFIX] = relative_position_index(table_grid(table.shape[0]))
    return out


def _drop_index(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(INDEX_SUFFIX)}


# ---------------------------------------------------------------------------------------------
# unilm and timm


def from_unilm(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """An original BEiT checkpoint (``{"model": ...}``, ``{"module": ...}`` or flat; DDP ``module.``
    prefixes allowed) → our names, which are the same; missing index buffers are added."""
    state = checkpoint
    for key in ("model", "module", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = _strip(dict(state), "module.")
    return add_index_buffers(_drop_index(state))


def to_timm(state: Dict[str, torch.Tensor], per_layer_rel_pos: bool = True) -> Dict[str, torch.Tensor]:
    """Ours → timm ``Beit``. A classifier converts as it is (without the index buffers).

    A pre-training state dict becomes a fine-tuning starting point, as the original fine-tuning
    code does: ``mask_token``, ``lm_head`` and the final ``norm`` are dropped and (with
    ``per_layer_rel_pos``) the shared table is copied into every block, for timm's ``beit_*``
    models; load it with ``strict=False`` (``fc_norm`` and ``head`` stay at timm's init).
    """
    out = _drop_index(state)
    if "lm_head.weight" in out or "mask_token" in out:
        out = {k: v for k, v in out.items() if not k.startswith(("mask_token", "lm_head.", "norm."))}
        shared = "rel_pos_bias." + TABLE_SUFFIX
        if per_layer_rel_pos and shared in out:
            table = out.pop(shared)
            depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
            for i in range(depth):
                out[f"blocks.{i}.attn.{TABLE_SUFFIX}"] = table.clone()
    return out


def from_timm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm ``Beit`` → ours: the same names plus the index buffers."""
    state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
    return add_index_buffers(_strip(dict(state), "module."))


# ---------------------------------------------------------------------------------------------
# Hugging Face


def to_hf(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Ours → Hugging Face ``BeitForMaskedImageModeling`` (when ``lm_head`` is present) or
    ``BeitForImageClassification``. The index buffers are left out (HF ignores them on load)."""
    is_mim = "lm_head.weight" in state
    top = dict(HF_TOP_KEYS)
    top["norm.weight"] = "layernorm.weight" if is_mim else "beit.layernorm.weight"
    top["norm.bias"] = "layernorm.bias" if is_mim else "beit.layernorm.bias"
    out: Dict[str, torch.Tensor] = {}
    for key, value in _drop_index(state).items():
        if key in top:
            out[top[key]] = value
            continue
        qkv = QKV.match(key)
        if qkv:
            prefix = f"beit.encoder.layer.{qkv.group(1)}.attention.attention"
            q, k, v = (part.clone() for part in value.chunk(3, dim=0))
            out[f"{prefix}.query.weight"], out[f"{prefix}.key.weight"], out[f"{prefix}.value.weight"] = q, k, v
            if f"blocks.{qkv.group(1)}.attn.q_bias" not in state:  # HF's query/value always have a bias
                out[f"{prefix}.query.bias"] = q.new_zeros(q.shape[0])
                out[f"{prefix}.value.bias"] = v.new_zeros(v.shape[0])
            continue
        out[_rename(key, BLOCKS_TO_HF, "Hugging Face")] = value
    return out


def from_hf(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face ``BeitForMaskedImageModeling`` / ``BeitForImageClassification`` → ours."""
    top = {hf: ours for ours, hf in HF_TOP_KEYS}
    top.update({"layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
                "beit.layernorm.weight": "norm.weight", "beit.layernorm.bias": "norm.bias"})
    out: Dict[str, torch.Tensor] = {}
    split: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith(INDEX_SUFFIX):
            continue
        match = re.match(r"^beit\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight$", key)
        if match:
            split.setdefault(match.group(1), {})[match.group(2)] = value
            continue
        new = top[key] if key in top else _rename(key, BLOCKS_FROM_HF, "fastbeit")
        if new in out:
            raise UserError(f"two Hugging Face keys map to {new} (e.g. {key}); this layout is not supported")
        out[new] = value
    for i, parts in split.items():
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"layer {i} lacks one of query/key/value weights")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat((parts["query"], parts["key"], parts["value"]), dim=0)
    return add_index_buffers(out)


def _rename(key: str, table: List[Tuple[re.Pattern, str]], target: str) -> str:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.format(match.group(1))
    raise UserError(f"no {target} name for the key {key!r}")


# ---------------------------------------------------------------------------------------------
# Reading any file


@dataclass
class LoadedCheckpoint:
    """A checkpoint in our key names, with what was found out about it."""

    path: str
    format: str  # one of FORMATS
    state_dict: Dict[str, torch.Tensor]
    config: Dict[str, Any]  # BeitConfig fields, stored (fastbeit) or inferred from the shapes
    kind: str  # "pretrain" (has lm_head / mask_token), "classifier" (has head) or "encoder"
    num_classes: Optional[int] = None
    use_mean_pooling: Optional[bool] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        c = self.config
        what = {"pretrain": "pre-training", "classifier": f"classifier ({self.num_classes} classes)",
                "encoder": "encoder"}[self.kind]
        return (f"{self.path}: {self.format} {what} checkpoint, width {c['embed_dim']}, depth {c['depth']}, "
                f"{c['num_heads']} heads, patch {c['patch_size']}, {c['img_size']} px")


def one_line(text: str, limit: int = 200) -> str:
    """The first non-empty line of an error text, without terminal colour codes, at most ``limit`` long."""
    lines = [line.strip() for line in ANSI.sub("", text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _unpickling_error(path: Path, exc: Exception) -> UserError:
    """One line for torch's multi-line weights-only refusal: what the file holds, and what to do."""
    text = ANSI.sub("", str(exc))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found is None:
        return UserError(f"{path} is not a readable checkpoint (neither a torch file of weights nor safetensors)")
    if "dall_e" in found.group(1):
        return UserError(f"{path} is DALL-E's pickled tokenizer ({found.group(1)}), not BEiT weights (pre-training "
                         "takes it as --tokenizer)")
    return UserError(f"{path} pickles Python objects ({found.group(1)}), not only weights; fastbeit never runs a "
                     "file's code: re-save its state_dict")


def read_file(path: str | Path) -> Any:
    """Load a ``.safetensors`` file or a torch pickle (weights only; the original code's
    ``argparse.Namespace`` args are allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise _unpickling_error(path, exc) from None
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {one_line(str(exc))})") from None


def read_metadata(path: Path) -> Dict[str, Any]:
    """The config this module stored in a ``.safetensors`` header (``{}`` when there is none)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(META_KEY)
    return json.loads(text) if text else {}


def read_hf_folder(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """A ``save_pretrained`` folder: its weights (one file or shards) and its ``config.json``."""
    config_file = path / HF_CONFIG
    if not config_file.is_file():
        raise UserError(f"{path} is a folder without {HF_CONFIG}: expected a Hugging Face save_pretrained folder")
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_file} is not readable JSON ({one_line(str(exc))})") from None
    if hf.get("model_type", "beit") != "beit":
        raise UserError(f"{path} holds a {hf['model_type']!r} model, not BEiT")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            state: Dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_file(path / shard))
            return state, hf
    for name in (HF_WEIGHTS, "pytorch_model.bin"):
        if (path / name).is_file():
            return read_file(path / name), hf
    raise UserError(f"{path} has {HF_CONFIG} but no {HF_WEIGHTS} or pytorch_model.bin")


def _tensors(obj: Any) -> Optional[Dict[str, torch.Tensor]]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def detect_format(obj: Any) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(format, state dict in that format's names) of a loaded file; :class:`UserError` if it holds no BEiT."""
    if not isinstance(obj, dict):
        raise UserError(f"expected a dict of weights, found a {type(obj).__name__}")
    if obj.get("kind") == "segmentation":
        raise UserError("it is a fastbeit segmentation checkpoint (UperNet on a BEiT backbone), not a BEiT "
                        "pre-training or classification one.")
    if isinstance(obj.get("config"), dict) and _tensors(obj.get("model")) is not None:
        return "fastbeit", obj["model"]
    wrapped = None
    for key in ("model", "module", "state_dict"):
        if _tensors(obj.get(key)) is not None:
            wrapped = obj[key]
            break
    state = wrapped if wrapped is not None else _tensors(obj)
    if state is None:
        raise UserError(f"no weights found (top-level keys: {sorted(obj)[:8]})")
    keys = list(_strip(state, "module."))
    if any(k.startswith("beit.") for k in keys):
        return "hf", state
    if any(k.startswith("embeddings.patch_embeddings.") for k in keys):  # a bare HF BeitModel
        return "hf", {"beit." + k: v for k, v in _strip(state, "module.").items()}
    if any(QKV.match(k) for k in keys) and "cls_token" in keys:
        has_index = any(k.endswith(INDEX_SUFFIX) for k in keys)
        return ("unilm" if wrapped is not None or has_index else "timm"), state
    hint = ""
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        hint = " It looks like a tokenizer (dVAE), not a BEiT model."
    raise UserError(f"these are not BEiT weights (keys like {keys[:3]}).{hint}")


def to_ours(fmt: str, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict in format ``fmt`` → our names."""
    if fmt == "hf":
        return from_hf(_strip(state, "module."))
    if fmt == "timm":
        return from_timm(state)
    return from_unilm(state)


def infer_config(state: Dict[str, torch.Tensor], known: Optional[Dict[str, Any]] = None,
                 num_heads: Optional[int] = None) -> Dict[str, Any]:
    """BeitConfig fields read off the tensor shapes (our names), overridden by ``known`` (a stored
    or Hugging Face config). The head count comes from a relative position table, ``known`` or
    else ``num_heads``; :class:`UserError` when none of them has it (it is never guessed)."""
    known = dict(known or {})
    try:
        dim = state["cls_token"].shape[-1]
        proj = state["patch_embed.proj.weight"]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise UserError(f"incomplete BEiT weights (missing {exc})") from None
    per_layer = state.get(f"blocks.0.attn.{TABLE_SUFFIX}")
    shared = state.get(f"rel_pos_bias.{TABLE_SUFFIX}")
    table = per_layer if per_layer is not None else shared
    from fastbeit.classifier import table_grid

    table_heads = table.shape[1] if table is not None else None
    if table_heads is not None and known.get("num_heads") not in (None, table_heads):
        raise UserError(f"the config says {known['num_heads']} attention heads, the relative position table has "
                        f"{table_heads}")
    heads = table_heads or known.get("num_heads") or num_heads
    if heads is None:
        raise UserError("the number of attention heads cannot be read off these weights (no relative position "
                        "table, no config): give it with --num_heads")
    if table is not None:
        side = table_grid(table.shape[0])[0]
    else:
        side = math.isqrt(state["pos_embed"].shape[1] - 1) if "pos_embed" in state else 224 // proj.shape[-1]
    inferred = dict(
        img_size=side * proj.shape[-1], patch_size=proj.shape[-1], in_chans=proj.shape[1], embed_dim=dim,
        depth=depth, num_heads=heads, mlp_ratio=hidden / dim, qkv_bias="blocks.0.attn.q_bias" in state,
        init_values=0.1 if "blocks.0.gamma_1" in state else None, use_abs_pos_emb="pos_embed" in state,
        use_rel_pos_bias=per_layer is not None, use_shared_rel_pos_bias=per_layer is None and shared is not None,
        vocab_size=state["lm_head.weight"].shape[0] if "lm_head.weight" in state else 8192,
    )
    fields = set(BeitConfig.__dataclass_fields__)
    return {**inferred, **{k: v for k, v in known.items() if k in fields}}


def _stored_config(obj: Any, path: Path, hf: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The config a file carries: a Hugging Face folder's, fastbeit's own, or our metadata."""
    if hf is not None:
        return hf_to_config(hf)
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        return obj["config"]
    if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict):
        return obj[META_KEY]
    return read_metadata(path) or None


def load_any(path: str | Path, num_heads: Optional[int] = None) -> LoadedCheckpoint:
    """Read a BEiT checkpoint in any supported format (a file, or a Hugging Face folder) into our
    names, and say what it is. ``num_heads`` is used only when the file records none."""
    path = Path(path)
    hf = None
    if path.is_dir():
        obj, hf = read_hf_folder(path)
    else:
        obj = read_file(path)
    try:
        fmt, raw = detect_format(obj)
    except UserError as exc:
        raise UserError(f"{path} is not a BEiT checkpoint: {exc} Expected a fastbeit checkpoint, a Hugging Face "
                        "folder or an original unilm, timm or Hugging Face BEiT state dict.") from None
    try:
        state = to_ours(fmt, raw)
        config = infer_config(state, _stored_config(obj, path, hf), num_heads)
        BeitConfig(**config)
        check_encoder(state, config)
    except (UserError, TypeError) as exc:
        raise UserError(f"{path}: {exc}") from None
    if "lm_head.weight" in state or "mask_token" in state:
        kind = "pretrain"
    elif "head.weight" in state:
        kind = "classifier"
    else:
        kind = "encoder"
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else None
    pooling = ("fc_norm.weight" in state) if kind == "classifier" else None
    meta = {k: obj[k] for k in ("classes", "epoch", "acc1") if isinstance(obj, dict) and k in obj}
    if hf is not None and kind == "classifier" and hf.get("id2label"):
        meta["classes"] = [hf["id2label"][k] for k in sorted(hf["id2label"], key=int)]
    return LoadedCheckpoint(str(path), fmt, state, config, kind, num_classes, pooling, meta)


# ---------------------------------------------------------------------------------------------
# Command line


def convert(loaded: LoadedCheckpoint, to: str) -> Dict[str, Any]:
    """What to write for format ``to``: a flat state dict (timm, hf) or a wrapped one (fastbeit, unilm)."""
    state = loaded.state_dict
    if to == "timm":
        return to_timm(state)
    if to == "hf":
        return to_hf(state)
    if to == "unilm":
        return {"model": state, META_KEY: loaded.config}
    out: Dict[str, Any] = {"model": state, "config": loaded.config}
    if loaded.kind == "classifier":
        out.update(num_classes=loaded.num_classes, use_mean_pooling=loaded.use_mean_pooling)
    return out


def save_safetensors(tensors: Dict[str, torch.Tensor], path: Path, config: Dict[str, Any]) -> None:
    """Weights with ``format: pt`` (what ``from_pretrained`` checks) and our config as metadata."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", META_KEY: json.dumps(config)})


def write_hf_folder(loaded: LoadedCheckpoint, folder: Path) -> None:
    """A ``save_pretrained``-style folder: ``config.json`` and ``model.safetensors``."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; --to hf writes a folder (config.json + {HF_WEIGHTS})")
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(to_hf(loaded.state_dict), folder / HF_WEIGHTS, loaded.config)
    (folder / HF_CONFIG).write_text(json.dumps(config_to_hf(loaded), indent=2) + "\n")


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbeit.interchange",
                                     description="Convert a BEiT checkpoint (any supported format) to another format.")
    parser.add_argument("input", help="fastbeit, unilm, timm or Hugging Face weights (.pt/.pth/.bin/.safetensors), "
                        "or a Hugging Face save_pretrained folder")
    parser.add_argument("output", help="--to hf: a folder for from_pretrained (config.json + model.safetensors), or a "
                        "weights-only .safetensors/.bin file; other formats: a file (.safetensors for timm)")
    parser.add_argument("--to", choices=FORMATS, required=True)
    parser.add_argument("--num_heads", "--num-heads", type=int, default=None,
                        help="attention heads, for weights that record none (no relative position table or config)")
    args = parser.parse_args(argv)
    check_output_file(args.output, "output", folder_ok=args.to == "hf")  # hf may be written as a folder
    out = Path(args.output)
    as_folder = args.to == "hf" and out.suffix not in WEIGHT_SUFFIXES
    if not as_folder and (out.is_dir() or args.output.endswith(("/", os.sep))):
        raise UserError(f"{out} is a folder; --to {args.to} writes one file: give a file name")
    if out.suffix == ".safetensors" and args.to not in ("timm", "hf"):
        raise UserError(f"--to {args.to} needs a torch file (.pt), not .safetensors: it stores more than weights")
    loaded = load_any(args.input, args.num_heads)
    check_complete(loaded)
    if as_folder:
        write_hf_folder(loaded, out)
        print(f"read {loaded.describe()}\nwrote a Hugging Face folder {out} ({HF_CONFIG} + {HF_WEIGHTS}): "
              f"transformers.{config_to_hf(loaded)['architectures'][0]}.from_pretrained('{out}')")
        return 0
    result = convert(loaded, args.to)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        config = loaded.config
        if args.to == "timm" and loaded.kind == "pretrain" and config["use_shared_rel_pos_bias"]:
            config = {**config, "use_rel_pos_bias": True, "use_shared_rel_pos_bias": False}  # see to_timm
        save_safetensors(result, out, config)
    else:
        from fastbeit.checkpoint import atomic_save

        atomic_save(result, out)
    note = " (weights only: give a folder for from_pretrained)" if args.to == "hf" else ""
    print(f"read {loaded.describe()}\nwrote {args.to} weights to {out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
