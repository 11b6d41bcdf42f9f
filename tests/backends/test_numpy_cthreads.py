"""The C kernels' worker threads (backends/numpy/cthreads.py), on a small task compiled here:
every slice computed once with its own arguments, on another thread than the caller's once the
worker is awake (before that the caller may take its slice), exactly once when the caller and a
waking worker race for it, with more slices than threads, from two Python threads at once, and
in a forked child; and `address`, the data pointer the kernels are given."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
import pytest

from cnnc.backends.numpy import cc, cthreads, parallel

SOURCE = r"""
#include <pthread.h>
/* out[i] = base + i for i in [lo, hi), and who[lo] = the thread that ran the slice */
void fill(long *out, long *who, long lo, long hi, long base) {
    for (long i = lo; i < hi; i++) out[i] = base + i;
    who[lo] = (long)pthread_self();
}
/* out[i] += 1 for i in [lo, hi): a slice run twice shows */
void bump(long *out, long lo, long hi) {
    for (long i = lo; i < hi; i++) out[i] += 1;
}
long self(void) { return (long)pthread_self(); }
"""


@pytest.fixture(scope="module")
def lib():
    if not cc.available():
        pytest.skip("no C compiler")
    lib = ctypes.CDLL(str(cc.build(SOURCE + cthreads.tasks(("fill", "ppLHl"), ("bump", "pLH")))))
    lib.self.restype = ctypes.c_long
    return lib


def fill(lib, n: int, slices, base=7):
    out, who = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    args = ([[out.ctypes.data, who.ctypes.data, b] for b in base] if isinstance(base, list)
            else [out.ctypes.data, who.ctypes.data, base])
    cthreads.run(cthreads.task(lib, "fill", "ppLHl"), args, slices)
    return out, who


def on_a_worker(lib, tries: int = 40) -> bool:
    """fill over two halves until the second half runs on a worker; each run's output right. A
    worker still waking, or waiting for a core, when the caller is done with its half leaves that
    half to the caller: the halves grow from ~10 µs to ~10 ms until a worker claims one."""
    for n in (1 << 16, 1 << 19, 1 << 22):
        for _ in range(tries):
            out, who = fill(lib, n, [(0, n // 2), (n // 2, n)])
            np.testing.assert_array_equal(out, 7 + np.arange(n))
            assert who[0] == lib.self()  # the caller's slice
            if who[n // 2] not in (0, lib.self()):
                return True
    return False


def test_each_slice_runs_once_on_its_own_thread(lib, two_threads):
    slices = parallel.chunks(1000, float("inf"))
    assert slices == [(0, 500), (500, 1000)]
    assert on_a_worker(lib)


def test_a_slice_runs_once_when_the_caller_and_a_waking_worker_race_for_it(lib, two_threads):
    out = np.zeros(4096, dtype=np.int64)
    task = cthreads.task(lib, "bump", "pLH")
    runs = 0
    for pause in (0.0, 0.0005, 0.001, 0.002, 0.003, 0.005) * 5:  # around the spin's end: asleep or not
        time.sleep(pause * cthreads.SPIN_US / 2000)
        cthreads.run(task, [out.ctypes.data], [(0, 2048), (2048, 4096)])
        runs += 1
        assert (out == runs).all(), f"run {runs}: {np.unique(out)}"


def test_slices_take_their_own_arguments(lib, two_threads):
    out, _ = fill(lib, 10, [(0, 4), (4, 10)], base=[100, 200])
    np.testing.assert_array_equal(out, np.r_[100 + np.arange(4), 200 + np.arange(4, 10)])


def test_more_slices_than_threads_and_a_single_slice(lib, two_threads):
    slices = [(0, 3), (3, 5), (5, 9), (9, 12), (12, 20)]
    out, _ = fill(lib, 20, slices)
    np.testing.assert_array_equal(out, 7 + np.arange(20))
    out, who = fill(lib, 20, [(0, 20)])
    np.testing.assert_array_equal(out, 7 + np.arange(20))
    assert who[0] == lib.self()  # one slice: the caller's thread, no hand-off


def test_two_python_threads_at_once(lib, two_threads):
    """A run that finds the workers busy computes its slices itself: no deadlock, nothing lost."""
    bad = []

    def many():
        for _ in range(300):
            out, _ = fill(lib, 64, [(0, 32), (32, 64)])
            if not (out == 7 + np.arange(64)).all():
                bad.append(out)

    runners = [threading.Thread(target=many) for _ in range(2)]
    for r in runners:
        r.start()
    for r in runners:
        r.join(timeout=60)
    assert not any(r.is_alive() for r in runners) and not bad


def test_workers_sleep_when_idle_and_wake_for_the_next_run(lib, two_threads):
    fill(lib, 100, [(0, 50), (50, 100)])
    time.sleep(3 * cthreads.SPIN_US / 1e6 + 0.05)  # past the spin: the worker waits on its condition
    assert on_a_worker(lib)


def test_a_forked_child_starts_its_own_workers(lib, two_threads):
    fill(lib, 100, [(0, 50), (50, 100)])  # the parent's workers exist
    pid = os.fork()
    if pid == 0:  # the child: its parent's threads are not here
        try:
            os._exit(0 if on_a_worker(lib) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's run did not finish")


def test_without_the_workers_library_python_threads_run_the_slices(lib, two_threads, monkeypatch):
    monkeypatch.setattr(cthreads, "_pool_or_none", lambda: None)
    out, who = fill(lib, 30, [(0, 10), (10, 30)], base=[1, 2])
    np.testing.assert_array_equal(out, np.r_[1 + np.arange(10), 2 + np.arange(10, 30)])
    assert who[10] not in (0, lib.self())  # parallel.py's worker thread


@pytest.mark.parametrize("make", [
    lambda: np.zeros(10, dtype=np.float32),
    lambda: np.arange(100, dtype=np.float64).reshape(10, 10)[3:, 2:],  # a view inside another array
    lambda: np.zeros((4, 5)).T,
    lambda: np.empty(0, dtype=np.float32),
    lambda: np.zeros(3).view(np.recarray),  # a subclass: .ctypes.data
], ids=["array", "view", "transposed", "empty", "subclass"])
def test_address_is_the_arrays_data_pointer(make, monkeypatch):
    a = make()
    assert cthreads._DATA_OFFSET is not None  # found on this NumPy
    assert cthreads.address(a) == a.ctypes.data
    monkeypatch.setattr(cthreads, "_DATA_OFFSET", None)  # where no offset fits: .ctypes.data
    assert cthreads.address(a) == a.ctypes.data
