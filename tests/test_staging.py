"""MPI staging logic with a fake device, single process on MPI.COMM_SELF; CUDA-aware decision.

The fake device (spec exemplars.md section 5): every tensor counts as "device memory" except the
communicator's own host staging buffers. A spy around the mpi4py communicator records the address
range of every buffer handed to MPI, so the tests can assert that no user ("device") tensor ever
reaches a non-CUDA-aware MPI, that staged data round-trips correctly, and that the host buffers
are pooled.

Note: ``is_device=lambda t: True`` cannot be used literally: the predicate also applies to the
staging buffers themselves, and ``_mpi_buf`` would (rightly) refuse them.
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from hpcattn.comm import gpu_aware
from hpcattn.comm.base import Counters
from hpcattn.comm.mpi import MPIComm, MPIHostComm

BUFFER_METHODS = ("Allreduce", "Reduce", "Allgather", "Bcast", "Isend", "Irecv")


def _span(x):
    """(start, stop) byte range of a tensor / [tensor, type] / numpy buffer, or None."""
    if isinstance(x, (list, tuple)):
        return _span(x[0]) if x else None
    if isinstance(x, torch.Tensor):
        return x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()
    if hasattr(x, "ctypes") and hasattr(x, "nbytes"):      # numpy
        return x.ctypes.data, x.ctypes.data + x.nbytes
    return None                                            # MPI.IN_PLACE, None, ...


class SpyComm:
    """Forwards to a real mpi4py communicator; records the buffers of data-plane calls.

    ``after[name]`` optionally maps a method name to a hook ``f(buffers)`` run after the real call
    (to simulate the other ranks' contributions on a one-rank communicator).
    """

    def __init__(self, real):
        self._real = real
        self.calls: list[tuple[str, list]] = []
        self.after: dict = {}

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in BUFFER_METHODS:
            return attr

        def wrapper(*args, **kwargs):
            bufs = [a for a in list(args) + list(kwargs.values()) if _span(a) is not None]
            self.calls.append((name, bufs))
            r = attr(*args, **kwargs)
            if name in self.after:
                self.after[name](bufs)
            return r
        return wrapper

    def spans(self, name=None):
        return [_span(b) for n, bufs in self.calls if name in (None, n) for b in bufs]


def storage_span(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def make_comm(gpu_aware=False, counters=None):
    """MPIComm on COMM_SELF with the fake device and the spy installed."""
    holder = {}

    def is_device(t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        pool = holder["comm"]._pool.values()
        return not any(ptr == b.data.untyped_storage().data_ptr() for b in pool)

    comm = MPIComm(MPI.COMM_SELF, counters or Counters(), gpu_aware=gpu_aware, is_device=is_device)
    holder["comm"] = comm
    spy = SpyComm(comm.mpi)
    comm.mpi = spy
    return comm, spy


def pool_spans(comm):
    return [storage_span(b.data) for b in comm._pool.values()]


def assert_only_host_buffers(comm, spy, *user_tensors):
    spans = spy.spans()
    assert spans, "no buffer reached MPI"
    for s in spans:
        for u in user_tensors:
            assert not overlaps(s, storage_span(u)), "a 'device' tensor reached non-CUDA-aware MPI"
        assert any(s[0] >= p[0] and s[1] <= p[1] for p in pool_spans(comm)), \
            "buffer handed to MPI is not a pooled host buffer"


# ------------------------------------------------------------------------------------------------
# staged (gpu_aware=False)


def test_fake_device_predicate():
    comm, _ = make_comm()
    t = torch.ones(4)
    assert comm.is_device(t) and comm._staged(t)
    h = comm._host("x", t)
    assert not comm.is_device(h.view(t)) and not comm.is_device(h.data)
    assert comm.transport == "mpi_staged"


def test_mpi_buf_refuses_device_tensor():
    comm, _ = make_comm()
    with pytest.raises(RuntimeError, match="non-CUDA-aware"):
        comm._mpi_buf(torch.zeros(3))
    # the literal 'every tensor is device' predicate refuses everything, staging buffers included
    strict = MPIComm(MPI.COMM_SELF, Counters(), gpu_aware=False, is_device=lambda t: True)
    with pytest.raises(RuntimeError):
        strict._mpi_buf(torch.zeros(3))
    with pytest.raises(RuntimeError):
        strict.allreduce(torch.zeros(3))
    # a host buffer passes, a non-contiguous one does not
    host = MPIComm(MPI.COMM_SELF, Counters(), gpu_aware=False, is_device=lambda t: False)
    x = torch.zeros(3)
    assert host._mpi_buf(x) is x
    with pytest.raises(ValueError, match="contiguous"):
        host._mpi_buf(torch.zeros(4, 4).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_allreduce_sum_staged(dtype):
    comm, spy = make_comm()
    t = torch.arange(12, dtype=dtype).view(3, 4)
    expect = t.clone()
    # simulate a second rank contributing ones, inside MPI, on the buffer MPI was given
    spy.after["Allreduce"] = lambda bufs: bufs[0].add_(1)
    out = comm.allreduce(t, "sum")
    assert out is t
    assert torch.equal(t, expect + 1)            # the result was copied back into the user tensor
    assert [n for n, _ in spy.calls] == ["Allreduce"]
    assert_only_host_buffers(comm, spy, t)


def test_allreduce_max_staged():
    comm, spy = make_comm()
    t = torch.tensor([1.0, -5.0, float("-inf"), 3.0])
    other = torch.tensor([0.0, 2.0, -1.0, float("-inf")])
    spy.after["Allreduce"] = lambda bufs: torch.maximum(bufs[0], other, out=bufs[0])
    comm.allreduce(t, "max")
    assert torch.equal(t, torch.tensor([1.0, 2.0, -1.0, 3.0]))
    assert_only_host_buffers(comm, spy, t)
    # the real MAX on one rank is the identity
    comm.mpi.after.clear()
    u = torch.tensor([4.0, float("-inf")])
    comm.allreduce(u, "max")
    assert torch.equal(u, torch.tensor([4.0, float("-inf")]))


def test_reduce_staged():
    comm, spy = make_comm()
    t = torch.arange(5, dtype=torch.float64)
    spy.after["Reduce"] = lambda bufs: bufs[0].mul_(2)
    comm.reduce(t, "sum", root=0)
    assert torch.equal(t, torch.arange(5, dtype=torch.float64) * 2)   # root gets the result
    assert_only_host_buffers(comm, spy, t)


def test_reductions_refuse_low_precision():
    comm, _ = make_comm()
    for dt in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError):
            comm.allreduce(torch.zeros(4, dtype=dt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_allgather_staged(dtype):
    comm, spy = make_comm()
    t = (torch.arange(24) - 7).to(dtype).view(2, 3, 4)
    out = comm.allgather(t)
    assert out.shape == (1, 2, 3, 4) and out.dtype == dtype
    assert torch.equal(out[0], t)
    assert comm.is_device(out)                   # the result lives on the (fake) device
    assert_only_host_buffers(comm, spy, t, out)
    assert {"allgather_in", "allgather_out"} <= set(comm._pool)


def test_broadcast_staged():
    comm, spy = make_comm()
    t = torch.randn(7, 3)
    expect = t.clone()
    assert comm.broadcast(t, root=0) is t
    assert torch.equal(t, expect)
    assert [n for n, _ in spy.calls] == ["Bcast"]
    assert_only_host_buffers(comm, spy, t)
    # the root's data really went through the host buffer handed to MPI
    (buf,) = spy.calls[0][1]
    assert torch.equal(buf.view(torch.float32).view(7, 3), expect)


def test_sendrecv_to_self_staged():
    comm, spy = make_comm()
    send = torch.randn(2, 5, 3)
    recv = torch.zeros_like(send)
    req = comm.sendrecv_start(send, 0, recv, 0)
    req.wait()
    req.wait()                                   # idempotent
    assert torch.equal(recv, send)
    assert sorted(n for n, _ in spy.calls) == ["Irecv", "Isend"]
    assert_only_host_buffers(comm, spy, send, recv)


def test_sendrecv_alternates_receive_slots():
    comm, spy = make_comm()
    a, b = torch.randn(6), torch.randn(6)
    ra, rb = torch.zeros(6), torch.zeros(6)
    comm.sendrecv_start(a, 0, ra, 0).wait()
    comm.sendrecv_start(b, 0, rb, 0).wait()
    assert torch.equal(ra, a) and torch.equal(rb, b)
    recv_spans = spy.spans("Irecv")
    assert len(recv_spans) == 2 and recv_spans[0] != recv_spans[1]
    send_spans = spy.spans("Isend")
    assert send_spans[0] == send_spans[1]        # one send slot, reused
    assert {"recv0", "recv1", "send"} == set(comm._pool)
    assert_only_host_buffers(comm, spy, a, b, ra, rb)


def test_pool_reuses_buffers():
    comm, spy = make_comm()
    t1 = torch.randn(16)
    comm.allreduce(t1)
    comm.allreduce(torch.randn(16))               # same size: same buffer
    comm.allreduce(torch.randn(4, 4))             # same bytes, other shape: same buffer
    spans = spy.spans("Allreduce")
    assert spans[0][0] == spans[1][0] == spans[2][0]
    assert len(comm._pool) == 1
    comm.allreduce(torch.randn(17))               # larger: the slot's buffer regrows (>= 1.5x)
    assert spy.spans("Allreduce")[3][0] != spans[0][0]
    assert len(comm._pool) == 1 and comm._pool["allreduce"].nbytes == 96
    comm.allreduce(torch.randn(5))                # smaller: the same buffer
    assert spy.spans("Allreduce")[4][0] == spy.spans("Allreduce")[3][0]
    for n in range(1, 200, 7):                    # a growing message: one buffer, bounded
        t = torch.randn(n)
        expect = t.clone()
        comm.allreduce(t)
        assert torch.equal(t, expect)
    assert len(comm._pool) == 1 and 193 * 4 <= comm._pool["allreduce"].nbytes <= 1.5 * 193 * 4
    g1 = comm.allgather(torch.randn(8))
    g2 = comm.allgather(torch.randn(8))
    ag = spy.spans("Allgather")
    assert ag[0] == ag[2] and ag[1] == ag[3]      # both in and out buffers reused
    assert g1.data_ptr() != g2.data_ptr()         # results are fresh tensors, not pool views
    n = len(comm._pool)
    comm.broadcast(torch.randn(9))
    comm.broadcast(torch.randn(9))
    assert len(comm._pool) == n + 1
    b = spy.spans("Bcast")
    assert b[0] == b[1]


# ------------------------------------------------------------------------------------------------
# CUDA-aware (gpu_aware=True): device tensors go straight to MPI


def test_gpu_aware_passes_user_tensor_directly():
    comm, spy = make_comm(gpu_aware=True)
    assert comm.transport == "mpi_device"
    t = torch.arange(6, dtype=torch.float32)
    comm.allreduce(t)
    assert spy.spans("Allreduce") == [storage_span(t)]
    out = comm.allgather(t)
    assert torch.equal(out[0], t)
    ag = spy.spans("Allgather")
    assert ag[0] == storage_span(t) and ag[1] == storage_span(out)
    send, recv = torch.randn(5), torch.zeros(5)
    comm.sendrecv_start(send, 0, recv, 0).wait()
    assert torch.equal(recv, send)
    assert set(spy.spans("Isend")) == {storage_span(send)}
    assert set(spy.spans("Irecv")) == {storage_span(recv)}
    comm.broadcast(recv)
    assert spy.spans("Bcast") == [storage_span(recv)]
    assert comm._pool == {}                       # nothing staged
    assert comm._mpi_buf(t) is t


def test_host_comm_passes_host_tensors_directly():
    counters = Counters()
    comm = MPIHostComm(MPI.COMM_SELF, counters)
    assert comm.transport == "mpi_host"
    spy = SpyComm(comm.mpi)
    comm.mpi = spy
    t = torch.ones(3)
    comm.allreduce(t)
    assert spy.spans() == [storage_span(t)] and comm._pool == {}


# ------------------------------------------------------------------------------------------------
# counters


def test_counters_per_phase():
    counters = Counters()
    comm, _ = make_comm(counters=counters)
    assert counters.current == "other"
    with counters.phase("x"):
        assert counters.current == "x"
        comm.allreduce(torch.zeros(10, dtype=torch.float32))            # 40 B
        comm.allgather(torch.zeros(3, 2, dtype=torch.bfloat16))         # 12 B (this rank's part)
        with counters.phase("y"):
            comm.broadcast(torch.zeros(5, dtype=torch.float64))         # 40 B
            comm.sendrecv_start(torch.zeros(7, dtype=torch.int16), 0,
                                torch.zeros(7, dtype=torch.int16), 0).wait()   # 14 B sent
        assert counters.current == "x"
        comm.reduce(torch.zeros(2, dtype=torch.float64))                # 16 B
    assert counters.current == "other"
    comm.allreduce(torch.zeros(1, dtype=torch.float64))                 # 8 B
    assert dict(counters.bytes) == {"x": 40 + 12 + 16, "y": 40 + 14, "other": 8}
    assert dict(counters.calls) == {"x": 3, "y": 2, "other": 1}
    counters.reset()
    assert dict(counters.bytes) == {} and dict(counters.calls) == {}


def test_counters_phase_restored_on_error():
    counters = Counters()
    with pytest.raises(KeyError):
        with counters.phase("boom"):
            raise KeyError("x")
    assert counters.current == "other"


# ------------------------------------------------------------------------------------------------
# CUDA-aware MPI decision


@pytest.mark.parametrize("alloc,mpix,env,expect", [
    # Open MPI: no alloc_kinds info, MPIX_Query_cuda_support()
    (None, 1, {}, (True, "MPIX_query")),
    (None, 0, {}, (False, "MPIX_query")),
    # MPICH 4.1+/MPI 4.1: mpi_memory_alloc_kinds
    ("mpi,system,cuda:device", None, {}, (True, "mpi_memory_alloc_kinds")),
    ("mpi,system,CUDA:device,cuda:host", 0, {}, (True, "mpi_memory_alloc_kinds")),
    ("mpi,system", None, {}, (False, "mpi_memory_alloc_kinds")),
    ("mpi,system", 1, {}, (True, "MPIX_query")),
    # nothing known
    (None, None, {}, (None, "unknown")),
    (None, None, {"MPICH_GPU_SUPPORT_ENABLED": "0"}, (None, "unknown")),
    # environment hints
    (None, None, {"MPICH_GPU_SUPPORT_ENABLED": "1"}, (True, "env:MPICH_GPU_SUPPORT_ENABLED")),
    (None, None, {"MV2_USE_CUDA": "1"}, (True, "env:MV2_USE_CUDA")),
    ("mpi,system", None, {"PSP_CUDA": "1"}, (True, "env:PSP_CUDA")),
    # an explicit MPIX answer beats an env hint
    (None, 0, {"MPICH_GPU_SUPPORT_ENABLED": "1"}, (False, "MPIX_query")),
])
def test_decide(alloc, mpix, env, expect):
    assert gpu_aware.decide(alloc, mpix, env) == expect


def test_resolve():
    unknown = gpu_aware.decide(None, None, {})
    assert gpu_aware.resolve("auto", unknown) == (False, "unknown->false")
    assert gpu_aware.resolve("auto", (True, "MPIX_query")) == (True, "MPIX_query")
    assert gpu_aware.resolve("auto", (False, "mpi_memory_alloc_kinds")) == (False, "mpi_memory_alloc_kinds")
    # the config overrides any probe
    for probed in (unknown, (True, "MPIX_query"), (False, "MPIX_query")):
        assert gpu_aware.resolve("true", probed) == (True, "config")
        assert gpu_aware.resolve("false", probed) == (False, "config")


def test_probe_runs_on_this_mpi():
    """The live probe never crashes and returns a well-formed answer (CPU-only MPI here)."""
    value, method = gpu_aware.probe(MPI.COMM_SELF)
    assert value in (True, False, None)
    assert isinstance(method, str) and method
    resolved, _ = gpu_aware.resolve("auto", (value, method))
    assert isinstance(resolved, bool)


def test_large_messages_are_split_into_chunks(monkeypatch):
    """Point-to-point messages above MPIComm.CHUNK go out as several Isend/Irecv pieces (MPI
    libraries without large-count support fail on >= 2 GiB messages), and arrive intact."""
    from mpi4py import MPI

    from hpcattn.comm.base import Counters
    from hpcattn.comm.mpi import MPIHostComm

    comm = MPIHostComm(MPI.COMM_SELF, Counters())
    monkeypatch.setattr(MPIHostComm, "CHUNK", 64)
    send = torch.arange(1000, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    reqs = comm._p2p(send, 0, recv, 0)
    assert len(reqs) == 2 * -(-2000 // 64)
    MPI.Request.Waitall(reqs)
    assert torch.equal(recv, send)


def test_collective_views_share_one_element_type():
    """An allgather's send and receive views get the same element type whatever the byte count
    (a 2340-byte state once went out as uint8 and came back as int64: 'cannot infer count')."""
    for nbytes in (1, 2340, 4096):
        send = torch.zeros(nbytes, dtype=torch.uint8)
        recv = torch.zeros(2 * nbytes, dtype=torch.uint8)
        assert MPIComm._bytes(send, nbytes, 2).dtype == MPIComm._bytes(recv, nbytes, 2).dtype == torch.uint8
    big = torch.zeros(16, dtype=torch.uint8)           # the type a >= 2 GiB call would use, on a small view
    assert MPIComm._bytes(big, 2 ** 31 + 8, 1).dtype == torch.int64
    assert MPIComm._bytes(big, 2 ** 30 + 4, 2).dtype == torch.int32
    assert MPIComm._bytes(big, 2 ** 31 + 1, 1).dtype == torch.uint8
