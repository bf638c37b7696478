"""WebDataset shards: writing, finding, the torch shard loader (split, shuffle, resume, bad data), pre-training."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, interrupt_on_call
from PIL import Image
from torchvision.transforms import functional as TF

from fastbeit.data import shard as shard_mod
from fastbeit.data.shard import expand_pattern, is_shard_source, iter_shard, resolve_shards, write_shards
from fastbeit.data.shard_loader import SampleDecoder, ShardLoader, assign_shards
from fastbeit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "fastbeit" / "assets" / "sample"
PER_CLASS = 4  # 10 classes x 4 = 40 images


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """40 real photos from the shipped sample (4 a class, shrunk to 64 px so decoding is quick)."""
    root = tmp_path_factory.mktemp("images")
    for cls in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (root / cls.name).mkdir()
        for f in sorted(cls.iterdir())[:PER_CLASS]:
            with Image.open(f) as img:
                img.convert("RGB").resize((64, 48)).save(root / cls.name / f"{f.stem}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def shards(image_dir, tmp_path_factory):
    """8 shards of 5 labelled samples each."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(image_dir, out, shard_size=5, prefix="train", progress=False)
    return out


def tiny_decoder(labels=False):
    return SampleDecoder(lambda img: TF.to_tensor(img.resize((8, 8))), labels=labels, keys=True)


def all_keys(loader):
    return [k for batch in loader for k in batch[-1]]


def test_writer_keeps_bytes_labels_and_skips_corrupt_files(image_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(image_dir, src)
    first = sorted(src.glob("*/*.jpg"))[0]
    Image.open(first).save(src / first.parent.name / "as_png.png")
    (src / first.parent.name / "broken.jpg").write_bytes(first.read_bytes()[:300])
    with pytest.warns(UserWarning, match="broken.jpg"):
        index = write_shards(src, tmp_path / "out", shard_size=16, progress=False)
    assert index["total"] == 41 and index["skipped"] == 1 and len(index["classes"]) == 10
    assert [e["samples"] for e in index["shards"]] == [16, 16, 9]
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob(".*"))
    members = {}
    for e in index["shards"]:
        with tarfile.open(tmp_path / "out" / e["name"]) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    key = f"{first.parent.name}/{first.stem}"
    assert members[f"{key}.jpg"] == first.read_bytes()  # stored as it was, not re-encoded
    assert int(members[f"{key}.cls"]) == index["classes"].index(first.parent.name)
    assert f"{first.parent.name}/as_png.png" in members  # a PNG keeps its own extension
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index


def test_reencode_and_max_size(image_dir, tmp_path):
    index = write_shards(image_dir, tmp_path / "a", shard_size=1000, max_size=40_000, reencode=50, progress=False)
    assert len(index["shards"]) > 1 and all(e["bytes"] <= 40_000 + 1024 * 10 for e in index["shards"])
    assert index["total"] == 40 and index["reencode"] == 50
    with tarfile.open(tmp_path / "a" / index["shards"][0]["name"]) as tar:
        assert all(m.name.endswith((".jpg", ".cls")) for m in tar)
    with pytest.raises(UserError, match="already holds shards"):
        write_shards(image_dir, tmp_path / "a", progress=False)


