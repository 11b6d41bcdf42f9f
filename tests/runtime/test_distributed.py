"""Data-parallel training under a real `mpiexec -n 2` (MPICH from the `[mpi]` extra): 2 ranks at a
step batch of 16 (8 each) equal 1 process at batch 16, with and without synchronised BatchNorm;
reruns are bit-identical; uneven data runs the same steps on every rank; a killed or stuck rank
ends the job with a message naming it; a run resumes from 2 ranks to 1 and from 1 to 2;
`cnnc bench --ranks` splits the step; a streamed image folder is sharded as well (slow).

Everything is float32 (the backend's only training type), so "equal" is stated as a relative
difference of at most 1e-5 in every parameter and optimizer array (norm of the difference over
the norm of the array, the norm taken as at least 0.01: a conv bias ahead of a BatchNorm has a
true gradient of zero and holds only rounding noise of ~1e-8); the sums are merely taken in
another order, and that is what remains.
Each rank runs with one BLAS/OpenMP thread; every launch has its own timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnc.runtime.checkpoint import read_npz

from conftest import make_data, tiny_net

pytest.importorskip("mpi4py", reason="the [mpi] extra (mpi4py) is not installed")
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install 'cnnc[mpi]' brings MPICH's)")

NO_BN = """\
network plain
input 1x8x8
classes 4
layers:
    conv 6 3x3 pad=1 -> relu -> maxpool 2x2
    conv 8 3x3 pad=1 -> relu -> gap -> dense classes
train:
    optimizer momentum momentum=0.9 weight_decay=1e-4
    lr 0.05
    batch 16
    epochs 2
    seed 4
"""
SYNC_BN = tiny_net(epochs=2).replace("    seed 3\n", "    seed 3\n    sync_bn\n")
LAUNCH_TIMEOUT = 120  # seconds for one launch; a sound one takes a few on a loaded 2-core machine


def _env(timeout: float = 60) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "CNNC_MPI_TIMEOUT": str(timeout)}


def train(ranks: int, net: Path, data: Path | str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`cnnc train` on `ranks` MPI ranks (one plain process for 1)."""
    cmd = [sys.executable, "-m", "cnnc", "train", str(net), "--data", str(data), "-o", str(out), "-q", *extra]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def resume(ranks: int, run: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "cnnc", "train", "--resume", str(run), "-q", *extra]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]


def arrays(run: Path) -> dict[str, np.ndarray]:
    a, _ = read_npz(run / "checkpoint.npz")
    return a


