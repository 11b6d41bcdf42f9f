"""Streamed image folders (runtime/images.py) on real photos: the index of each layout, modes
converted, bad files skipped deterministically or refused, batches and whole training runs the
same with any number of workers, bit-exact resume inside an epoch, a dead worker named with
nothing left behind, and memory bounded whatever the folder's size."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import CnncError
from cnnc.runtime import api, images
from cnnc.runtime.checkpoint import read_npz

import photos
from conftest import run_cli

pytest.importorskip("PIL")

NET = """\
network photonet
input 3x16x16
classes 3
layers:
    conv 6 3x3 pad=1 -> relu -> maxpool 2x2
    conv 8 3x3 pad=1 -> relu -> gap -> dense classes
train:
    optimizer momentum momentum=0.9
    lr 0.05
    batch 8
    epochs 2
    seed 11
    resize 20
    crop 16 random
    flip
"""

# resize the short side to 20, a random 16x16 crop, mirrored half the time; normalised with the
# mean and std measured on the training images
CONFIG = TrainConfig(seed=3, batch=4, resize=20, crop_size=16, crop_mode="random", flip=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """36 photos of 3 classes in JPEG, PNG and WebP, plus one truncated JPEG."""
    root = tmp_path_factory.mktemp("photos") / "set"
    photos.photo_folder(root, per_class=12, classes=3, max_side=64)
    photos.write_truncated_jpeg(root / "01_flower" / "0005b.jpg")
    return root


def _leftovers(pool_or_pids):
    return [pid for pid in pool_or_pids if os.path.exists(f"/proc/{pid}") and
            open(f"/proc/{pid}/status").read().find("State:\tZ") < 0]


def test_index_of_each_layout(tmp_path):
    for split in ("train", "val"):
        for c in ("b", "a"):
            (tmp_path / "tv" / split / c / "sub").mkdir(parents=True)
            for i in range(3):
                (tmp_path / "tv" / split / c / ("sub" if i else "") / f"{i}.jpg").write_bytes(b"x")
    (tmp_path / "tv" / "train" / "a" / "notes.txt").write_text("not an image")
    s = images.index_images(tmp_path / "tv")
    assert s.class_names == ("a", "b") and s.classes == 2
    assert s.train.paths == ["a/0.jpg", "a/sub/1.jpg", "a/sub/2.jpg", "b/0.jpg", "b/sub/1.jpg", "b/sub/2.jpg"]
    assert list(s.train.labels) == [0, 0, 0, 1, 1, 1] and s.test.root.endswith("val")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "train.txt").write_text("# path label\nimgs/x 1.jpg 2\nimgs/y.png 0\n\n")
    (tmp_path / "list" / "val.txt").write_text("imgs/z.png 1\n")
    s = images.index_images(tmp_path / "list" / "train.txt")
    assert s.train.paths == ["imgs/x 1.jpg", "imgs/y.png"] and list(s.train.labels) == [2, 0]
    assert s.test.paths == ["imgs/z.png"] and s.classes == 3
    (tmp_path / "list" / "bad.txt").write_text("imgs/x.jpg cat\n")
    with pytest.raises(CnncError, match=r"bad.txt:1: expected `relative/path label`"):
        images.index_images(tmp_path / "list" / "bad.txt")
    flat = images.index_images(tmp_path / "tv" / "train")  # no val: the stratified 80/20 split
    assert len(flat.train) + len(flat.test) == 6 and sorted(flat.test.labels) == [0, 1]


def test_unusual_modes_are_converted(tmp_path):
    ref = np.asarray(images.open_image(str(photos.write_mode(tmp_path / "ref.png", "RGB")), "RGB"), np.int16)
    grey = np.asarray(images.open_image(str(photos.write_mode(tmp_path / "l.png", "L")), "L"), np.int16)
    sixteen = images.open_image(str(photos.write_mode(tmp_path / "i16.png", "I;16")), "L")
    assert sixteen.mode == "L" and np.array_equal(np.asarray(sixteen), grey)  # 257·v back to v
    rgba = images.open_image(str(photos.write_mode(tmp_path / "rgba.png", "RGBA")), "RGB")
    assert rgba.mode == "RGB" and np.array_equal(np.asarray(rgba), ref)
    la = np.asarray(images.open_image(str(photos.write_mode(tmp_path / "la.png", "LA")), "RGB"), np.int16)
    assert la.shape == ref.shape and np.array_equal(la[..., 0], grey)
    cmyk = np.asarray(images.open_image(str(photos.write_mode(tmp_path / "c.jpg", "CMYK", "JPEG")), "RGB"), np.int16)
    assert cmyk.shape == ref.shape and np.abs(cmyk - ref).mean() < 12  # JPEG loss, in CMYK
    pal = np.asarray(images.open_image(str(photos.write_mode(tmp_path / "p.png", "P")), "RGB"), np.int16)
    assert pal.shape == ref.shape and np.abs(pal - ref).mean() < 12  # 32 colours
    for make, reason in ((photos.write_truncated_jpeg, "truncated"), (photos.write_zero_bytes, "0 bytes"),
                         (photos.write_bomb_png, "decompression bomb")):
        with pytest.raises(images.BadImage, match=reason):
            images.open_image(str(make(tmp_path / f"bad{make.__name__}.png")), "RGB")


def test_jpeg_decoding_uses_draft_when_the_target_is_smaller(tmp_path):
    from PIL import Image
    img = Image.fromarray(photos.photos()["china"][:300, :400])
    img.save(tmp_path / "a.jpg", quality=90)
    img.save(tmp_path / "a.png")
    assert images.open_image(str(tmp_path / "a.jpg"), "RGB").size == (400, 300)
    assert images.open_image(str(tmp_path / "a.jpg"), "RGB", (64, 64)).size == (100, 75)  # DCT scale 1/4
    assert images.open_image(str(tmp_path / "a.jpg"), "L", (150, 150)).size == (200, 150)  # 1/2
    assert images.open_image(str(tmp_path / "a.png"), "RGB", (64, 64)).size == (400, 300)  # JPEG only


def test_bad_images_are_replaced_by_the_next_good_one_or_refused(tmp_path):
    good = photos.photo_folder(tmp_path / "f", per_class=3, classes=2, max_side=40)
    photos.write_zero_bytes(tmp_path / "f" / "00_china" / "0000a.png")
    photos.write_bomb_png(tmp_path / "f" / "01_flower" / "0002a.png")
    paths = sorted(str(p.relative_to(tmp_path / "f")) for p in (tmp_path / "f").glob("*/*"))
    index = images.ImageIndex(str(tmp_path / "f"), paths, np.array([0, 0, 0, 0, 1, 1, 1, 1]), "f")
    assert paths[1].endswith("0000a.png") and paths[7].endswith("0002a.png")
    config = CONFIG.model_copy(update={"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    split = images.Split(index, config, (3, 16, 16), True, "RGB", 5, "skip")
    transform = split.transform
    x, y = np.zeros((8, 3, 16, 16), np.float32), np.zeros(8, np.int64)
    bad = images.fill_batch(split, 2, np.arange(8), x, y)
    assert sorted(os.path.basename(p) for p, _ in bad) == ["0000a.png", "0002a.png"]
    from PIL import Image
    for row, sub, label in ((1, 2, 0), (7, 0, 0)):  # each became the next readable sample, wrapping
        with Image.open(index.path(sub)) as im:
            want = transform(im.convert("RGB"), np.random.default_rng([5, 2, row]))  # row's generator
        assert np.array_equal(x[row], want) and y[row] == label
    with Image.open(index.path(3)) as im:
        assert np.array_equal(x[3], transform(im.convert("RGB"), np.random.default_rng([5, 2, 3])))
    assert len(good) == 6
    with pytest.raises(CnncError, match=r"bad image .*0000a.png: an empty file"):
        images.fill_batch(images.Split(index, config, (3, 16, 16), True, "RGB", 5, "error"), 2, np.arange(8), x, y)


def test_batches_do_not_depend_on_the_worker_count(folder):
    def run(workers):
        ds = images.load_streamed("s", folder, (3, 16, 16), 3, CONFIG, workers=workers)
        try:
            got = [(x.copy(), y.copy()) for e in (0, 1) for x, y in ds.train_batches(e)]
            tail = [x.copy() for x, _ in ds.train_batches(1, start=5)]
            test = [(x.copy(), y.copy()) for x, y in ds.test_batches()]
            return got, tail, test, dict(ds.bad_images)
        finally:
            ds.close()
    ref, ref_tail, ref_test, ref_bad = run(0)
    assert len(ref) == 2 * 8 and len(ref_bad) == 1 and "0005b.jpg" in next(iter(ref_bad))
    assert not np.array_equal(ref[0][0], ref[8][0])  # epochs differ: order and augmentation
    got, tail, test, bad = run(3)
    assert bad == ref_bad
    for (a, ya), (b, yb) in zip(ref + ref_test, got + test, strict=True):
        assert np.array_equal(a, b) and np.array_equal(ya, yb)
    for (a, _), b in zip(ref[8 + 5:], tail, strict=True):  # resuming at batch 5 of epoch 1
        assert np.array_equal(a, b)


def test_ten_crop_evaluation_batches_fit_the_training_slots(folder):
    """Ten crops of each image make samples 10x larger: they come in smaller batches (as many as a
    training batch's slot holds), so the ring is sized by training, and still whatever the workers."""
    config = CONFIG.model_copy(update={"batch": 20, "eval_crop": "ten"})
    got = {}
    for workers in (0, 2):
        ds = images.load_streamed("s", folder, (3, 16, 16), 3, config, workers=workers)
        try:
            got[workers] = [(x.copy(), y.copy()) for x, y in ds.test_batches()]
            assert ds.pool.ring_bytes == ds.pool.slots * (20 * 3 * 16 * 16 * 4 + 20 * 8)
        finally:
            ds.close()
    assert {x.shape for x, _ in got[0][:-1]} == {(2, 10, 3, 16, 16)}
    assert sum(len(y) for _, y in got[0]) == len(ds.test_y)
    for (a, ya), (b, yb) in zip(got[0], got[2], strict=True):
        assert np.array_equal(a, b) and np.array_equal(ya, yb)


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
    """One training run with one worker: the reference."""
    tmp = tmp_path_factory.mktemp("runs")
    net = tmp / "photonet.cnn"
    net.write_text(NET)
    result = api.train(net, data=f"imagefolder:{folder}", run_dir=tmp / "w1", progress=False, workers=1)
    return net, result, read_npz(tmp / "w1" / "checkpoint.npz")


def _same_checkpoint(a, b):
    (wa, ma), (wb, mb) = a, b
    assert set(wa) == set(wb)
    for k in wa:  # parameters and optimizer state
        assert np.array_equal(wa[k], wb[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(ma["history"]) == strip(mb["history"])


def test_same_checkpoint_with_1_2_and_4_workers(folder, straight, tmp_path):
    net, result, ref = straight
    assert result.epochs == 2 and result.bad_images == 1
    assert [h["bad_images"] for h in ref[1]["history"]] == [1, 1]
    measured = ref[1]["config"]
    assert len(measured["mean"]) == 3 and all(0 < v < 1 for v in measured["mean"] + measured["std"])
    for workers in (2, 4):
        r = api.train(net, data=f"imagefolder:{folder}", run_dir=tmp_path / f"w{workers}", progress=False,
                      workers=workers)
        assert r.bad_images == 1
        _same_checkpoint(ref, read_npz(tmp_path / f"w{workers}" / "checkpoint.npz"))


def test_resume_inside_an_epoch_is_bit_exact(folder, straight, tmp_path):
    net, _, ref = straight
    trainer, _ = api.prepare(net, data=f"imagefolder:{folder}", run_dir=tmp_path / "r", progress=False, workers=2)
    step = trainer.optimizer.step

    def step_then_ctrl_c(grads, lr):  # a real SIGINT during the 6th optimizer step (epoch 2, batch 2)
        step(grads, lr)
        if trainer.step == 5:
            signal.raise_signal(signal.SIGINT)
    trainer.optimizer.step = step_then_ctrl_c
    pids = []
    spawn = trainer.data.pool._start

    def start():  # note the workers, to check none outlives the run
        spawn()
        pids.extend(p.pid for p in trainer.data.pool._live[1])
    trainer.data.pool._start = start
    result = api.run(trainer)
    assert result.interrupted and trainer.data.pool._live is None and pids and not _leftovers(pids)
    meta = read_npz(tmp_path / "r" / "checkpoint.npz")[1]
    assert (meta["epoch"], meta["cursor"], meta["step"]) == (1, 2, 6)
    api.train(resume=tmp_path / "r", progress=False, workers=3)
    _same_checkpoint(ref, read_npz(tmp_path / "r" / "checkpoint.npz"))


def test_a_dead_worker_is_named_and_nothing_is_left_behind(folder):
    ds = images.load_streamed("s", folder, (3, 16, 16), 3, CONFIG, workers=2)
    batches = ds.train_batches(0)
    next(batches)
    shm, procs = ds.pool._live[0], ds.pool._live[1]
    pids = [p.pid for p in procs]
    os.kill(pids[1], signal.SIGKILL)
    time.sleep(0.3)
    with pytest.raises(CnncError, match=rf"image worker 1 \(pid {pids[1]}\) was killed by signal SIGKILL"):
        for _ in batches:
            pass
    assert ds.pool._live is None and not _leftovers(pids)
    assert not os.path.exists(f"/dev/shm/{shm.name.lstrip('/')}")


def _rss(pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_memory_stays_bounded_by_the_ring_not_the_folder(tmp_path):
    """Bounded size: 200 photos up to 400 px through 2 workers. Each worker's peak stays under a
    fixed 160 MiB and the main process grows by less than the ring plus 32 MiB, while the
    decoded folder would take 200 x 400 x 300 x 3 x 4 bytes = 288 MB as float32."""
    photos.photo_folder(tmp_path / "f", per_class=50, classes=4, max_side=400, formats=("JPEG",))
    ds = images.load_streamed("s", tmp_path / "f", (3, 64, 64), 4,
                              TrainConfig(batch=4, resize=72, crop_size=64, crop_mode="random", flip=True), workers=2)
    before = peak = _rss()
    try:
        for _ in range(2):
            for _x, _y in ds.train_batches(0):
                peak = max(peak, _rss())
    finally:
        ds.close()
    assert len(ds.pool.worker_peaks) == 2 and max(ds.pool.worker_peaks.values()) < 160 << 20
    assert peak - before < ds.pool.ring_bytes + (32 << 20)


def test_cnnc_train_and_eval_report_bad_images(folder, tmp_path):
    net = tmp_path / "photonet.cnn"
    net.write_text(NET.replace("epochs 2", "epochs 1\n    on_bad_image skip\n    workers 0"))
    r = run_cli("train", str(net), "--data", f"imagefolder:{folder}", "-o", str(tmp_path / "run"))
    assert r.code == 0, r.err
    assert "1 bad image(s) skipped" in r.out and "skipped bad image" in r.err and "0005b.jpg" in r.err
    e = run_cli("eval", str(net), "--checkpoint", str(tmp_path / "run" / "checkpoint.npz"), "--workers", "1")
    assert e.code == 0, e.err
    held_out = len(images.index_images(folder, seed=11).test)  # 20% of each class, stratified
    assert f"({held_out} images)" in e.out
    net.write_text(NET.replace("epochs 2", "epochs 1\n    on_bad_image error"))
    r = run_cli("train", str(net), "--data", f"imagefolder:{folder}", "-o", str(tmp_path / "run2"), "--workers", "2")
    assert r.code != 0 and "bad image" in r.err and "0005b.jpg" in r.err and "Traceback" not in r.err
    net.write_text(NET.replace("epochs 2", "on_bad_image drop"))
    r = run_cli("check", str(net))
    assert r.code != 0 and "unknown on_bad_image `drop`" in r.err


def _session_members(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session
                found.append(int(entry))
    return found


def test_ctrl_c_in_a_terminal_stops_workers_and_frees_shared_memory(folder, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: the run checkpoints
    and exits 130, no process of it is left, no shared-memory segment stays in /dev/shm."""
    import subprocess
    import sys
    net = tmp_path / "photonet.cnn"
    net.write_text(NET.replace("epochs 2", "epochs 1000"))
    proc = subprocess.Popen([sys.executable, "-m", "cnnc", "train", str(net), "--data", f"imagefolder:{folder}",
                             "--workers", "2", "-o", str(tmp_path / "run")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stderr:
            if "initial loss" in line:
                break
        time.sleep(0.5)
        ring = [n for n in os.listdir("/dev/shm") if n.startswith(f"{images.SHM_PREFIX}{proc.pid}-")]
        assert len(ring) == 1 and len(_session_members(proc.pid)) >= 3  # the run, its forkserver, 2 workers
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert out.startswith("interrupted: ") and (tmp_path / "run" / "checkpoint.npz").exists()
    deadline = time.monotonic() + 5
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session_members(proc.pid)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{images.SHM_PREFIX}{proc.pid}-")]