def test_cli_writes_then_reindex_rebuilds_the_same_index(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert shard_mod.main([str(image_dir), str(out), "--shard-size", "16", "--no-progress", "--prefix", "t"]) == 0
    assert "wrote 40 images in 3 shards" in capsys.readouterr().out
    written = json.loads((out / "index.json").read_text())
    (out / "index.json").unlink()
    (out / "t-000001.idx").unlink()
    assert shard_mod.main([str(out / "t-*.tar"), "--reindex"]) == 0
    rebuilt = json.loads((out / "index.json").read_text())
    assert rebuilt["shards"] == written["shards"] and (out / "t-000001.idx").is_file()
    with pytest.raises(SystemExit):
        shard_mod.main([str(tmp_path / "missing"), str(tmp_path / "o2"), "--no-progress"])
    assert capsys.readouterr().err.startswith("error: data folder")


def test_the_slurm_example_is_valid_bash():
    script = ROOT / "examples" / "slurm_pretrain.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--rdzv-backend c10d" in text and "-m fastbeit.pretrain" in text and "--resume auto" in text


def test_webdataset_reads_the_shards(shards):
    wds = pytest.importorskip("webdataset", reason="webdataset is not installed")
    samples = list(wds.WebDataset(str(shards / "train-{000000..000007}.tar"), shardshuffle=False))
    assert len(samples) == 40 and all({"jpg", "cls"} <= s.keys() for s in samples)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_follows_long_names_in_every_tar_format(tmp_path, fmt):
    names = ["d" * 60 + "/" + "k" * 90 + ".jpg", "d" * 60 + "/" + "k" * 90 + ".cls", "short.jpg"]
    with tarfile.open(tmp_path / "t.tar", "w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"ab%d" % i))
    samples = list(shard_mod.iter_shard(str(tmp_path / "t.tar")))
    assert [s["__key__"] for s in samples] == ["d" * 60 + "/" + "k" * 90, "short"]
    assert samples[0]["jpg"] == b"ab0" and samples[0]["cls"] == b"ab1" and samples[1]["jpg"] == b"ab2"


def test_pattern_index_and_folder_name_the_same_shards(shards):
    assert expand_pattern("a-{08..10}-{x,y}.tar") == ["a-08-x.tar", "a-08-y.tar", "a-09-x.tar", "a-09-y.tar",
                                                      "a-10-x.tar", "a-10-y.tar"]
    by_pattern = resolve_shards(str(shards / "train-{000000..000007}.tar"))
    by_index, by_folder = resolve_shards(str(shards / "index.json")), resolve_shards(str(shards))
    assert by_pattern.paths == by_index.paths == by_folder.paths and by_pattern.total == 40
    assert len(by_index.require_labels()) == 10
    assert is_shard_source(str(shards)) and not is_shard_source(str(SAMPLE))


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_are_disjoint_and_the_world_epoch_covers_each_sample_once(shards, workers):
    data = resolve_shards(str(shards))
    seen = []
    for rank in range(2):
        loader = ShardLoader(data, tiny_decoder(), 5, rank=rank, world_size=2, num_workers=workers, seed=3)
        assert len(loader) == 4
        loader.set_epoch(1)
        seen.append(all_keys(loader))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(set(seen[0] + seen[1])) and len(seen[0] + seen[1]) == 40


def test_epochs_reshuffle_reproducibly(shards):
    data = resolve_shards(str(shards))
    loader = ShardLoader(data, tiny_decoder(), 4, seed=0, buffer=8)
    first, second = all_keys(loader), all_keys(loader)  # epochs 0 and 1
    assert first != second and sorted(first) == sorted(second)
    again = ShardLoader(data, tiny_decoder(), 4, seed=0, buffer=8)
    assert all_keys(again) == first
    assert all_keys(ShardLoader(data, tiny_decoder(), 4, seed=1, buffer=8)) != first


def test_persistent_workers_follow_epochs_after_an_abandoned_one(shards):
    data = resolve_shards(str(shards))
    loader = ShardLoader(data, tiny_decoder(), 4, num_workers=2, seed=2, buffer=6)
    for _batch in loader:  # epoch 0, left after one batch (as --max_steps does)
        break
    loader.set_epoch(1, 3)
    resumed = all_keys(loader)
    fresh = ShardLoader(data, tiny_decoder(), 4, num_workers=2, seed=2, buffer=6)
    fresh.set_epoch(1)
    assert resumed == all_keys(fresh)[12:] and len(resumed) == 28


def test_uneven_shards_still_give_equal_steps_on_every_rank():
    split = assign_shards([10, 3, 7, 7, 2], 2, np.arange(5))
    loads = [sum([10, 3, 7, 7, 2][i] for i in slot) for slot in split]
    assert sorted(i for slot in split for i in slot) == [0, 1, 2, 3, 4] and abs(loads[0] - loads[1]) <= 10


def test_resume_mid_epoch_is_exact(shards):
    data = resolve_shards(str(shards))

    def run(step):
        loader = ShardLoader(data, tiny_decoder(), 3, rank=1, world_size=2, num_workers=2, seed=5, buffer=4)
        loader.set_epoch(2, step)
        return list(loader)

    full, resumed = run(0), run(3)
    assert len(full) == 6 and len(resumed) == 3
    for a, b in zip(full[3:], resumed):
        assert a[-1] == b[-1]
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_corrupt_samples_and_a_shard_truncated_mid_run_are_skipped_and_counted(shards, tmp_path):
    for f in shards.iterdir():
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / "train-000001.tar"
    _tar(bad, [(f"k{i}.jpg", b"not a jpeg" if i == 2 else _jpeg()) for i in range(5)])
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][1]["bytes"] = bad.stat().st_size
    (tmp_path / "index.json").write_text(json.dumps(index))
    data = resolve_shards(str(tmp_path))
    loader = ShardLoader(data, tiny_decoder(), 5, seed=0, report=False)
    victim = tmp_path / "train-000004.tar"
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated after the loader started
    with pytest.warns(UserWarning):
        keys = all_keys(loader)
    assert len(keys) == 40 and "k2" not in keys
    bad_samples, bad_shards = loader.stats.sum(0).tolist()  # the quota re-reads shards: counted per meeting
    assert bad_samples >= 1 and bad_shards >= 1


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path: Path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_input_gets_one_clear_line(shards, tmp_path):
    with pytest.raises(UserError, match="no shard matches"):
        resolve_shards(str(tmp_path / "none-{000..003}.tar"))
    _tar(tmp_path / "t-0.tar", [("a.jpg", _jpeg()), ("b.jpg", _jpeg())])
    full = (tmp_path / "t-0.tar").read_bytes()
    (tmp_path / "t-1.tar").write_bytes(full[:700])
    with pytest.warns(UserWarning, match="no index.json"), pytest.raises(UserError, match="t-1.tar is not a readable"):
        resolve_shards(str(tmp_path / "t-{0..1}.tar"))
    with pytest.raises(UserError, match="4 of the 6 shards of .* are missing, e.g. .*t-2.tar"):
        resolve_shards(str(tmp_path / "t-{0..5}.tar"))
    _tar(tmp_path / "t-1.tar", [("a.txt", b"hello")])
    with pytest.warns(UserWarning), pytest.raises(UserError, match="t-1.tar holds no images"):
        resolve_shards(str(tmp_path / "t-{0..1}.tar"))
    with pytest.warns(UserWarning):
        unlabelled = resolve_shards(str(tmp_path / "t-0.tar"))
    with pytest.raises(UserError, match="have no class list"):
        unlabelled.require_labels()
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    with open(copy / "train-000003.tar", "r+b") as f:
        f.truncate(2048)
    with pytest.raises(UserError, match="disagrees with .*train-000003.tar"):
        resolve_shards(str(copy / "index.json"))
    with pytest.raises(UserError, match="cannot be split over 16 processes"):
        ShardLoader(resolve_shards(str(shards)), tiny_decoder(), 1, world_size=16)


def test_a_1000_shard_index_starts_without_opening_a_tar(tmp_path, monkeypatch):
    entries = []
    for i in range(1000):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"x" * (i % 7 + 1))
        entries.append({"name": f"s-{i:06d}.tar", "samples": 14_000, "bytes": i % 7 + 1})
    shard_mod.write_index(tmp_path / "index.json", entries, None)

    def no_open(*args, **kwargs):
        raise AssertionError("a tar was opened")

    monkeypatch.setattr(tarfile, "open", no_open)
    start = time.perf_counter()
    for spec in (str(tmp_path / "index.json"), str(tmp_path / "s-{000000..000999}.tar")):
        loader = ShardLoader(resolve_shards(spec), tiny_decoder(), 256, rank=3, world_size=8, num_workers=10)
        assert len(loader) == 14_000_000 // 8 // 256
        assert len(loader.rank_slots(0)) == 10
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------- pre-training on shards


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from fastbeit.tokenizer.dvae import DiscreteVAE, DVAEConfig, save_tokenizer

    torch.manual_seed(0)
    tok = DiscreteVAE(DVAEConfig(n_hid=8, n_blk_per_group=1, vocab_size=64, image_size=64))
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tok.safetensors")


