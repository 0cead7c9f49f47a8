"""--executor ray: one Ray task per model, this process the warehouse's one writer.

The driver (this process) connects to Ray (a local instance it starts, or a
cluster it joins with --address), puts the dataset into Ray's object store once,
and keeps as many tasks in flight as the cluster has room for. A training task
(train/tasks.py) writes its run bundle under --out, which every node must see,
and returns the bundle's path; a measure task returns its rows. As each result
comes the driver checks it as the local path does (prepare_bundle for a bundle,
check_measure_rows for rows) and writes it in its own short transaction, so a
reader is never locked out for long. Workers never open the warehouse.

Faults: Ray retries a task whose worker died up to --max-retries times; a model
that still fails is stored as failed (ingest/failed.py) and the grid goes on.
Killed (Ctrl-C or kill -9), the next run of the same command resumes from the
bundles on disk: finished ones are ingested, never trained again.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable

from fgm.warehouse import FgmError

from .executor import ExecutorSettings
from .tasks import OutNotWritable

PROBE_SECONDS = 5.0      # an address where nothing answers fails in this time, not Ray's minutes
OBSERVE_SECONDS = 2.0    # then, how long a plain connection to it is watched (_observe)
CAPACITY_EVERY = 10.0    # seconds between looks at the cluster's size (nodes come and go)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise FgmError("--executor ray needs Ray, which is not installed here: "
                       "pip install 'fgm[ray]'") from None
    return ray


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


NO_AUTO = ("--address auto: no Ray cluster runs on this machine; start one with `ray start "
           "--head`, or leave --address out to start a Ray instance for this run alone")


def probe_address(address: str) -> None:
    """Fail in seconds, naming the address, where no Ray cluster answers: Ray itself
    keeps retrying a missing cluster for minutes."""
    if address == "auto":   # $RAY_ADDRESS, else the cluster last started on this machine
        try:
            from ray._private.services import canonicalize_bootstrap_address
            found = canonicalize_bootstrap_address("auto")
        except Exception:   # noqa: BLE001 - Ray's private API moved: let ray.init look
            return
        if found is None:
            raise FgmError(NO_AUTO)
        _probe(found.removeprefix("ray://"), f"auto ({found}, the Ray cluster last started "
               f"here)", client=found.startswith("ray://"))
        return
    _probe(address.removeprefix("ray://"), address, client=address.startswith("ray://"))


# One cheap call that only the expected service answers: the cluster's own (GCS)
# port for host:port, the Ray Client server's for ray://host:port. The other
# answers it with UNIMPLEMENTED, which Ray itself would retry for half a minute.
PROBE_METHOD = {False: "/ray.rpc.NodeInfoGcsService/GetClusterId",
                True: "/ray.rpc.RayletDriver/ClusterInfo"}
WRONG_PORT = {False: "this is not a Ray cluster's port (a Ray Client server? then write "
                     "ray://{hostport})",
              True: "this is not a Ray Client server (a cluster's own port? then leave out "
                    "ray://, or give the client server's port, 10001 unless changed)"}


def _probe(hostport: str, label: str, client: bool = False) -> None:
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FgmError(f"--address {label!r}: expected auto, host:port or ray://host:port")
    bare = host.strip("[]")
    try:
        socket.create_connection((bare, int(port)), timeout=PROBE_SECONDS).close()
    except UnicodeError:    # idna: a label of more than 63 characters, or an empty one
        raise FgmError(f"--address {label}: the host is not a host name (dot-separated "
                       f"labels of 1 to 63 characters) or an IP address") from None
    except OSError as exc:
        raise FgmError(f"--address {label}: no Ray cluster answers there "
                       f"({exc.strerror or exc}); start one with `ray start --head "
                       f"--port {port}` on {bare}, or check the host and port") from None
    try:
        import grpc  # Ray speaks gRPC; something else on the port would never answer it
    except ImportError:
        return
    hostport = hostport.removeprefix("ray://")
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=PROBE_SECONDS)
        call = channel.unary_unary(PROBE_METHOD[client], request_serializer=None,
                                   response_deserializer=None)
        try:
            call(b"", timeout=PROBE_SECONDS)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise FgmError(f"--address {label}: "
                               + WRONG_PORT[client].format(hostport=hostport)) from None
            # anything else (a token asked for, a refusal of the empty request) is
            # Ray answering: ray.init says the rest
    except grpc.FutureTimeoutError:
        raise FgmError(f"--address {label}: " + _observe(bare, int(port))) from None
    finally:
        channel.close()


NOT_RAY = "not a Ray cluster's port or a Ray Client server"


def _observe(host: str, port: int) -> str:
    """What a port that accepts connections but never became a gRPC channel does with
    one plain connection: closes it at once, keeps silent, or answers something else."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS) as sock:
            sock.settimeout(OBSERVE_SECONDS)
            try:
                data = sock.recv(64)
            except TimeoutError:
                return (f"the port accepted the connection but never answered (nothing "
                        f"within {PROBE_SECONDS:g} s): {NOT_RAY}, or a firewall or proxy "
                        f"holds the connection")
            except OSError:    # reset by the peer
                data = b""
    except OSError as exc:
        return (f"the port accepted a connection, then refused the next "
                f"({exc.strerror or exc}): {NOT_RAY}, or a firewall drops it")
    if not data:
        return (f"the port accepted the connection and closed it without answering: "
                f"{NOT_RAY}, or a firewall or proxy drops the connection")
    return (f"something listens there, but it is not a Ray cluster (it answered, but not "
            f"in Ray's protocol, gRPC, within {PROBE_SECONDS:g} s)")


