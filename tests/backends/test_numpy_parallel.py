"""The NumPy backend's thread split (backends/numpy/parallel.py): slices, and the scope in which a
pass over fewer images than threads hands the threads to BLAS."""

from __future__ import annotations

import pytest

from cnnc.backends.numpy import blas, parallel


def test_chunks_split_the_batch_only_for_enough_work(two_threads):
    assert parallel.chunks(5, parallel.MIN_WORK) == [(0, 2), (2, 5)]
    assert parallel.chunks(5, parallel.MIN_WORK - 1) == [(0, 5)]
    assert parallel.chunks(1, float("inf")) == [(0, 1)]
    assert parallel.chunks(5, 10, minimum=10) == [(0, 2), (2, 5)]  # the C kernels' own threshold


def test_a_batch_smaller_than_the_threads_hands_them_to_blas(two_threads):
    with parallel.blas_threads_for(1):
        assert parallel.get_threads() == 1 and blas.get_threads() == 2
        assert parallel.chunks(8, float("inf")) == [(0, 8)]  # our kernels run unsplit
        with parallel.blas_threads_for(1):  # nested: nothing changes, nothing is restored early
            assert parallel.get_threads() == 1 and blas.get_threads() == 2
        assert parallel.get_threads() == 1 and blas.get_threads() == 2
    assert parallel.get_threads() == 2 and blas.get_threads() == 1
    with parallel.blas_threads_for(2):  # as many images as threads: the batch is split as before
        assert parallel.get_threads() == 2 and blas.get_threads() == 1
    with pytest.raises(ZeroDivisionError):  # restored when the pass fails
        with parallel.blas_threads_for(1):
            1 / 0
    assert parallel.get_threads() == 2 and blas.get_threads() == 1