def pretrain_args(data, tok, out, *extra):
    return ["--data", str(data), "--model", "beit_tiny", "--input_size", "32", "--patch_size", "4",
            "--second_input_size", "64", "--tokenizer", str(tok), "--batch_size", "5", "--epochs", "2",
            "--num_workers", "0", "--num_mask_patches", "20", "--min_mask_patches_per_block", "4", "--depth", "1",
            "--kernels", "reference", "--attn", "sdpa", "--output", str(out), "--no_progress", "--log_every", "1",
            "--amp", "none", "--warmup_epochs", "1", *extra]


def test_pretraining_on_shards_resumes_mid_epoch_exactly(shards, tokenizer, tmp_path):
    from fastbeit import pretrain

    pattern = str(shards / "train-{000000..000007}.tar")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert pretrain.main(pretrain_args(pattern, tokenizer, straight, "--max_steps", "10")) == 0
    assert pretrain.main(pretrain_args(pattern, tokenizer, split, "--max_steps", "3")) == 0
    ckpt = torch.load(split / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 3) and ckpt["data"]["batch_size"] == 5
    assert pretrain.main(pretrain_args(pattern, tokenizer, split, "--resume", "auto", "--max_steps", "10")) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 10  # into the second epoch
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


DDP_LOADER_SCRIPT = """
import json, sys
import torch.distributed as dist
from torchvision.transforms import functional as TF
from fastbeit.data.shard import resolve_shards
from fastbeit.data.shard_loader import SampleDecoder, ShardLoader

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
decoder = SampleDecoder(lambda img: TF.to_tensor(img.resize((8, 8))), keys=True)
loader = ShardLoader(resolve_shards(sys.argv[1]), decoder, 5, rank=rank, world_size=world, num_workers=2, seed=7)
epochs = []
for epoch in range(2):
    loader.set_epoch(epoch)
    epochs.append([k for batch in loader for k in batch[-1]])
gathered = [None] * world
dist.all_gather_object(gathered, {"steps": len(loader), "epochs": epochs})
if rank == 0:
    open(sys.argv[2], "w").write(json.dumps(gathered))
dist.destroy_process_group()
"""