def _join_error(address: str, exc: BaseException) -> FgmError:
    chain, e = [], exc
    while e is not None and len(chain) < 5:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = " ".join(chain)
    if "InvalidAuthToken" in text or ("token" in text.lower() and "auth" in text.lower()):
        return FgmError(f"--address {address}: the cluster asks for Ray's auth token; set "
                        f"RAY_AUTH_MODE=token and give this machine the cluster's token "
                        f"($RAY_AUTH_TOKEN, or ~/.ray/auth_token; `ray get-auth-token` "
                        f"prints it on the head node)")
    return FgmError(f"--address {address}: could not join the Ray cluster there "
                    f"({_first_line(exc)})")


class Cluster:
    """Ray, connected for one command: `with Cluster(settings) as cluster: ...`."""

    def __init__(self, settings: ExecutorSettings):
        self.s = settings
        self.ray = None
        self._capacity, self._looked = 0, -math.inf

    def __enter__(self) -> Cluster:
        ray = _import_ray()
        address = self.s.address
        if address is not None:
            probe_address(address)
        logging.getLogger("ray").setLevel(logging.ERROR)
        try:
            if address is None:
                ray.init(address="local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
            elif address.startswith("ray://"):
                ray.init(address=address, logging_level=logging.ERROR)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as exc:
            if address is None:
                raise FgmError(f"could not start a local Ray instance ({_first_line(exc)})") \
                    from None
            if address == "auto" and isinstance(exc, ConnectionError):
                raise FgmError(NO_AUTO) from None
            raise _join_error(address, exc) from None
        self.ray = ray
        try:
            self._check()
        except BaseException:
            ray.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.ray.shutdown()

    def _nodes(self) -> list[dict]:
        return [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]

    def describe(self) -> str:
        nodes = self._nodes()
        cpus = sum(n.get("CPU", 0) for n in nodes)
        gpus = sum(n.get("GPU", 0) for n in nodes)
        size = f"{cpus:g} CPUs, {gpus:g} GPUs"
        if self.s.address is None:
            return f"a local Ray instance ({size})"
        where = self.s.address
        if where == "auto":
            try:
                where = f"auto = {self.ray.get_runtime_context().gcs_address}"
            except Exception:   # noqa: BLE001 - only a label
                pass
        return f"the Ray cluster at {where} ({len(nodes)} node(s), {size})"

    def capacity(self) -> int:
        """How many models run at once: per node, its CPUs (and GPUs) divided by one
        model's share, rounded down. Looked up again every CAPACITY_EVERY seconds."""
        now = time.monotonic()
        if now - self._looked >= CAPACITY_EVERY:
            slots = 0
            for r in self._nodes():
                k = math.floor(r.get("CPU", 0) / self.s.cpus_per_model + 1e-9)
                if self.s.gpus_per_model:
                    k = min(k, math.floor(r.get("GPU", 0) / self.s.gpus_per_model + 1e-9))
                slots += k
            self._capacity, self._looked = slots, now
        return self._capacity

    def _check(self) -> None:
        """What would leave every task waiting forever, said before any task starts."""
        nodes = self._nodes()
        where = self.describe()
        if self.s.gpus_per_model and not any(n.get("GPU", 0) for n in nodes):
            raise FgmError(f"--gpus-per-model {self.s.gpus_per_model:g}: {where} has no GPU")
        if self.capacity() < 1:
            gpu = (f" and {self.s.gpus_per_model:g} GPU" if self.s.gpus_per_model else "")
            raise FgmError(f"no node of {where} has {self.s.cpus_per_model} CPU(s){gpu} for "
                           f"one model; lower --cpus-per-model or --gpus-per-model")

    def remote(self, func: Callable, name: str):
        return self.ray.remote(func).options(
            name=name, num_cpus=self.s.cpus_per_model, num_gpus=self.s.gpus_per_model,
            max_retries=self.s.max_retries, retry_exceptions=False)

    def failure(self, exc: BaseException) -> str:
        """One line for a task that failed for good; OutNotWritable stops the run."""
        ray = self.ray
        cause = getattr(exc, "cause", None)
        if isinstance(exc, OutNotWritable) or isinstance(cause, OutNotWritable):
            raise FgmError(str(cause or exc).splitlines()[0]) from None
        if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
            return f"{type(cause).__name__}: {_first_line(cause)}"
        if isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
            return (f"its worker died {self.s.max_retries + 1} time(s) (--max-retries "
                    f"{self.s.max_retries}): {_first_line(exc)}")
        return f"{type(exc).__name__}: {_first_line(exc)}"


# --------------------------------------------------------------------------- the backend

class RayBackend:
    """--executor ray as the driver loop's Backend (train/driver.py): tasks are Ray
    tasks, tickets their object refs; a task whose worker died is retried by Ray."""
    inline = False

    def __init__(self, settings: ExecutorSettings, device: str):
        self._use_gpu = settings.use_gpu(device)
        self.cluster = Cluster(settings)
        self.remotes: dict[str, object] = {}
        self.progress = None     # Ray tasks report no progress

    def __enter__(self) -> RayBackend:
        self.cluster.__enter__()
        self.ray = self.cluster.ray
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.__exit__(*exc)

    def describe(self) -> str:
        return f"{self.cluster.describe()}, up to {self.cluster.capacity()} at a time"

    def capacity(self) -> int:
        return self.cluster.capacity()

    def threads(self) -> int:
        return self.cluster.s.cpus_per_model

    def use_gpu(self) -> bool:
        return self._use_gpu

    def data(self, spec):
        """The dataset, loaded here and put into Ray's object store once."""
        from .tasks import load_data
        return self.ray.put(load_data(spec))

    def submit(self, fn: Callable, *args):
        name = fn.__name__
        if name not in self.remotes:
            self.remotes[name] = self.cluster.remote(fn, name)
        return self.remotes[name].remote(*args)

    def wait(self, tickets: list, timeout: float) -> list:
        ready, rest = self.ray.wait(tickets, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def result(self, ref) -> tuple[bool, object]:
        try:
            return True, self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            return False, exc

    def cancel(self, ref) -> None:
        try:
            self.ray.cancel(ref, force=True)
        except Exception:   # noqa: BLE001 - finished meanwhile, or its node is gone
            pass

    def failure(self, exc: BaseException) -> str:
        return self.cluster.failure(exc)
