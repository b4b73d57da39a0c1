"""A generation's later variants compiled ahead, in worker processes, into Inductor's on-disk caches.

Each variant is a whole-model Inductor compilation, done at its first call. At a graph's first call the
policy's plan of the whole generation is known, so the other variants go to worker processes, which
compile them with `compile_inductor` (the same cache keys: fakes from metadata) while this process
compiles the first; each later first call then loads its variant from the caches. Workers are fresh
interpreters (`python -c`), not multiprocessing's spawn, which would run the user's script again unless
it guards its main code; each gets its job on stdin and writes its output to a log, both unnamed
temporary files, so nothing is left on disk whatever happens to it.

What a worker's entries are keyed by besides the graph and its inputs (Inductor's and AOTAutograd's
configs, grad and autocast modes, ...) is taken from this process: a difference would only make this
process miss the caches and compile the variant itself. A worker that fails warns once, and variants
are then compiled here, as without workers, for the rest of the process. Where the first variant loads
from the caches (the generation was compiled before), the workers are stopped: a worker takes longer
to start than this process takes to load a variant from the caches.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import operator
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Hashable, Iterator

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..analysis.fake import metas_of
from .inductor import compile_inductor
from ..analysis.marks import set_stream_mark, stream_marks
from .regions import compile_graph

AUTO_MIN_CPUS = 8  # parallel_compile=None is on from this many usable cores: with fewer, workers compete with this process
_BENCHMARKING = ("max_autotune", "max_autotune_gemm", "max_autotune_pointwise", "coordinate_descent_tuning")
_failed = False  # a worker failed: compile everything in this process from now on
_live: set[_Worker] = set()  # started and not yet waited for
_TIMES = "toca_fx worker times: "  # a worker's last line of output: when it began and ended compiling


def enabled(setting: bool | None, patches: dict[str, Any]) -> bool:
    """Whether to compile variants ahead in workers: `setting`, None meaning with AUTO_MIN_CPUS usable
    cores or more. Never after a worker failed, without the FX graph cache (nothing to hand over), or
    where compiling benchmarks kernels (max-autotune): workers timing kernels at once would mislead
    each other's choices, which the caches then keep."""
    config = torch._inductor.config
    if _failed or not config.fx_graph_cache or config.force_disable_caches:
        return False
    if any(patches.get(name, getattr(config, name)) for name in _BENCHMARKING):
        return False
    return setting if setting is not None else _cpus() >= AUTO_MIN_CPUS


def job(gm: fx.GraphModule, inputs: list[Any], patches: dict[str, Any], regional: bool = False) -> bytes:
    """What a worker needs to compile `gm` as `regions.compile_graph` with `compile_inductor(patches)`
    and `regional` here would (with `regional`, the stream's marks go along)."""
    configs = (torch._inductor.config.save_config(), torch._functorch.config.save_config())
    marks = {n.name: j for n, j in stream_marks(gm.graph.nodes).items()} if regional else None
    return pickle.dumps((_dump(gm), metas_of(inputs), patches, configs, _process_state(), marks))


@dataclass(frozen=True)
class WorkerTimes:
    """Where a worker's job spent its seconds: waiting for a free worker slot, starting (a fresh
    interpreter importing torch and toca_fx), then compiling (Inductor, into the caches)."""

    queued: float
    starting: float
    compiling: float