def assert_close(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        scale = max(float(np.linalg.norm(a[k].astype(np.float64))), 0.01)
        diff = float(np.linalg.norm(a[k].astype(np.float64) - b[k]))
        assert diff <= rel * scale, f"{k}: |a - b| = {diff:.3g}, |a| = {scale:.3g}"


def max_rel(a: dict, b: dict) -> float:
    return max(float(np.linalg.norm(a[k].astype(np.float64) - b[k])) / max(float(np.linalg.norm(a[k])), 0.01)
               for k in a)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("distributed")
    (d / "plain.cnn").write_text(NO_BN)
    (d / "bn.cnn").write_text(SYNC_BN)
    (d / "local_bn.cnn").write_text(SYNC_BN.replace("    sync_bn\n", ""))
    make_data(d / "d.npz", n=96)  # 76 training images: 5 steps of 16, the last of 12 (6 a rank)
    return d


@pytest.fixture(scope="module")
def plain_one(work):
    train(1, work / "plain.cnn", work / "d.npz", work / "plain1")
    return work / "plain1"


def test_two_ranks_equal_one_process_without_batchnorm(work, plain_one):
    train(2, work / "plain.cnn", work / "d.npz", work / "plain2")
    assert_close(arrays(plain_one), arrays(work / "plain2"))
    import json
    one = [json.loads(x) for x in (plain_one / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (work / "plain2" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    for h1, h2 in zip(one, two):  # the metrics are the whole job's, not rank 0's part
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
        assert h2["test_loss"] == pytest.approx(h1["test_loss"], rel=1e-5)
        assert h2["test_accuracy"] == h1["test_accuracy"]


def test_sync_bn_two_ranks_equal_one_process_and_reruns_are_bit_identical(work):
    train(1, work / "bn.cnn", work / "d.npz", work / "bn1")
    train(2, work / "bn.cnn", work / "d.npz", work / "bn2")
    train(2, work / "bn.cnn", work / "d.npz", work / "bn2again")
    one, two, again = arrays(work / "bn1"), arrays(work / "bn2"), arrays(work / "bn2again")
    assert_close(one, two)  # running statistics included: they are the global batch's
    for k in two:
        assert np.array_equal(two[k], again[k]), k


@pytest.mark.slow
def test_without_sync_bn_two_ranks_train_another_network(work):
    # Each rank normalises its own 8 images: measurably another training than the one above.
    train(1, work / "local_bn.cnn", work / "d.npz", work / "bnl1")
    train(2, work / "local_bn.cnn", work / "d.npz", work / "bnl2")
    assert max_rel(arrays(work / "bnl1"), arrays(work / "bnl2")) > 1e-3


def test_uneven_data_runs_the_same_steps_on_every_rank(work):
    make_data(work / "odd.npz", n=94)  # 75 training images: 38 a rank after repeating one
    train(2, work / "plain.cnn", work / "odd.npz", work / "odd2", "--epochs", "1")
    _, meta = read_npz(work / "odd2" / "checkpoint.npz")
    assert meta["step"] == 5 and meta["epoch"] == 1


def test_resume_from_two_ranks_to_one_and_from_one_to_two(work, plain_one):
    train(2, work / "plain.cnn", work / "d.npz", work / "r21", "--epochs", "1")
    resume(1, work / "r21", "--epochs", "2")
    assert_close(arrays(plain_one), arrays(work / "r21"))
    train(1, work / "plain.cnn", work / "d.npz", work / "r12", "--epochs", "1")
    resume(2, work / "r12", "--epochs", "2")
    assert_close(arrays(plain_one), arrays(work / "r12"))


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of `rank` among the launcher's descendants (its environment says PMI_RANK)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    todo, found = [launcher], None
    while todo:
        pid = todo.pop()
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            env = []
        if f"PMI_RANK={rank}".encode() in env and (Path("/proc") / str(pid) / "cmdline").read_bytes().find(b"cnnc") >= 0:
            found = pid
        todo += children.get(pid, [])
    return found


@pytest.mark.parametrize("how", ["killed", "stuck"])
def test_a_dead_or_stuck_rank_ends_the_job_naming_it(work, how):
    net = work / "long.cnn"
    net.write_text(NO_BN.replace("epochs 2", "epochs 1000"))
    run = work / f"long-{how}"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "cnnc", "train", str(net), "--data", str(work / "d.npz"),
           "-o", str(run), "-q"]
    proc = subprocess.Popen(cmd, env=_env(timeout=8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    victim, out, err = None, "", ""
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() or (victim := _rank_pid(proc.pid, 1)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.2)
        os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=45)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    assert took < 40
    said = out + err
    assert f"rank 1 pid {victim} on " in said, said[-2000:]  # the job's first line ties pids to ranks
    if how == "stuck":  # our timeout: rank 0 names the rank that never arrived, or arrived and fell silent
        assert ("rank 1 never reached it (dead or stuck)" in said
                or "rank 1 reached it but has been silent" in said), said[-2000:]
    else:  # MPICH's launcher sees the death at once and names a process of the job by its pid
        assert "BAD TERMINATION" in said and "Killed (signal 9)" in said, said[-2000:]
        named = int(re.search(r"PID (\d+) RUNNING AT", said).group(1))
        # it names the first process, in rank order, whose end its cleanup did not cause; under load its
        # cleanup's SIGKILL can reach the survivor before the survivor's exit is seen, and then it is the one
        # named: either way the job's first line says which rank that pid was
        assert f"pid {named} on " in said, said[-2000:]


def test_bench_ranks_splits_the_step_and_allreduces_every_gradient(work):
    from cnnc.runtime.model import Model
    import json
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "cnnc", "bench", str(work / "plain.cnn"), "--batch", "16",
           "--ranks", "--repeats", "3", "--json"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    out = json.loads(lines[0])
    assert out["ranks"] == 2 and out["batch_per_rank"] == 8
    m = Model.load(work / "plain.cnn")
    trainable = [k for k, t in m.trainable().items() if t]
    assert out["gradient_mb"] == pytest.approx(sum(m.params[k].size * 4 for k in trainable) / 2**20)
    assert out["ms"]["compute"] > 0 and out["ms"]["allreduce"] > 0 and out["ms"]["waiting"] >= 0
    assert out["ms_per_step"] == pytest.approx(sum(out["ms"].values()))


@pytest.mark.slow  # ~20 s on the loaded machine; the in-memory tests above cover the same sharding rule
def test_a_streamed_image_folder_is_sharded_too(tmp_path):
    pytest.importorskip("PIL")
    import photos
    photos.photo_folder(tmp_path / "set", per_class=8, classes=3, max_side=48)  # 18 training photos
    net = tmp_path / "photonet.cnn"
    net.write_text("network photonet\ninput 3x16x16\nclasses 3\nlayers:\n    conv 6 3x3 pad=1 -> relu -> maxpool 2x2\n"
                   "    conv 8 3x3 pad=1 -> relu -> gap -> dense classes\ntrain:\n    optimizer momentum momentum=0.9\n"
                   "    lr 0.05\n    batch 8\n    epochs 2\n    seed 11\n    resize 20\n    crop 16 random\n    flip\n"
                   "    workers 0\n")
    data = f"imagefolder:{tmp_path / 'set'}"
    train(1, net, data, tmp_path / "one")
    train(2, net, data, tmp_path / "two")  # every rank reads each batch and keeps its half
    assert_close(arrays(tmp_path / "one"), arrays(tmp_path / "two"))


def test_ctrl_c_stops_every_rank_at_the_same_batch_with_a_checkpoint(work):
    net = work / "long.cnn"
    net.write_text(NO_BN.replace("epochs 2", "epochs 1000"))
    run = work / "long-ctrl-c"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "cnnc", "train", str(net), "--data", str(work / "d.npz"),
           "-o", str(run)]
    proc = subprocess.Popen(cmd, env=_env(timeout=30), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # the launcher passes it to every rank
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (out + err)[-2000:]
    assert "interrupted" in out + err
    _, meta = read_npz(run / "checkpoint.npz")
    assert meta["epoch"] >= 1 and meta["step"] == 5 * meta["epoch"] + meta["cursor"]
