"""WebDataset tar shards: writing them from an image folder, and finding them again.

    python -m fastbeit.data.shard /data/imagenet22k/train /data/in22k --shard-size 1000 --prefix train

A shard is a plain tar of ``{key}.{ext}`` members, grouped by key: the image (``.jpg``; other
formats keep their own extension, ``.png`` / ``.webp`` / ``.bmp``, unless ``--reencode Q``
turns everything into JPEG at quality Q) and, when the source has class sub-folders, ``{key}.cls``
(the class index as ASCII). Every image is decoded once with PIL while writing: corrupt files are
skipped and counted. ``OUT/index.json`` lists the shards with their sample counts and byte
sizes plus the class list (written once), so a loader knows its epoch length without opening a
tar. Files are shuffled (seeded) before they are cut into shards, so a shard mixes classes.
Shards and the index are written to a temporary name and renamed.

Readers take ``--data`` as the index, a folder holding ``index.json``, or a pattern
(``/data/in22k/train-{000000..001023}.tar``, shell-style braces; ``*`` globs too).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import re
import sys
import tarfile
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image

from fastbeit.data.folder import ImageFolderDataset, find_images
from fastbeit.errors import UserError, cli_entry

INDEX_NAME = "index.json"
TAR_END = bytes(512)
INDEX_FORMAT = "fastbeit-webdataset"
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
PIL_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")

__all__ = ["ShardSet", "dali_index_name", "expand_pattern", "is_shard_source", "iter_shard", "resolve_shards",
           "write_shards"]


# ----------------------------------------------------------------------------- finding shards


def expand_pattern(pattern: str) -> List[str]:
    """Shell-style brace expansion: ``{000..012}`` (zero padding kept) and ``{a,b}``, left to right."""
    found = [(m.start(), m, expand) for regex, expand in ((BRACE_RANGE, _expand_range),
                                                          (BRACE_LIST, lambda m: m.group(1).split(",")))
             for m in [regex.search(pattern)] if m]
    if not found:
        return [pattern]
    _, match, expand = min(found, key=lambda f: f[0])
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for item in expand(match) for out in expand_pattern(head + item + tail)]


def _expand_range(match: re.Match) -> List[str]:
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
    step = 1 if int(hi) >= int(lo) else -1
    return [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]


def is_shard_source(data: Optional[str]) -> bool:
    """Whether ``--data`` names shards (an index, a folder with one, a ``.tar`` pattern) rather than images."""
    if data is None:
        return False
    if data.endswith(".json") or ".tar" in Path(data).name:
        return True
    return (Path(data) / INDEX_NAME).is_file()


@dataclass
class ShardSet:
    """The shards of a data set, with their sample counts (known without reading the images)."""

    paths: List[str]
    counts: List[int]
    classes: Optional[List[str]] = None
    source: str = ""
    sizes: List[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __len__(self) -> int:
        return self.total

    @property
    def files(self) -> List[Path]:
        """The shard files (what a cache of features depends on)."""
        return [Path(p) for p in self.paths]

    def require_labels(self) -> List[str]:
        """The class list; a clear error when the shards carry no ``.cls`` labels."""
        if not self.classes:
            raise UserError(f"the shards of {self.source} have no class list (needed here): they carry no .cls "
                            "labels, or no index.json beside them holds the list; write them from a folder with "
                            "class sub-folders (python -m fastbeit.data.shard SRC OUT)")
        return self.classes


def resolve_shards(data: str) -> ShardSet:
    """``--data`` (index, folder with ``index.json``, or pattern) → the shard list, checked against
    the index by file size only (no tar is opened when an index exists)."""
    if data.endswith(".json") or Path(data).is_dir():
        index = Path(data) if data.endswith(".json") else Path(data) / INDEX_NAME
        return _from_index(index, None, data)
    names = [p for item in expand_pattern(data) for p in (sorted(glob.glob(item)) if glob.has_magic(item) else [item])]
    found = [p for p in names if os.path.isfile(p)]
    if not found:
        raise UserError(f"no shard matches {data}" + (f" (the first expected is {names[0]})" if names else ""))
    if len(found) < len(names):
        present = set(found)
        missing = [p for p in names if p not in present]
        raise UserError(f"{len(missing)} of the {len(names)} shards of {data} are missing, e.g. {missing[0]}")
    index = Path(found[0]).parent / INDEX_NAME
    if index.is_file():
        return _from_index(index, found, data)
    warnings.warn(f"no {INDEX_NAME} beside {data}: counting samples by reading the tar headers "
                  f"(python -m fastbeit.data.shard --reindex '{data}' writes one)", stacklevel=2)
    return scan_shards(found, data)[0]


def _from_index(path: Path, only: Optional[List[str]], source: str) -> ShardSet:
    if not path.is_file():
        raise UserError(f"shard index {path} does not exist")
    try:
        index = json.loads(path.read_text())
        entries = {e["name"]: (int(e["samples"]), int(e["bytes"])) for e in index["shards"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a shard index ({type(exc).__name__}: {exc})") from None
    names = [os.path.relpath(p, path.parent) for p in only] if only is not None else list(entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise UserError(f"the index {path} does not list {unknown[0]} (and {len(unknown) - 1} more): rewrite it "
                        "with --reindex")
    paths, counts, sizes = [str(path.parent / n) for n in names], [entries[n][0] for n in names], []
    for name, shard in zip(names, paths):
        try:
            size = os.stat(shard).st_size
        except OSError:
            raise UserError(f"the index {path} lists {name}, which does not exist") from None
        if size != entries[name][1]:
            raise UserError(f"the index {path} disagrees with {shard}: {entries[name][1]} bytes listed, {size} on "
                            "disk (truncated or rewritten? rewrite the index with --reindex)")
        if entries[name][0] <= 0:
            raise UserError(f"shard {shard} holds no images (the index lists 0 samples)")
        sizes.append(size)
    if not paths:
        raise UserError(f"the index {path} lists no shards")
    return ShardSet(paths, counts, index.get("classes"), source, sizes)


def _split_name(name: str) -> Tuple[str, str]:
    """``dir/key.ext`` → (``dir/key``, ``ext``): the key ends at the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _pax_path(data: bytes) -> Optional[str]:
    """The ``path`` record of a PAX extended header (``"LEN path=NAME\\n"`` records), if any."""
    pos = 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _header(block: bytes) -> Tuple[str, int, bytes]:
    """(name, size, type) of a ustar/GNU header block, its checksum verified."""
    try:
        checksum = int(block[148:156].rstrip(b"\0 ") or b"0", 8)
        size_field = block[124:136]
        size = int(size_field.rstrip(b"\0 ") or b"0", 8) if not size_field[0] & 0x80 else tarfile.nti(size_field)
    except ValueError:
        raise tarfile.ReadError("bad tar header") from None
    if checksum != sum(block[:148]) + 256 + sum(block[156:]):
        raise tarfile.ReadError("bad tar header checksum")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and block[345]:  # POSIX prefix field (GNU puts times there)
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, block[156:157]


