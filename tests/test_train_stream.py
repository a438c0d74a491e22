"""Training stream: one global order for any world size and worker count (every sample once per epoch, same global
batches, bitwise the same for any num_workers), exact resume from a cursor, reading by seek or stream, per-sample
seeds, corrupt and missing data, clear errors, worker signals."""

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data.global_order import GlobalOrder, buffer_order, shard_permutation
from data.info import DatasetError, DatasetInfo, resolve
from data.seeding import mix_seed
from data.shard_reader import ShardReader
from data.tar_index import index_tar, read_sample
from data.train_stream import build_train_loader
from data.transforms import pretrain_transform

SIZES = [5, 9, 6, 12, 7, 8, 11, 14]  # uneven shards, 72 samples: one epoch is whole micro-batches for W*m | 72
N = sum(SIZES)
TRANSFORM = pretrain_transform(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(folder: Path, sizes, *, labelled=True, corrupt=(), json_file=True, extra=None) -> dict[str, tuple]:
    """Shards `train-00000k.tar` (+ dataset.json); returns key -> (shard, offset, label). `corrupt` keys get
    broken JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    truth, shards = {}, []
    for k, n in enumerate(sizes):
        name = f"train-{k:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False) as tw:
            for i in range(n):
                key = f"s{k}x{i}"
                data = _jpeg(100 * k + i)
                sample = {"__key__": key, "jpg": data[: len(data) // 3] if key in corrupt else data}
                if labelled:
                    sample["cls"] = str((k + i) % 3).encode()
                tw.write(sample)
                truth[key] = (k, i, (k + i) % 3 if labelled else -1)
        shards.append({"name": name, "num_samples": n})
    if json_file:
        entry = {"num_samples": sum(sizes), "num_shards": len(sizes), "num_classes": 3 if labelled else 0,
                 "class_names": ["a", "b", "c"] if labelled else None, "labelled": labelled, "shards": shards,
                 **(extra or {})}
        (folder / "dataset.json").write_text(json.dumps({"format": "tessera-wds/1", "splits": {"train": entry}}))
    return truth


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_shards")
    return folder, _write(folder, SIZES)


def _loader(spec, **kw):
    kw = {"batch_size": 4, "transform": TRANSFORM, "seed": 0, "shuffle_buffer": 10, **kw}
    return build_train_loader(spec, **kw)


def _take(spec, n, **kw):
    return list(itertools.islice(_loader(spec, **kw), n))


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) and x["key"] == y["key"]
        and torch.equal(x["position"], y["position"]) for x, y in zip(a, b))


def _global_steps(spec, steps, world, micro, accum=1, start=0, **kw):
    """Per optimizer step, the micro-batches of every rank in (micro-step, rank) order, concatenated."""
    per_rank = [_take(spec, steps * accum, rank=r, world_size=world, batch_size=micro, start_sample=start, **kw)
                for r in range(world)]
    out = []
    for t in range(steps):
        parts = [per_rank[r][t * accum + a] for a in range(accum) for r in range(world)]
        out.append({"image": torch.cat([p["image"] for p in parts]), "key": [k for p in parts for k in p["key"]],
                    "position": torch.cat([p["position"] for p in parts])})
    return out


# --- the global order, on integers ---------------------------------------------------------------------------


def _plain_buffer_replay(n, size, seed):
    """The buffer shuffle step by step, as the definition says (data/global_order.py)."""
    s = min(size, n)
    if s <= 1:
        return list(range(n))
    bits = np.random.PCG64(seed)
    draws = bits.random_raw(n - s)
    held, out = list(range(s)), []
    for j in range(n - s):
        k = int(draws[j] % np.uint64(s))
        out.append(held[k])
        held[k] = s + j
    return out + [held[i] for i in np.argsort(bits.random_raw(s), kind="stable")]


@pytest.mark.parametrize("n,size,block", [(50, 8, 7), (1000, 100, 64), (300, 37, 1 << 16), (10, 20, 3), (9, 1, 4)])
def test_buffer_order_is_the_step_by_step_buffer_shuffle(n, size, block):
    got = np.concatenate(list(buffer_order(n, size, 5, block=block))).tolist()
    assert got == _plain_buffer_replay(n, size, 5)  # block replay == plain loop, whatever the block size
    assert sorted(got) == list(range(n))  # a permutation: every input once
    s = min(size, n)
    assert all(x <= t + s - 1 for t, x in enumerate(got))  # nothing comes out before it entered the buffer
    if 1 < size < n:
        assert got != list(range(n))


def test_global_order_covers_every_sample_once_per_epoch():
    order = GlobalOrder(SIZES, seed=3, buffer=10)
    perms = [shard_permutation(len(SIZES), 3, e).tolist() for e in range(3)]
    assert all(sorted(p) == list(range(len(SIZES))) for p in perms) and perms[0] != perms[1]
    for e in range(3):
        inputs = order.epoch_order(e)
        shard, offset = order.locate(e, inputs)
        concat = [(k, i) for k in perms[e] for i in range(SIZES[k])]  # the epoch's input stream, built by hand
        assert list(zip(shard.tolist(), offset.tolist())) == [concat[x] for x in inputs.tolist()]
        assert sorted(zip(shard.tolist(), offset.tolist())) == sorted(concat)
    assert not np.array_equal(order.epoch_order(0), order.epoch_order(1))
    # `at` (global positions across epochs) agrees with the per-epoch order
    s, o = order.at([N - 1, N, 2 * N + 5])
    e1 = order.locate(1, order.epoch_order(1)[:1])
    assert (int(s[1]), int(o[1])) == (int(e1[0][0]), int(e1[1][0]))
    assert int(order.sample_id(3, 2)) == sum(SIZES[:3]) + 2


# --- who reads what ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_sample_once_per_epoch_across_ranks_and_workers(shards, world, workers):
    folder, truth = shards
    m = 2
    per_rank = N // (world * m)  # micro-batches of each rank in one epoch
    seen, positions = [], []
    for rank in range(world):
        batches = _take(folder, per_rank, rank=rank, world_size=world, num_workers=workers, batch_size=m)
        for b, batch in enumerate(batches):
            assert batch["position"].tolist() == list(range((b * world + rank) * m, (b * world + rank + 1) * m))
            assert batch["label"].tolist() == [truth[k][2] for k in batch["key"]]
        seen += [k for batch in batches for k in batch["key"]]
        positions += [p for batch in batches for p in batch["position"].tolist()]
    assert sorted(seen) == sorted(truth) and sorted(positions) == list(range(N))


def test_global_batches_are_the_same_for_any_world_size_and_accumulation(shards):
    folder, _ = shards
    kw = dict(seed=2, shuffle_buffer=16)
    ref = _global_steps(folder, 10, world=1, micro=8, **kw)  # 80 samples: into the second epoch
    assert [p for s in ref for p in s["position"].tolist()] == list(range(80))
    for world, micro, accum in ((2, 4, 1), (4, 2, 1), (1, 2, 4), (2, 2, 2)):
        got = _global_steps(folder, 10, world=world, micro=micro, accum=accum, **kw)
        for a, b in zip(ref, got):
            assert a["key"] == b["key"] and torch.equal(a["position"], b["position"])
            assert torch.equal(a["image"], b["image"])  # the same crops: augmentation follows the sample


def test_bitwise_identical_for_zero_one_and_two_workers(shards):
    folder, _ = shards

    def noise(seed):
        return {"noise": torch.rand(6, generator=torch.Generator().manual_seed(seed))}

    runs = [_take(folder, 9, rank=1, world_size=2, num_workers=k, seed=4, sample_fn=noise) for k in (0, 1, 2)]
    assert _same(runs[0], runs[1]) and _same(runs[0], runs[2])
    assert all(torch.equal(a["noise"], b["noise"]) for a, b in zip(runs[0], runs[2]))
    assert runs[0][0]["noise"].shape == (4, 6)
    assert [b["key"] for b in _take(folder, 3, seed=5)] != [b["key"] for b in _take(folder, 3, seed=4)]


def test_per_sample_seeds_follow_the_sample(shards):
    """sample_fn gets mix_seed(seed, "sample", epoch, dataset index) and the transform runs under the global RNGs
    seeded with mix_seed(seed, "aug", epoch, dataset index): checked against that computation here."""
    folder, truth = shards
    first = [0] + list(itertools.accumulate(SIZES))
    batches = _take(folder, 12, batch_size=8, seed=7, sample_fn=lambda s: {"seed": torch.tensor(s)})  # 96 > N
    for batch in batches:
        for key, p, got in zip(batch["key"], batch["position"].tolist(), batch["seed"].tolist()):
            shard, offset, _ = truth[key]
            assert got == mix_seed(7, "sample", p // N, first[shard] + offset)
    key, p = batches[0]["key"][0], batches[0]["position"][0].item()
    shard, offset, _ = truth[key]
    raw = next(s for i, s in enumerate(wds.tarfile_samples(iter([{"url": str(folder / f"train-{shard:06d}.tar")}])))
               if i == offset)
    from data.decode import decode_image
    from data.seeding import seeded_global_rngs

    with seeded_global_rngs(mix_seed(7, "aug", p // N, first[shard] + offset)):
        assert torch.equal(TRANSFORM(decode_image(raw)), batches[0]["image"][0])


def test_a_reader_reads_and_decodes_only_its_own_samples(shards, monkeypatch):
    """Rank 1 of 3, started at cursor 30: it reads (seeks) and decodes exactly its batches' samples, none before the
    cursor and none of the other ranks'."""
    import data.stream_worker as sw

    folder, truth = shards
    decoded, read = [], []
    real_decode, real_read = sw.decode_image, ShardReader.read
    monkeypatch.setattr(sw, "decode_image", lambda s, size=None: (decoded.append(s["__key__"]),
                                                                  real_decode(s, size))[1])
    monkeypatch.setattr(ShardReader, "read", lambda self, j, o: (read.append((j, o)), real_read(self, j, o))[1])
    batches = _take(folder, 5, rank=1, world_size=3, batch_size=3, start_sample=30)
    keys = [k for b in batches for k in b["key"]]
    assert [p for b in batches for p in b["position"].tolist()] == [
        30 + (3 * b + 1) * 3 + q for b in range(5) for q in range(3)]
    assert decoded == keys and read == [truth[k][:2] for k in keys]


def test_streamed_shards_are_read_once_per_epoch_and_reader(shards, monkeypatch):
    """Remote (`pipe:`) shards: each reader streams each shard once per epoch and keeps only what it needs."""
    folder, _ = shards
    info = resolve(folder)
    piped = DatasetInfo(urls=[f"pipe:cat {u}" for u in info.urls], shard_sizes=info.shard_sizes)
    streamed, real = [], ShardReader.stream
    monkeypatch.setattr(ShardReader, "stream", lambda self, j, offs: (streamed.append(j), real(self, j, offs))[1])
    kw = dict(rank=0, world_size=2, batch_size=3, shuffle_buffer=20)
    got = _take(piped, 2 * N // 6, **kw)  # two epochs
    assert _same(got, _take(folder, 2 * N // 6, **kw))  # the same batches as seeking in the local files
    order, want = GlobalOrder(SIZES, seed=0, buffer=20), []
    for e in range(2):  # the shards holding rank 0's positions (chunks of 3, every other one), by epoch
        shard, _ = order.locate(e, order.epoch_order(e))
        want += sorted({int(shard[t]) for t in range(N) if (t // 3) % 2 == 0})
    assert sorted(streamed) == sorted(want)


def test_pipe_spec_through_dataset_json_shard_url(tmp_path, shards):
    folder, _ = shards
    remote = tmp_path / "remote"
    remote.mkdir()
    meta = json.loads((folder / "dataset.json").read_text())
    meta["splits"]["train"]["shard_url"] = f"pipe:cat {folder}/{{name}}"
    (remote / "dataset.json").write_text(json.dumps(meta))
    info = resolve(remote)
    assert info.urls[0] == f"pipe:cat {folder}/train-000000.tar" and info.shard_sizes == SIZES
    assert _same(_take(remote, 4, num_workers=1), _take(folder, 4))


def test_local_shards_without_dataset_json_are_counted_and_remote_ones_refused(tmp_path, shards):
    folder, _ = shards
    bare = tmp_path / "bare"
    _write(bare, SIZES, json_file=False)
    pattern = str(bare / "train-{000000..000007}.tar")
    assert resolve(pattern).shard_sizes is None
    assert _same(_take(pattern, 5), _take(folder, 5))
    with pytest.raises(DatasetError, match=r"pipe:cat .*sample count.*dataset.json.*make_shards"):
        _loader(DatasetInfo(urls=[f"pipe:cat {bare}/train-000000.tar"]))


# --- resume -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_cursor_equals_the_uninterrupted_stream(shards, workers):
    folder, _ = shards
    kw = dict(seed=3, shuffle_buffer=16, num_workers=workers)
    full = _global_steps(folder, 12, world=1, micro=8, **kw)  # 96 samples, across the epoch boundary (72)
    # 5 steps at world size 2, then resume at world size 4 (another micro-batch, same global batch)
    first = _global_steps(folder, 5, world=2, micro=4, **kw)
    assert all(a["key"] == b["key"] and torch.equal(a["image"], b["image"]) for a, b in zip(full, first))
    resumed = _global_steps(folder, 7, world=4, micro=2, start=5 * 8, **kw)
    for a, b in zip(full[5:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["position"], b["position"])
    assert [p for s in resumed for p in s["position"].tolist()] == list(range(40, 96))


def test_state_dict_round_trip_and_what_it_refuses(shards):
    folder, _ = shards
    kw = dict(seed=3, rank=1, world_size=2, batch_size=4)
    full = _take(folder, 8, **kw)
    loader = _loader(folder, **kw)
    list(itertools.islice(loader, 3))
    state = loader.state_dict()
    assert state["cursor"] == 3 * 2 * 4 == loader.cursor
    assert {k: state[k] for k in ("seed", "shuffle_buffer", "num_shards", "num_samples")} == {
        "seed": 3, "shuffle_buffer": 10, "num_shards": 8, "num_samples": N}
    again = _loader(folder, **kw)
    again.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert _same(list(itertools.islice(again, 5)), full[3:])
    # world size, workers and micro-batch may change; the position is the same sample count
    other = _loader(folder, seed=3, rank=0, world_size=4, batch_size=2, num_workers=1)
    other.load_state_dict(state)
    assert other.cursor == 24 and next(iter(other))["position"].tolist() == [24, 25]
    # the entry points' `batches` (micro-batches per rank) means batches * world_size * batch_size of this loader
    other.load_state_dict({**state, "batches": 5})
    assert other.cursor == 5 * 4 * 2
    for field, change in (("seed", dict(seed=4)), ("shuffle_buffer", dict(shuffle_buffer=11))):
        with pytest.raises(ValueError, match=rf"^cannot resume .*{field}: saved"):
            _loader(folder, **{**kw, **change}).load_state_dict(state)
    with pytest.raises(ValueError, match="shard_sizes"):
        _loader(folder, **kw).load_state_dict({**state, "shard_sizes": 1})


# --- reading: tar index, corrupt and missing data -----------------------------------------------------------------


def test_tar_index_reads_what_webdataset_streams(tmp_path):
    """Seeking reads the same samples as webdataset's stream: long names (pax and GNU headers), a directory,
    a metadata member, upper-case suffixes; a truncated copy indexes the samples webdataset yields before the cut."""
    deep = "d" * 90 + "/" + "e" * 90  # ustar: split into the prefix and name fields
    members = [("__meta__", b"x"), ("sub/", None), ("sub/a.jpg", b"A" * 700), ("sub/a.cls", b"1"),
               (deep + ".JPG", b"B" * 10), (deep + ".cls", b"2"), ("c.d.jpg", b"C" * 1500), ("c.d.txt", b"t")]
    flat = [("n" * 120 + ".jpg", b"F"), ("n" * 120 + ".cls", b"3")]  # pax `path` record / GNU long name
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for name, data in members + (flat if fmt != tarfile.USTAR_FORMAT else []):
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                else:
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        want = list(wds.tarfile_samples(iter([{"url": str(path)}])))
        index = index_tar(str(path))
        with open(path, "rb") as f:
            assert [read_sample(f.fileno(), index, i, str(path)) for i in range(len(index))] == want
        assert len(want) == (3 if fmt == tarfile.USTAR_FORMAT else 4) and index.problem is None
        assert want[1]["__key__"] == deep and "jpg" in want[1]
        cut = tmp_path / f"cut{fmt}.tar"
        cut.write_bytes(path.read_bytes()[: int(index.ends[2]) - 700])  # inside c.d.jpg
        partial = index_tar(str(cut))
        assert len(partial) == 2 and "truncated" in partial.problem
        assert len(list(wds.tarfile_samples(iter([{"url": str(cut)}]), handler=lambda exc: True))) == 2


def test_corrupt_sample_and_truncated_shard_keep_positions(tmp_path):
    truth = _write(tmp_path, [6, 6, 6], corrupt={"s0x2", "s1x4"})
    shard2 = tmp_path / "train-000002.tar"  # cut in the middle of its third image
    with tarfile.open(shard2) as tf:
        jpg = [m for m in tf.getmembers() if m.name.endswith(".jpg")][2]
    shard2.write_bytes(shard2.read_bytes()[: jpg.offset_data + jpg.size // 2])
    kw = dict(batch_size=3, shuffle_buffer=4)
    batches = _take(tmp_path, 6, **kw)  # one epoch
    order = GlobalOrder([6, 6, 6], seed=0, buffer=4)
    expected = [f"s{j}x{o}" for j, o in zip(*map(np.ndarray.tolist, order.at(range(18))))]
    bad = {"s0x2", "s1x4"} | {f"s2x{i}" for i in range(2, 6)}  # 2 corrupt JPEGs + 4 samples lost to the cut
    for b, batch in enumerate(batches):
        assert batch["image"].shape[0] == 3
        assert batch["label"].tolist() == [truth[k][2] for k in batch["key"]]
        for q, key in enumerate(batch["key"]):
            want = expected[3 * b + q]
            if want in bad:  # replaced by a good sample of the same batch
                assert key in expected[3 * b:3 * b + 3] and key not in bad
            else:  # every good sample at its own position
                assert key == want and batch["position"][q] == 3 * b + q
    assert batches[-1]["n_corrupt"] == len(bad)
    assert [b["n_corrupt"] for b in batches] == sorted(b["n_corrupt"] for b in batches)
    assert _same(batches[2:], _take(tmp_path, 4, start_sample=6, **kw))  # resume stays exact


def test_truncated_gzip_shard_keeps_positions(tmp_path):
    """A local .tar.gz is decompressed into memory; cut short, it gives what webdataset's stream gives of it and
    placeholders for the rest."""
    import gzip

    _write(tmp_path, [6, 6])
    plain = tmp_path / "train-000001.tar"
    cut = tmp_path / "train-000001.tar.gz"
    packed = gzip.compress(plain.read_bytes())
    cut.write_bytes(packed[: len(packed) // 2])
    plain.unlink()
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["splits"]["train"]["shards"][1]["name"] = cut.name
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    kept = [s["__key__"] for s in wds.tarfile_samples(iter([{"url": str(cut)}]), handler=lambda exc: True)
            if "jpg" in s]  # a sample cut inside its image (members: cls, then jpg) has no image: corrupt
    assert 0 < len(kept) < 6
    batches = _take(tmp_path, 4, batch_size=3)  # one epoch
    keys = {k for b in batches for k in b["key"]}
    assert {k for k in keys if k.startswith("s1x")} == set(kept)
    assert batches[-1]["n_corrupt"] == 6 - len(kept)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_with_no_good_sample_copies_the_next_batch(tmp_path, workers):
    """Shard order without buffer (shuffle_buffer=0) puts the 6 corrupt samples of one shard in whole batches:
    those batches copy the rank's next micro-batch, the same way for any worker count."""
    _write(tmp_path, [6, 6, 6], corrupt={f"s1x{i}" for i in range(6)})
    kw = dict(batch_size=3, shuffle_buffer=0, num_workers=workers)
    batches = _take(tmp_path, 12, **kw)  # two epochs
    assert not any(k.startswith("s1x") for batch in batches for k in batch["key"])
    counts = [0] + [batch["n_corrupt"] for batch in batches]
    bad = [b for b in range(12) if counts[b + 1] > counts[b]]
    assert len(bad) == 4 and all(counts[b + 1] - counts[b] == 3 for b in bad)  # 2 whole batches per epoch
    for b in bad:
        donor = next((d for d in range(b + 1, 12) if d not in bad), None)
        if donor is not None:
            assert batches[b]["key"] == batches[donor]["key"]
            assert torch.equal(batches[b]["image"], batches[donor]["image"])
            assert torch.equal(batches[b]["position"], batches[donor]["position"])
    assert _same(batches, _take(tmp_path, 12, batch_size=3, shuffle_buffer=0))


def test_unreadable_shards_raise_instead_of_spinning(tmp_path):
    junk = tmp_path / "junk"
    _write(junk, [4, 4])
    for i in range(2):
        (junk / f"train-{i:06d}.tar").write_bytes(b"not a tar file at all" * 50)
    with pytest.raises(RuntimeError, match="no readable sample"):
        _take(junk, 1)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "j-0.tar").write_bytes(b"not a tar file at all" * 50)
    with pytest.raises(DatasetError, match="no samples"):
        _loader(str(bare / "j-0.tar"))


def test_shipped_sample_streams_gzip_shards_like_seeking_their_copies(tmp_path):
    import gzip

    info = resolve("data/sample")
    for url in info.urls:
        (tmp_path / Path(url).name.removesuffix(".gz")).write_bytes(gzip.decompress(Path(url).read_bytes()))
    plain = DatasetInfo(urls=[str(tmp_path / Path(u).name.removesuffix(".gz")) for u in info.urls],
                        shard_sizes=info.shard_sizes)
    kw = dict(batch_size=16, shuffle_buffer=1000, world_size=2, rank=1)
    assert _same(_take("data/sample", 3, **kw), _take(plain, 3, **kw))


# --- unchanged behaviour ----------------------------------------------------------------------------------------


def test_unlabelled_shards_give_label_minus_one(tmp_path):
    _write(tmp_path, [5, 5], labelled=False)
    assert all((x["label"] == -1).all() for x in _take(tmp_path, 2))


def test_main_process_rng_is_untouched(shards):
    folder, _ = shards
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    _take(folder, 3, num_workers=0)
    assert torch.equal(torch.rand(4), expected)


def test_clear_errors(tmp_path, shards):
    folder, _ = shards
    with pytest.raises(DatasetError, match=r"2 of 10 shard\(s\) not found: .*train-000008.tar, .*train-000009.tar"):
        _loader(str(folder / "train-{000000..000009}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="without dataset.json"):
        _loader(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not found"):
        _loader(tmp_path / "nowhere" / "x.tar")
    with pytest.raises(ValueError, match="start_sample"):
        _loader(folder, start_sample=-1)


def _children():
    import psutil

    return {p.pid for p in psutil.Process().children()}


def test_workers_survive_stop_signals_from_others(tmp_path):
    """Pre-emption signals go to the whole process group (launcher, SLURM, `timeout`): a DataLoader worker must
    survive SIGTERM and SIGUSR1 from another process (its rank saves a checkpoint first); the stream goes on."""
    import subprocess

    _write(tmp_path, [6, 6, 6, 6])
    kw = dict(num_workers=2, shuffle_buffer=0, batch_size=3)
    reference = _take(tmp_path, 6, **kw)
    before = _children()
    loader = iter(_loader(tmp_path, **kw))
    got = [next(loader)]
    workers = sorted(_children() - before)
    assert len(workers) == 2
    for sig in ("TERM", "USR1"):  # sent by another process, as a launcher or scheduler would
        subprocess.run(["kill", f"-{sig}", *map(str, workers)], check=True)
    got += [next(loader) for _ in range(5)]
    assert set(workers) <= _children()
    assert _same(got, reference)
    loader.close()


def test_workers_start_with_the_stop_signals_blocked(tmp_path):
    """A stop signal to the group while the workers are still starting, before their `worker_init_fn` has run, must
    not end them with the default action: they are forked with SIGTERM and SIGUSR1 blocked. Their kernel mask shows
    it (SIGUSR1 stays blocked only through the fork: the init itself merely ignores it); the rank's mask is back."""
    import signal

    _write(tmp_path, [6, 6, 6, 6])
    before = _children()
    loader = iter(_loader(tmp_path, num_workers=2, shuffle_buffer=0, batch_size=3))
    next(loader)
    workers = sorted(_children() - before)
    assert len(workers) == 2
    for pid in workers:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        blocked = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
        assert blocked & (1 << (signal.SIGUSR1 - 1)) and blocked & (1 << (signal.SIGTERM - 1)), hex(blocked)
    assert not {signal.SIGTERM, signal.SIGUSR1} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader.close()


EXIT_WITH_LIVE_WORKERS = r"""
import itertools, sys
sys.path.insert(0, sys.argv[2])
from data.train_stream import build_train_loader
from data.transforms import pretrain_transform
it = iter(build_train_loader(sys.argv[1], batch_size=3, transform=pretrain_transform(8, (0.5,) * 3, (0.25,) * 3),
                             num_workers=2, shuffle_buffer=0))
next(it)
print("exiting with the workers running", flush=True)
"""


def test_interpreter_exit_with_live_workers_does_not_hang(tmp_path):
    """The rank's own shutdown of its workers (`Process.terminate`, e.g. at interpreter exit) must still end them."""
    import subprocess
    import sys

    from helpers_launch import ROOT

    _write(tmp_path, [6, 6, 6, 6])
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS, str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr[-2000:]
