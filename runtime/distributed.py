"""Communicators for data-parallel training, after ChainerMN: one interface, one process by default.

`world()` reads the MPI launcher's environment (PMI_RANK/PMI_SIZE from MPICH's hydra,
OMPI_COMM_WORLD_RANK/SIZE from Open MPI): under `mpiexec -n N` it returns an MPI communicator
of N ranks (mpi4py, imported only then: the `[mpi]` extra), otherwise a single-process one whose
collectives return their input, so the one-process path runs no MPI code at all.

Every collective is nonblocking and polled against a deadline (CNNC_MPI_TIMEOUT seconds, 300 by
default): a rank that is dead or stuck ends the whole job with a message naming it (MPI Abort
after printing), never a silent hang. To name it, each rank tells every peer, with a tiny
point-to-point message, the number of the collective it has reached, and repeats it every second
while it waits; a rank that times out names the peers that never reported reaching that one, or
that have been silent while waiting in it (a stopped process).

Gradients travel as float32 buffers packed into buckets of about 25 MB, in the order given
(the trainer gives reverse parameter order, the order backward produces them), all ranks the
same order; the sums are written back in place.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time

import numpy as np

from cnnc.dsl.errors import CnncError

BUCKET_BYTES = 25 * 1024 * 1024
DEFAULT_TIMEOUT = 300.0
HEARTBEAT = 1.0  # seconds between a waiting rank's signs of life
_ARRIVE_TAG = 7301


def _env_rank_size() -> tuple[int, int]:
    for r, s in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                 ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE")):
        if os.environ.get(r) is not None and os.environ.get(s) is not None:
            try:
                return int(os.environ[r]), int(os.environ[s])
            except ValueError:
                break
    return 0, 1


def timeout_seconds() -> float:
    text = os.environ.get("CNNC_MPI_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise CnncError(f"CNNC_MPI_TIMEOUT={text!r} is not a number of seconds") from None
    if not value > 0:
        raise CnncError(f"CNNC_MPI_TIMEOUT={text!r} must be positive")
    return value


def pack(obj) -> bytes:
    """JSON values and NumPy arrays (in dicts and lists) as bytes, without pickle: a JSON document
    in which each array is {"__array__": i, "dtype": ..., "shape": ...}, its length, then the arrays' bytes."""
    arrays: list[np.ndarray] = []

    def walk(v):
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "biuf":
                raise TypeError(f"cannot broadcast an array of {v.dtype}")
            arrays.append(np.ascontiguousarray(v))
            return {"__array__": len(arrays) - 1, "dtype": v.dtype.str, "shape": list(v.shape)}
        if isinstance(v, dict):
            return {str(k): walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    doc = json.dumps(walk(obj), allow_nan=False).encode("utf-8")
    return len(doc).to_bytes(8, "little") + doc + b"".join(a.tobytes() for a in arrays)


def unpack(data: bytes):
    """The value `pack` wrote (lists come back as lists)."""
    size = int.from_bytes(data[:8], "little")
    doc = json.loads(data[8:8 + size].decode("utf-8"))
    offset = 8 + size

    def walk(v):
        nonlocal offset
        if isinstance(v, dict) and "__array__" in v:
            dtype = np.dtype(v["dtype"])
            if dtype.kind not in "biuf":
                raise CnncError(f"a broadcast array of {dtype}: not what cnnc sends")
            count = int(np.prod(v["shape"], dtype=np.int64))
            a = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(v["shape"]).copy()
            offset += a.nbytes
            return a
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(doc)


class Communicator:
    """One process: rank 0 of 1. Collectives return their input unchanged."""

    rank = 0
    size = 1

    def bcast(self, obj, root: int = 0):
        """JSON values and NumPy arrays (a dict of arrays too), from `root` to every rank (see `pack`)."""
        return obj

    def allreduce(self, buffers: list[np.ndarray]) -> None:
        """Sum float arrays over the ranks, in place."""

    def allreduce_array(self, a: np.ndarray) -> np.ndarray:
        """The sum over ranks of a small array (a copy)."""
        return np.array(a, copy=True)

    def barrier(self, what: str = "barrier") -> None:
        pass

    def abort(self, message: str) -> None:
        raise CnncError(message)


class MpiCommunicator(Communicator):
    """The MPI world through mpi4py, with every collective bounded by a timeout."""

    def __init__(self, timeout: float | None = None):
        try:
            from mpi4py import MPI
        except ImportError:
            raise CnncError("running under mpiexec needs mpi4py", hint="pip install 'cnnc[mpi]'") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout if timeout is not None else timeout_seconds()
        self.seq = 0  # collectives entered
        self.reached = {p: 0 for p in range(self.size) if p != self.rank}  # the last each peer reported
        self._received = dict.fromkeys(self.reached, 0)  # arrival messages received from each peer
        self._sent = 0  # arrival messages sent to each peer
        self.heard = dict.fromkeys(self.reached, time.perf_counter())  # when each peer was last heard from
        self._sends: list = []
        self.seconds = 0.0  # time spent inside collectives (for bench)
        # Before mpi4py finalizes MPI at exit: every arrival message received (a rank leaving unreceived
        # messages behind takes its peers down with it), and the output flushed
        atexit.register(self.close)

    # ---- liveness bookkeeping
    def _enter(self) -> None:
        self.seq += 1
        self._announce()

    def _announce(self) -> None:
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        for p in self.reached:
            buf = np.array([self.seq], dtype=np.int64)
            self._sends.append((self.comm.Isend(buf, dest=p, tag=_ARRIVE_TAG), buf))
        self._sent += 1
        self._drain()

    def _drain(self) -> None:
        status = self.MPI.Status()
        buf = np.empty(1, dtype=np.int64)
        while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=_ARRIVE_TAG, status=status):
            src = status.Get_source()
            self.comm.Recv(buf, source=src, tag=_ARRIVE_TAG)
            self.reached[src] = max(self.reached[src], int(buf[0]))
            self._received[src] += 1
            self.heard[src] = time.perf_counter()

    def _wait(self, requests: list, what: str) -> None:
        start = time.perf_counter()
        deadline = start + self.timeout
        pause = 0.0
        pending = list(requests)
        beat = start + HEARTBEAT
        while pending:
            pending = [r for r in pending if not r.Test()]
            if not pending:
                break
            now = time.perf_counter()
            if now > beat:  # still here: a sign of life for the peers' timeout messages
                self._announce()
                beat = now + HEARTBEAT
            if now > deadline:
                self._drain()
                silent_for = min(3 * HEARTBEAT, self.timeout / 2)
                missing = [p for p, s in self.reached.items() if s < self.seq]
                silent = [p for p, s in self.reached.items() if s >= self.seq and now - self.heard[p] > silent_for]
                if missing:
                    who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never reached it"
                    who += " (dead or stuck)"
                elif silent:
                    who = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} reached it but "
                           f"{'have' if len(silent) > 1 else 'has'} been silent for {silent_for:g} s (stuck)")
                else:
                    who = "every rank reached it and is alive, yet it did not complete"
                self.abort(f"{what} (collective #{self.seq}) did not complete within {self.timeout:g} s on rank "
                           f"{self.rank} of {self.size}: {who}; ending the job "
                           "(CNNC_MPI_TIMEOUT sets the limit)")
            # MPI moves data only while Test is called: poll flat out at first (a transfer in progress),
            # then sleep, so that a rank waiting long on a shared core leaves it to the one computing.
            if now - start > 0.05:
                time.sleep(pause)
                pause = min(2e-3, pause + 5e-5)
        self.seconds += time.perf_counter() - start

    def close(self) -> None:
        """Receive the arrival messages still on their way, then let MPI finalize."""
        _flush()
        sent = np.array([self._sent], dtype=np.int64)
        everyone = np.empty(self.size, dtype=np.int64)
        self._wait([self.comm.Iallgather(sent, everyone)], "the closing exchange")
        buf = np.empty(1, dtype=np.int64)
        for p in self.reached:
            for _ in range(int(everyone[p]) - self._received[p]):
                self.comm.Recv(buf, source=p, tag=_ARRIVE_TAG)
        self.MPI.Request.Waitall([r for r, _ in self._sends])
        self._sends = []
        _flush()

    def abort(self, message: str) -> None:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        # the launcher forwards a rank's stderr through its proxy, and Abort tears the proxies down: give
        # it a moment to pass the message on, or the job ends without saying why (seen under MPICH's hydra)
        time.sleep(1.0)
        self.comm.Abort(1)

    # ---- collectives
    def barrier(self, what: str = "barrier") -> None:
        self._enter()
        self._wait([self.comm.Ibarrier()], what)

    def bcast(self, obj, root: int = 0):
        self._enter()
        data = pack(obj) if self.rank == root else b""
        n = np.array([len(data)], dtype=np.int64)
        self._wait([self.comm.Ibcast(n, root=root)], "broadcast")
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self._wait([self.comm.Ibcast(buf, root=root)], "broadcast")
        return obj if self.rank == root else unpack(buf.tobytes())

    def allreduce_array(self, a: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(a).copy()
        self._enter()
        self._wait([self.comm.Iallreduce(self.MPI.IN_PLACE, out, op=self.MPI.SUM)], "allreduce")
        return out

    def allreduce(self, buffers: list[np.ndarray]) -> None:
        self._enter()
        plan = buckets(buffers)
        flats = [np.concatenate([buffers[i].reshape(-1) for i in group]) for group in plan]
        requests = [self.comm.Iallreduce(self.MPI.IN_PLACE, f, op=self.MPI.SUM) for f in flats]
        self._wait(requests, "gradient allreduce")
        for group, flat in zip(plan, flats):
            at = 0
            for i in group:
                b = buffers[i]
                b.reshape(-1)[...] = flat[at:at + b.size]
                at += b.size


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def buckets(buffers: list[np.ndarray], limit: int = BUCKET_BYTES) -> list[list[int]]:
    """Consecutive groups of buffer indices of at most `limit` bytes each (a larger buffer alone),
    grouped by dtype so that each bucket is one contiguous array."""
    out: list[list[int]] = []
    size, dtype = 0, None
    for i, b in enumerate(buffers):
        if out and b.dtype == dtype and size + b.nbytes <= limit:
            out[-1].append(i)
            size += b.nbytes
        else:
            out.append([i])
            size, dtype = b.nbytes, b.dtype
    return out


def ranks_line(comm: Communicator) -> str:
    """`rank 0 pid 4242 on node1, rank 1 pid 4243 on node2`: every rank takes part (one allreduce)."""
    import socket

    width = 64
    table = np.zeros((comm.size, width + 1), dtype=np.float64)
    host = socket.gethostname().encode()[:width]
    table[comm.rank, 0] = os.getpid()
    table[comm.rank, 1:1 + len(host)] = np.frombuffer(host, dtype=np.uint8)
    table = comm.allreduce_array(table)
    rows = []
    for r in range(comm.size):
        name = bytes(int(v) for v in table[r, 1:] if v).decode(errors="replace")
        rows.append(f"rank {r} pid {int(table[r, 0])} on {name}")
    return ", ".join(rows)


_WORLD: Communicator | None = None


def world() -> Communicator:
    """The communicator of this process: MPI when a launcher started several ranks, else one process."""
    global _WORLD
    if _WORLD is None:
        _, size = _env_rank_size()
        _WORLD = MpiCommunicator() if size > 1 else Communicator()
    return _WORLD