def iter_shard(path: str) -> Iterator[Dict[str, bytes]]:
    """The samples of one tar, streamed: ``{"__key__": key, ext: bytes, ...}`` per key.

    The headers are parsed here (several times faster than ``tarfile``): ustar, GNU long-name and
    PAX path records. A tar that breaks off (a short header or member, or no
    end-of-archive block) raises ``tarfile.ReadError`` where it breaks."""
    sample: Dict[str, bytes] = {}
    long_name: Optional[str] = None
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            block = f.read(512)
            if len(block) < 512:
                raise tarfile.ReadError("unexpected end of data (no end-of-archive block)")
            if block == TAR_END:
                break
            name, size, kind = _header(block)
            data = f.read(size)
            if len(data) < size or len(f.read(-size % 512)) < -size % 512:
                raise tarfile.ReadError(f"unexpected end of data in {name}")
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            if kind == tarfile.XHDTYPE:
                long_name = _pax_path(data) or long_name
                continue
            name, long_name = long_name or name, None
            if kind not in tarfile.REGULAR_TYPES:
                continue
            key, ext = _split_name(name)
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"], sample[ext] = key, data
    if sample:
        yield sample


def scan_shards(paths: Sequence[str], source: str) -> Tuple[ShardSet, bool]:
    """Sample counts (and whether every image has a ``.cls``) by reading the tar headers only."""
    counts, labelled, sizes = [], True, []
    for path in paths:
        keys, cls = set(), set()
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar.getmembers():
                    key, ext = _split_name(member.name)
                    (keys if ext in SHARD_IMAGE_EXTS else cls if ext == "cls" else set()).add(key)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"shard {path} is not a readable tar (truncated?): {exc}") from None
        if not keys:
            raise UserError(f"shard {path} holds no images (no {', '.join('.' + e for e in SHARD_IMAGE_EXTS)} members)")
        counts.append(len(keys))
        labelled &= keys <= cls
        sizes.append(os.stat(path).st_size)
    return ShardSet(list(paths), counts, None, source, sizes), labelled