def test_two_gloo_processes_see_disjoint_samples_covering_the_epoch(shards, tmp_path):
    script, out = tmp_path / "ddp_loader.py", tmp_path / "keys.json"
    script.write_text(DDP_LOADER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           str(script), str(shards / "index.json"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    for epoch in range(2):
        a, b = ranks[0]["epochs"][epoch], ranks[1]["epochs"][epoch]
        assert not set(a) & set(b) and len(a) == len(b) == 20 and len(set(a) | set(b)) == 40
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # reshuffled


def test_ddp_on_two_cpu_processes_reads_shards(shards, tokenizer, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
           "-m", "fastbeit.pretrain", *pretrain_args(shards / "index.json", tokenizer, tmp_path, "--epochs", "1")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # 40 samples / 2 ranks / batch 5
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["data"]["world_size"] == 2


# ----------------------------------------------------------------------------- fine-tuning and linear probing


@pytest.fixture(scope="module")
def labelled_split(image_dir, shards, tmp_path_factory):
    """DATA/train (the 8 shards above) and DATA/val (2 shards of the same 40 images), each with its index."""
    base = tmp_path_factory.mktemp("split")
    shutil.copytree(shards, base / "train")
    write_shards(image_dir, base / "val", shard_size=20, progress=False)
    return base


def test_finetuning_reads_labelled_shards_and_resumes_mid_epoch(labelled_split, tmp_path, monkeypatch, capsys):
    from fastbeit import finetune

    args = ["--data", str(labelled_split), "--model", "beit_tiny", "--depth", "1", "--input_size", "32",
            "--patch_size", "4", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0", "--num_workers", "0",
            "--amp", "none", "--output", str(tmp_path), "--no_progress", "--kernels", "reference"]
    real = interrupt_on_call(monkeypatch, finetune.FineTuner, "optimizer_step", 3)
    assert finetune.main(args) == 130
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step_in_epoch"] == 2
    monkeypatch.setattr(finetune.FineTuner, "optimizer_step", real)
    assert finetune.main([*args, "--resume", "auto"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_images"] == 40 and "2 epochs x 5 steps" in capsys.readouterr().out  # 40 / 8
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["global_step"] == 10 and last["epoch"] == 2


def test_linear_probe_reads_labelled_shards(labelled_split, tmp_path, capsys):
    from fastbeit import linprobe
    from fastbeit.config import make_config
    from fastbeit.model import BeitForMaskedImageModeling

    model = BeitForMaskedImageModeling(make_config("beit_tiny", img_size=32, patch_size=4, embed_dim=48, depth=2,
                                                   num_heads=3, vocab_size=97))
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict()}, tmp_path / "pre.pt")
    args = ["--checkpoint", str(tmp_path / "pre.pt"), "--train", str(labelled_split / "train" / "index.json"),
            "--val", str(labelled_split / "val" / "shard-{000000..000001}.tar"),
            "--output", str(tmp_path / "out"), "--epochs", "2", "--batch_size", "8", "--num_workers", "0",
            "--amp", "none", "--no_progress"]
    assert linprobe.main(args) == 0
    cache = torch.load(next((tmp_path / "out" / "cache").glob("features-*.pt")), weights_only=True)
    assert cache["train"].shape[0] == 40 and cache["val"].shape[0] == 40 and len(cache["classes"]) == 10
    with pytest.raises(SystemExit):
        linprobe.main([*args[:2], "--train", str(labelled_split / "train"), "--val", str(SAMPLE), *args[6:]])
    assert "both as shards or both as folders" in capsys.readouterr().err


# ----------------------------------------------------------------------------- DALI (CPU mode)


def dali_loader(data, **kwargs):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    from fastbeit.data.dali_shards import DaliShardLoader

    settings = dict(batch_size=4, input_size=32, second_input_size=16, num_threads=1, seed=0, buffer=8)
    return DaliShardLoader(data, **{**settings, **kwargs})


@pytest.mark.extras
def test_dali_reads_shards_splits_and_resumes_exactly(shards):
    loader = dali_loader(resolve_shards(str(shards)), shard_id=1, num_shards=2)
    assert len(loader) == 5 and loader._index_paths is not None  # the writer's .idx files are used
    loader.set_epoch(3)
    full = list(loader)
    assert [tuple(b[0].shape) for b in full] == [(4, 3, 32, 32)] * 5 and full[0][1].shape == (4, 3, 16, 16)
    assert full[0][1].min() >= 0.1 - 1e-6 and full[0][1].max() <= 0.9 + 1e-6  # map_pixels range
    loader.set_epoch(3, 2)
    resumed = list(loader)
    for a, b in zip(full[2:], resumed, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    loader.set_epoch(4)
    assert not torch.equal(list(loader)[0][0], full[0][0])  # another epoch, another order and draws


@pytest.mark.extras
def test_dali_leaves_out_a_shard_with_an_undecodable_image(shards, tmp_path):
    for f in shards.iterdir():
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / "train-000002.tar"
    _tar(bad, [(f"k{i}.jpg", b"not a jpeg" if i == 2 else _jpeg()) for i in range(5)])
    shard_mod.write_dali_index(bad, tmp_path / "train-000002.idx")
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][2]["bytes"] = bad.stat().st_size
    (tmp_path / "index.json").write_text(json.dumps(index))
    loader = dali_loader(resolve_shards(str(tmp_path)))
    with pytest.warns(UserWarning, match="leaving shard .*train-000002.tar out"):
        batches = list(loader)
    assert len(batches) == 10 and loader.excluded == {2}


@pytest.mark.extras
def test_pretraining_with_the_dali_loader_on_shards(shards, tokenizer, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from fastbeit import pretrain

    args = pretrain_args(shards / "index.json", tokenizer, tmp_path, "--loader", "dali", "--max_steps", "2",
                         "--num_workers", "1")
    assert pretrain.main(args) == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["data"]["batch_size"] == 5


# ----------------------------------------------------------------------------- the real Imagenette photos


@pytest.fixture(scope="module")
def imagenette_shards(shared_data, tmp_path_factory):
    """The shared Imagenette val split (3,925 photos, 10 classes, some greyscale) as 16 shards."""
    src = shared_data / "imagenette" / "val"
    out = tmp_path_factory.mktemp("imagenette-shards")
    index = write_shards(src, out, shard_size=250, prefix="val", progress=False, workers=2)
    return src, out, index


def test_imagenette_shards_hold_every_photo_with_its_class(imagenette_shards):
    src, out, index = imagenette_shards
    photos = sorted(p for p in src.rglob("*") if p.is_file())
    wnids = sorted(p.name for p in src.iterdir() if p.is_dir())
    assert index["total"] == len(photos) and index["skipped"] == 0 and index["classes"] == wnids
    assert len(index["shards"]) == -(-len(photos) // 250)
    per_class = {wnid: sum(1 for p in photos if p.parent.name == wnid) for wnid in wnids}
    labels = [int(s["cls"]) for f in sorted(out.glob("val-*.tar")) for s in iter_shard(str(f))]
    assert {wnids[c]: labels.count(c) for c in set(labels)} == per_class


def test_imagenette_shards_split_over_two_ranks_cover_the_split_once(imagenette_shards):
    _, out, index = imagenette_shards
    data = resolve_shards(str(out / "index.json"))
    keys = []
    for rank in (0, 1):
        loader = ShardLoader(data, tiny_decoder(labels=True), 25, rank=rank, world_size=2, num_workers=2,
                             train=False)
        batches = list(loader)
        assert all(b[0].shape[1:] == (3, 8, 8) for b in batches)  # greyscale photos arrive as RGB
        keys.append([k for b in batches for k in b[-1]])
    assert not set(keys[0]) & set(keys[1]) and len(keys[0]) + len(keys[1]) == index["total"]


@pytest.mark.extras
def test_dali_reads_imagenette_shards(imagenette_shards):
    _, out, _ = imagenette_shards
    loader = dali_loader(resolve_shards(str(out / "val-{000000..000001}.tar")), batch_size=25, num_threads=2)
    batches = list(loader)
    assert len(batches) == 20 and all(tuple(b[0].shape) == (25, 3, 32, 32) for b in batches)
    assert all(torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all() for b in batches)