class Prefetch:
    """Workers compiling jobs (`job`), started in the order added, with at most `max_workers` running in
    this process at a time (those of every graph's `Prefetch`)."""

    def __init__(self, max_workers: int | None = None):
        # A quarter of the cores: each worker is one core of Python (tracing, lowering, scheduling) with
        # bursts of kernel builds; a graph with many distinct plans (step_levels=0, a router) would
        # otherwise start a process per plan. DiT's preset on 16 cores: its 4 other variants at once.
        self.max_workers = max_workers or max(1, _cpus() // 4)
        # Each worker's Inductor compile pool gets a share of the cores (this process keeps its pool, of
        # all of them): left to themselves, each would start a pool of all the cores.
        self.threads = max(1, _cpus() // (self.max_workers + 1))
        self.queue: dict[Hashable, Callable[[], bytes]] = {}  # key -> its job, made when started
        self.running: dict[Hashable, _Worker] = {}
        self.done: set[Hashable] = set()  # keys whose workers succeeded before their variants were due
        self.times: dict[Hashable, WorkerTimes] = {}  # keys whose workers succeeded: their seconds
        self._added: dict[Hashable, float] = {}  # key -> when its job was queued (time.time())

    def add(self, jobs: dict[Hashable, Callable[[], bytes]]) -> None:
        self.queue.update(jobs)
        self._added.update(dict.fromkeys(jobs, time.time()))
        self._start_more()

    @contextlib.contextmanager
    def compiling(self, key: Hashable) -> Iterator[None]:
        """Around this process's compilation of `key`'s variant: first waits for its worker (`wait`).
        A variant that no worker compiled and that loads from the caches all the same (the generation
        was compiled before) stops the workers: the other variants most likely load too, and sooner
        here than in a worker that has yet to start."""
        ahead = self.wait(key)
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        yield
        loaded = counters["inductor"]["fxgraph_cache_hit"] > hits and counters["inductor"]["fxgraph_cache_miss"] == misses
        if not ahead and loaded:  # every graph of it loaded (by regions, some may load from another variant's)
            self.stop()

    def wait(self, key: Hashable) -> bool:
        """Whether a worker compiled `key`'s variant into the caches, once it ended (one that failed
        warns); False at once where none started (none will: it is due now)."""
        self.queue.pop(key, None)
        worker = self.running.pop(key, None)
        if worker is not None:
            while not worker.ended(timeout=1.0):
                self._start_more()  # slots that free up meanwhile go to the next jobs
            self._reap(key, worker)
        self._start_more()
        if key in self.done:
            self.done.remove(key)
            return True
        return False

    def stop(self) -> None:
        """Stop every worker of this `Prefetch` and start no more: the caller compiles the rest."""
        self.queue.clear()
        for worker in self.running.values():
            worker.stop()
        self.running.clear()

    def _start_more(self) -> None:
        for key, worker in list(self.running.items()):
            if worker.ended():  # reaped now, not left a zombie until its variant is due
                del self.running[key]
                self._reap(key, worker)
        while self.queue and not _failed and sum(not w.ended() for w in list(_live)) < self.max_workers:
            key, make = next(iter(self.queue.items()))
            del self.queue[key]
            try:
                data = make()
            except Exception as e:  # noqa: BLE001 - a graph or config that does not pickle: compiled here
                _fail(f"{type(e).__name__}: {e}")
                continue
            self.running[key] = _Worker.start(data, self.threads)
        if _failed:
            self.queue.clear()

    def _reap(self, key: Hashable, worker: _Worker) -> None:
        """Book an ended worker: done (with its times) or failed (warns once)."""
        began_ended = worker.times()  # read before `_warn_if_failed` closes its log
        if _warn_if_failed(worker):
            return
        self.done.add(key)
        if began_ended is not None:
            began, ended = began_ended
            queued = self._added.get(key, worker.started)
            self.times[key] = WorkerTimes(worker.started - queued, began - worker.started, ended - began)


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen | None  # None: it could not be started (`log` says why)
    log: IO[bytes]  # its stdout and stderr: a file, since a pipe nobody reads could fill and stall it
    started: float  # time.time() when it was started

    @classmethod
    def start(cls, data: bytes, threads: int) -> _Worker:
        log, started = tempfile.TemporaryFile(), time.time()
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(threads)}
        try:
            with tempfile.TemporaryFile() as stdin:
                stdin.write(data)
                stdin.seek(0)
                # Its own process group (start_new_session): at exit the worker and its compile pool stop together (`_stop_all`).
                process = subprocess.Popen(
                    _command(), stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        except OSError as e:
            log.write(f"could not start: {e}".encode())
            return cls(None, log, started)
        worker = cls(process, log, started)
        _live.add(worker)
        return worker

    def ended(self, timeout: float = 0.0) -> bool:
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
        _live.discard(self)
        return True

    def failure(self) -> str | None:
        """Why it failed (the last line of its log), or None if it succeeded."""
        if self.process is not None and self.process.returncode == 0:
            return None
        return self._last_line() or f"exit status {self.process.returncode}"

    def times(self) -> tuple[float, float] | None:
        """When (time.time()) it began and ended compiling, from its last line; None if it did not say."""
        last = self._last_line()
        if not last.startswith(_TIMES):
            return None
        began, ended = json.loads(last[len(_TIMES):])
        return began, ended

    def _last_line(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def stop(self) -> None:
        """End it and its compile pool (its process group), and reap it."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5.0)
            if self.process.poll() is None:
                self._signal(signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
                self.process.wait()
        self.log.close()
        _live.discard(self)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if hasattr(os, "killpg"):
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)


def _command() -> list[str]:
    """This toca_fx, then what this process imports from: `python -c` would look in the working
    directory first, where another checkout of toca_fx may be."""
    path = [str(Path(__file__).parents[2]), *sys.path]
    return [sys.executable, "-c", f"import sys; sys.path[:] = {path!r}; from toca_fx.compile.workers import _main; _main()"]


def _warn_if_failed(worker: _Worker) -> bool:
    """Whether `worker` (ended) failed; the first failure warns."""
    why = worker.failure()
    worker.log.close()
    if why is not None:
        _fail(why)
    return why is not None


def _fail(why: str) -> None:
    global _failed
    if not _failed:
        warnings.warn(
            f"toca_fx: compiling a variant in a worker process failed ({why}); variants are compiled in "
            "this process from now on",
            stacklevel=2,
        )
    _failed = True


@atexit.register
def _stop_all() -> None:
    """Workers of a generation left unfinished: stopped with this process, not left to run on."""
    for worker in list(_live):
        worker.stop()


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _process_state() -> dict[str, Any]:
    """What the caches' keys hold of this process's global state, besides the configs."""
    return {
        "grad": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
        "autocast": {d: torch.get_autocast_dtype(d) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)},
        "default_dtype": torch.get_default_dtype(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),  # CPU kernels are keyed by it
    }


@contextlib.contextmanager
def _taking_on(state: dict[str, Any]):
    """This (worker) process with `state`, from `_process_state` of another. Only what differs is set:
    setting a default can change what a key reads (the matmul precision "highest" makes torch's
    fp32_precision "ieee", not the default "none")."""
    here = _process_state()
    if state["default_dtype"] != here["default_dtype"]:
        torch.set_default_dtype(state["default_dtype"])
    if state["deterministic"] != here["deterministic"]:
        mode, warn_only = state["deterministic"]
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    if state["float32_matmul_precision"] != here["float32_matmul_precision"]:
        torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    if state["threads"] != here["threads"]:
        torch.set_num_threads(state["threads"])
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode() if state["inference"] else torch.set_grad_enabled(state["grad"]))
        for device, dtype in state["autocast"].items():
            stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


_MAX_CONSTANT_BYTES = 1 << 26


def _dump(gm: fx.GraphModule) -> bytes:
    """The graph as plain data, node names kept, so that the loaded graph's code, from which the caches'
    keys are made, is this one's (a pickled GraphModule is traced again when loaded, which fails on
    our functions); with its constants and submodules, within _MAX_CONSTANT_BYTES (Dynamo passes
    parameters as inputs, unless told not to inline nn modules: then they are the graph's own, and each
    worker would get a copy of the weights)."""
    ref = lambda a: _Ref(a.name)  # noqa: E731
    nodes = [(n.op, n.name, _Global.of(n.target), fx.map_arg(n.args, ref), fx.map_arg(n.kwargs, ref), n.type) for n in gm.graph.nodes]
    attrs = {n.target: operator.attrgetter(n.target)(gm) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    nbytes = sum(_nbytes(a) for a in attrs.values())
    if nbytes > _MAX_CONSTANT_BYTES:
        raise ValueError(f"the graph holds {nbytes >> 20} MiB of constants, too many to hand to a worker")
    return pickle.dumps((gm.graph._codegen, nodes, attrs))


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.nn.Module):
        return sum(_nbytes(t) for t in value.state_dict().values())
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _load(data: bytes) -> fx.GraphModule:
    codegen, nodes, attrs = pickle.loads(data)
    graph, env = fx.Graph(), {}
    graph._codegen = codegen
    get = lambda a: env[a.name] if isinstance(a, _Ref) else a  # noqa: E731
    for op, name, target, args, kwargs, type_ in nodes:
        target = target.get() if isinstance(target, _Global) else target
        args, kwargs = fx.node.map_aggregate(args, get), fx.node.map_aggregate(kwargs, get)
        env[name] = graph.create_node(op, target, args, kwargs, name, type_)
    return fx.GraphModule(attrs, graph)


@dataclass(frozen=True)
class _Ref:
    """A node argument, by name."""

    name: str


@dataclass(frozen=True)
class _Global:
    """A call target by module and name: a builtin such as torch.conv2d would unpickle as another object,
    which prints differently in the code and which AOTAutograd's cache refuses."""

    module: str
    name: str

    @staticmethod
    def of(target: Any) -> Any:
        module, name = getattr(target, "__module__", None), getattr(target, "__name__", None)
        if module and name and getattr(sys.modules.get(module), name, None) is target:
            return _Global(module, name)
        return target

    def get(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


def _main() -> None:
    """A worker: compile the job on stdin into the caches; say when it began and ended (`_TIMES`)."""
    began = time.time()
    graph, inputs, patches, configs, state, marks = pickle.load(sys.stdin.buffer)
    threads = torch._inductor.config.compile_threads  # its own, from TORCHINDUCTOR_COMPILE_THREADS
    torch._inductor.config.load_config(configs[0])
    torch._functorch.config.load_config(configs[1])
    torch._inductor.config.compile_threads = threads
    gm, one = _load(graph), functools.partial(compile_inductor, patches=patches)
    for n in gm.graph.nodes if marks else ():
        if n.name in marks:
            set_stream_mark(n, marks[n.name])
    with _taking_on(state):
        compile_graph(gm, inputs, one, bool(marks))
    print(_TIMES + json.dumps([began, time.time()]), flush=True)