# ----------------------------------------------------------------------------- writing shards


def _encode(path: Path, reencode: Optional[int]) -> Tuple[Optional[str], bytes, Optional[str]]:
    """(extension, bytes, None) for a decodable image, or (None, b"", reason) for a bad one."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # the whole stream: truncation shows here
            ext = PIL_EXT.get(img.format)
            if reencode is None and ext is not None:
                return ext, data, None
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=reencode or 95)
            return "jpg", buf.getvalue(), None
    except Exception as exc:  # PIL raises many types for bad data; all mean "unreadable"
        return None, b"", f"{type(exc).__name__}: {exc}"


def _key(path: Path, root: Path, seen: Dict[str, int]) -> str:
    key = "/".join(path.relative_to(root).with_suffix("").parts).replace(".", "_").replace(" ", "_")
    seen[key] = seen.get(key, 0) + 1
    return key if seen[key] == 1 else f"{key}_{seen[key]}"


class _ShardWriter:
    """Tars written to ``NAME.tmp`` and renamed when full; a new one per ``shard_size`` / ``max_size``."""

    def __init__(self, out: Path, prefix: str, shard_size: int, max_size: Optional[int]) -> None:
        self.out, self.prefix, self.shard_size, self.max_size = out, prefix, shard_size, max_size
        self.entries: List[dict] = []
        self.tar: Optional[tarfile.TarFile] = None
        self.count = self.bytes = 0

    def add(self, key: str, members: Sequence[Tuple[str, bytes]]) -> None:
        size = sum(512 + -(-len(data) // 512) * 512 for _, data in members)
        if self.tar is not None and (self.count >= self.shard_size
                                     or (self.max_size is not None and self.bytes + size > self.max_size)):
            self.close()
        if self.tar is None:
            self.name = f"{self.prefix}-{len(self.entries):06d}.tar"
            self.tar = tarfile.open(self.out / f"{self.name}.tmp", "w", format=tarfile.GNU_FORMAT)
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self.tar.addfile(info, io.BytesIO(data))
        self.count, self.bytes = self.count + 1, self.bytes + size

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        tmp = self.out / f"{self.name}.tmp"
        write_dali_index(tmp, self.out / dali_index_name(self.name))
        os.replace(tmp, self.out / self.name)
        self.entries.append({"name": self.name, "samples": self.count, "bytes": (self.out / self.name).stat().st_size})
        self.tar, self.count, self.bytes = None, 0, 0


def dali_index_name(shard: str) -> str:
    """``NAME.tar`` → ``NAME.idx``: the random-access index DALI's webdataset reader takes."""
    return shard[: -len(".tar")] + ".idx" if shard.endswith(".tar") else shard + ".idx"


def write_dali_index(tar_path: Path, idx_path: Path) -> None:
    """DALI's index (format v1.2: per sample, ``ext offset size name`` for each member), so its
    reader does not scan the tar at start-up."""
    samples: List[List[str]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    tmp = idx_path.with_name(f".{idx_path.name}.tmp")
    tmp.write_text(f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples))
    os.replace(tmp, idx_path)


def write_index(path: Path, entries: List[dict], classes: Optional[List[str]], **extra) -> dict:
    index = {"format": INDEX_FORMAT, "version": 1, "total": sum(e["samples"] for e in entries),
             "classes": classes, "shards": entries, **extra}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)
    return index


