"""Training stream: disjoint equal-length rank/worker streams, seeding, exact resume, corrupt data, clear errors."""

import io
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data.info import DatasetError, resolve
from data.shard_draws import slot_draws
from data.shuffle_buffer import buffer_shuffle, fast_forward
from data.train_stream import TrainStream, build_train_loader, worker_batches_consumed
from data.transforms import pretrain_transform

SIZES = [5, 9, 6, 12, 7, 8, 10, 4]  # uneven shards
TRANSFORM = pretrain_transform(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(folder: Path, sizes, *, labelled=True, corrupt=()) -> dict[str, tuple[int, int]]:
    """Shards `train-00000k.tar` + dataset.json; returns key -> (shard, label). `corrupt` keys get broken JPEGs."""
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
                truth[key] = (k, (k + i) % 3 if labelled else -1)
        shards.append({"name": name, "num_samples": n})
    meta = {"format": "tessera-wds/1", "splits": {"train": {
        "num_samples": sum(sizes), "num_shards": len(sizes), "num_classes": 3 if labelled else 0,
        "class_names": ["a", "b", "c"] if labelled else None, "labelled": labelled, "shards": shards}}}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return truth


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_shards")
    return folder, _write(folder, SIZES)


def _take(spec, n, **kw):
    kw = {"batch_size": 4, "transform": TRANSFORM, "seed": 0, **kw}
    return list(itertools.islice(build_train_loader(spec, **kw), n))


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
                                    and x["key"] == y["key"] for x, y in zip(a, b))