def _bounded_map(pool: ThreadPoolExecutor, fn, items: Sequence, ahead: int) -> Iterator:
    """``pool.map`` in order, but at most ``ahead`` results in flight (not the whole data set in memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_shards(src: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000,
                 max_size: Optional[int] = None, prefix: str = "shard", reencode: Optional[int] = None,
                 labels: str = "auto", seed: int = 0, shuffle: bool = True, workers: int = 4,
                 progress: bool = True) -> dict:
    """Write ``src``'s images as shards into ``out``; returns the index (also ``out/index.json``)."""
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if shard_size < 1 or (max_size is not None and max_size < 1024):
        raise UserError("--shard-size must be >= 1 and --max-size >= 1024 bytes")
    if reencode is not None and not 1 <= reencode <= 100:
        raise UserError(f"--reencode {reencode}: JPEG quality must be in 1..100")
    files = find_images(src)
    if labels == "auto":
        labels = "yes" if all(f.parent != src for f in files) else "no"
    classes: Optional[List[str]] = None
    targets: List[Optional[int]] = [None] * len(files)
    if labels == "yes":
        ds = ImageFolderDataset(src, with_labels=True)
        files, targets, classes = ds.files, ds.targets, ds.classes
    out.mkdir(parents=True, exist_ok=True)
    if list(out.glob(f"{prefix}-*.tar")) or (out / INDEX_NAME).exists():
        raise UserError(f"{out} already holds shards or an index; write into an empty folder")
    order = list(range(len(files)))
    if shuffle:
        random.Random(seed).shuffle(order)
    writer, seen, bad = _ShardWriter(out, prefix, shard_size, max_size), {}, []
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        results = _bounded_map(pool, lambda i: _encode(files[i], reencode), order, 32 * max(1, workers))
        for i, (ext, data, reason) in tqdm(zip(order, results), total=len(order), desc="writing shards",
                                           unit="img", disable=not progress, dynamic_ncols=True):
            if reason is not None:
                bad.append(str(files[i]))
                warnings.warn(f"skipping unreadable image {files[i]}: {reason}", stacklevel=2)
                continue
            members = [(ext, data)] + ([("cls", str(targets[i]).encode())] if targets[i] is not None else [])
            writer.add(_key(files[i], src, seen), members)
    writer.close()
    if not writer.entries:
        raise UserError(f"none of the {len(files)} images under {src} could be read")
    return write_index(out / INDEX_NAME, writer.entries, classes, source=str(src), skipped=len(bad),
                       reencode=reencode)


def reindex(pattern: str) -> dict:
    """Rewrite ``index.json`` (and DALI's ``.idx`` files) beside the shards of ``pattern`` from the tars
    themselves; the class list of an existing index is kept."""
    paths = [p for item in expand_pattern(pattern)
             for p in (sorted(glob.glob(item)) if glob.has_magic(item) else [item]) if os.path.isfile(p)]
    if not paths:
        raise UserError(f"no shard matches {pattern}")
    shards, labelled = scan_shards(paths, pattern)
    for p in paths:
        write_dali_index(Path(p), Path(p).parent / dali_index_name(Path(p).name))
    path = Path(paths[0]).parent / INDEX_NAME
    classes = None
    if labelled and path.is_file():
        classes = json.loads(path.read_text()).get("classes")
    entries = [{"name": os.path.relpath(p, path.parent), "samples": c, "bytes": s}
               for p, c, s in zip(shards.paths, shards.counts, shards.sizes)]
    return write_index(path, entries, classes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbeit.data.shard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="image folder (class sub-folders give .cls labels); with --reindex: a shard pattern")
    p.add_argument("out", nargs="?", help="output folder for the shards and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--max-size", type=int, default=None, help="bytes per shard at most (a new shard starts earlier)")
    p.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar, ...")
    p.add_argument("--reencode", type=int, default=None, metavar="QUALITY",
                   help="re-encode every image as JPEG at this quality (default: keep the bytes as they are)")
    p.add_argument("--labels", choices=("auto", "yes", "no"), default="auto",
                   help="write .cls from the class sub-folders (auto: when every image is in one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the file order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    p.add_argument("--workers", type=int, default=4, help="threads decoding (checking) images")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--reindex", action="store_true", help="rewrite index.json beside the shards of SRC (a pattern)")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reindex:
        index = reindex(args.src)
        print(f"indexed {len(index['shards'])} shards, {index['total']} samples")
        return 0
    if args.out is None:
        raise UserError("give the output folder OUT")
    index = write_shards(args.src, args.out, args.shard_size, args.max_size, args.prefix, args.reencode, args.labels,
                         args.seed, not args.no_shuffle, args.workers, not args.no_progress)
    labels = f", {len(index['classes'])} classes" if index["classes"] else ", no labels"
    print(f"wrote {index['total']} images in {len(index['shards'])} shards to {args.out}{labels}; "
          f"skipped {index['skipped']} unreadable; index {Path(args.out) / INDEX_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