def test_shard_draws_deal_each_pass_out_disjointly():
    n, slots = 10, 4
    seqs = [list(itertools.islice(slot_draws(n, 7, s, slots), 30)) for s in range(slots)]
    glob = [seqs[t % slots][t // slots] for t in range(120)]  # the global draw order
    for p in range(12):
        assert sorted(glob[p * n:(p + 1) * n]) == list(range(n))  # every pass reads every shard once
    assert glob[:n] != glob[n:2 * n]  # passes are reshuffled
    assert list(itertools.islice(slot_draws(n, 7, 2, slots, start_draw=5), 10)) == seqs[2][5:15]
    assert list(itertools.islice(slot_draws(n, 8, 2, slots), 30)) != seqs[2]


def test_two_ranks_two_workers_disjoint_equal_streams(shards):
    folder, truth = shards
    first_pass = []
    for rank in range(2):
        batches = _take(folder, 16, rank=rank, world_size=2, num_workers=2, shuffle_buffer=0)
        assert len(batches) == 16 and all(b["image"].shape == (4, 3, 8, 8) for b in batches)
        for w in range(2):
            keys = [k for b in batches[w::2] for k in b["key"]]  # rank batch b comes from worker b % 2
            labels = [lab for b in batches[w::2] for lab in b["label"].tolist()]
            assert labels == [truth[k][1] for k in keys]
            order = [truth[k][0] for k in keys]
            runs = [s for s, _ in itertools.groupby(order)]  # shards in the order the slot read them
            assert len(runs) >= 2
            first_pass.append(set(runs[:2]))  # 8 shards / 4 slots: 2 draws each in the first pass
    assert set().union(*first_pass) == set(range(8)) and sum(len(s) for s in first_pass) == 8


def test_same_seed_same_stream_and_different_seed_differs(shards):
    folder, _ = shards
    a = _take(folder, 6, seed=1, shuffle_buffer=10)
    assert _same(a, _take(folder, 6, seed=1, shuffle_buffer=10))
    b = _take(folder, 6, seed=2, shuffle_buffer=10)
    assert [x["key"] for x in a] != [x["key"] for x in b]
    # in-process (num_workers=0) and one worker process give the same stream
    assert _same(a, _take(folder, 6, seed=1, shuffle_buffer=10, num_workers=1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_bitwise(shards, num_workers):
    folder, _ = shards
    kw = dict(seed=3, rank=1, world_size=2, num_workers=num_workers, shuffle_buffer=16)
    full = _take(folder, 11, **kw)
    for k in (3, 6):
        assert _same(full[k:], _take(folder, 11 - k, start_batch=k, **kw))
    loader = build_train_loader(folder, batch_size=4, transform=TRANSFORM, **kw)
    list(itertools.islice(loader, 5))
    state = loader.state_dict()
    assert state["batches"] == 5
    resumed = build_train_loader(folder, batch_size=4, transform=TRANSFORM, **kw)
    resumed.load_state_dict(state)
    assert _same(full[5:], list(itertools.islice(resumed, 6)))
    other = build_train_loader(folder, batch_size=4, transform=TRANSFORM, **{**kw, "seed": 4})
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_buffer_shuffle_fast_forward_matches_the_real_run():
    out = list(buffer_shuffle(range(50), 8, random.Random(1)))
    assert sorted(out) == list(range(50)) and out != list(range(50))  # a permutation: nothing lost or repeated
    full = list(itertools.islice(buffer_shuffle(itertools.count(), 8, random.Random(1)), 40))
    rng = random.Random(1)
    held = fast_forward(8, 25, rng)  # state after 25 outputs, computed on integers only
    resumed = list(itertools.islice(buffer_shuffle(itertools.count(8 + 25), 8, rng, initial=held), 15))
    assert resumed == full[25:]


def test_resume_without_counts_replays_and_matches(shards):
    folder, _ = shards
    info = resolve(folder)
    no_counts = type(info)(urls=info.urls)  # as for remote shards: sizes unknown
    kw = dict(seed=5, num_workers=0, shuffle_buffer=12)
    full = _take(folder, 9, **kw)
    assert _same(full, _take(no_counts, 9, **kw))  # clean shards: same stream with or without counts
    assert _same(full[6:], _take(no_counts, 3, start_batch=6, **kw))


def test_pipe_urls_stream_like_local_files(shards):
    folder, _ = shards
    urls = [f"pipe:cat {folder}/train-{k:06d}.tar" for k in range(len(SIZES))]
    local = type(resolve(folder))(urls=resolve(folder).urls)  # counts unknown on both sides
    assert _same(_take(local, 4, shuffle_buffer=8), _take(urls, 4, shuffle_buffer=8))


def test_resume_with_counts_reads_only_what_it_needs(shards, monkeypatch):
    folder, _ = shards
    opened = []
    real = TrainStream._read_shard

    def spy(self, shard, counters):
        opened.append(shard)
        return real(self, shard, counters)

    monkeypatch.setattr(TrainStream, "_read_shard", spy)
    kw = dict(seed=6, num_workers=0, shuffle_buffer=4)
    full = _take(folder, 13, **kw)
    n_full = len(opened)
    opened.clear()
    assert _same(full[12:], _take(folder, 1, start_batch=12, **kw))
    draws = list(itertools.islice(slot_draws(len(SIZES), 6, 0, 1), 8))  # this slot's shard order
    assert opened[0] in draws[5:] and n_full >= 8
    assert set(opened).isdisjoint(draws[:5])  # the 5 shards read before the buffer window are never reopened


def test_worker_share_of_consumed_batches():
    assert [worker_batches_consumed(5, w, 2) for w in range(2)] == [3, 2]
    assert [worker_batches_consumed(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert worker_batches_consumed(0, 1, 2) == 0


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path):
    truth = _write(tmp_path, [6, 6, 6], corrupt={"s0x2", "s1x4"})
    shard2 = tmp_path / "train-000002.tar"
    shard2.write_bytes(shard2.read_bytes()[:5000])  # truncated mid-sample
    kw = dict(num_workers=0, shuffle_buffer=0, batch_size=4)
    batches = _take(tmp_path, 12, **kw)
    keys = [k for b in batches for k in b["key"]]
    assert "s0x2" not in keys and "s1x4" not in keys and all(b["image"].shape[0] == 4 for b in batches)
    assert all(truth[k][1] == lab for b in batches for k, lab in zip(b["key"], b["label"].tolist()))
    counts = [b["n_corrupt"] for b in batches]
    assert counts == sorted(counts) and counts[-1] >= 3  # 2 bad JPEGs + truncated shard, cumulative
    assert _same(batches[5:], _take(tmp_path, 7, start_batch=5, **kw))  # resume stays exact


def test_truncated_shard_lost_samples_are_counted_once(tmp_path):
    """Issue 12 item 10: one pass over 3 shards (18 samples, 6 batches of 3); n_corrupt = the 2 bad JPEGs + the
    samples the truncated shard lost, no extra count for the read error that cut it short."""
    import tarfile

    _write(tmp_path, [6, 6, 6], corrupt={"s0x2", "s1x4"})
    shard2 = tmp_path / "train-000002.tar"  # cut in the middle of its third image: the tar reader raises an error
    with tarfile.open(shard2) as tf:
        jpg = [m for m in tf.getmembers() if m.name.endswith(".jpg")][2]
    shard2.write_bytes(shard2.read_bytes()[: jpg.offset_data + jpg.size // 2])
    batches = _take(tmp_path, 6, num_workers=0, shuffle_buffer=0, batch_size=3)
    keys = {k for b in batches for k in b["key"]}
    assert len({k for k in keys if k.startswith(("s0x", "s1x"))}) == 10  # the first two shards were read whole
    lost = 6 - len({k for k in keys if k.startswith("s2x")})
    assert lost == 4
    assert batches[-1]["n_corrupt"] == 2 + lost


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
    loader = iter(build_train_loader(tmp_path, transform=TRANSFORM, seed=0, **kw))
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
    loader = iter(build_train_loader(tmp_path, transform=TRANSFORM, seed=0, num_workers=2, shuffle_buffer=0,
                                     batch_size=3))
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


def test_unlabelled_shards_give_label_minus_one(tmp_path):
    _write(tmp_path, [5, 5], labelled=False)
    b = _take(tmp_path, 2, shuffle_buffer=0)
    assert all((x["label"] == -1).all() for x in b)


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
        build_train_loader(str(folder / "train-{000000..000009}.tar"), batch_size=2, transform=TRANSFORM)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="without dataset.json"):
        build_train_loader(tmp_path / "empty", batch_size=2, transform=TRANSFORM)
    with pytest.raises(DatasetError, match="not found"):
        build_train_loader(tmp_path / "nowhere" / "x.tar", batch_size=2, transform=TRANSFORM)
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(2):
        (junk / f"j-{i}.tar").write_bytes(b"not a tar file at all" * 50)
    with pytest.raises(RuntimeError, match="gave no sample"):  # unreadable shards: an error, never a hang
        _take(str(junk / "j-{0..1}.tar"), 1)
