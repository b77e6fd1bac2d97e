"""The versions a server serves, kept in step with its model directory: verify, load, warm up, swap, drain.

`ModelManager.refresh` (at start, every `--poll-seconds`, and on SIGHUP) lists the version directories and
reads labels.json, both in the loader thread (a slow volume or a large file never stalls the event loop). A
labels.json that cannot be read never stops versions from loading: it is logged once (`labels_unreadable`)
and the server keeps the labels it had (none at start-up). A directory named by a number no version may have
(above 2^63 - 1) is ignored and logged once (`version_dir_ignored`). A version the policy or a label wants is
verified, loaded and warmed up in a loader thread while the event loop keeps serving, and takes traffic only
then. A version no longer wanted is retired: it takes no new requests, the requests that leased it finish on
it, then its batchers stop and its sessions are freed. A version that fails verification or warm-up is logged
(one JSON line naming the file and the reason), counted, and never served; it is tried again only when its
files change. What clients see of a failure (GetModelInfo) names its files relative to the model directory;
the log keeps the full path. The server never retires its last version: with nothing new to serve, it keeps
what it has.

Requests `lease` a version for their whole duration (a stream for all its chunks), by number, by label, or
by the default route. A share of the default route (the canary weight: labels.json's `canary_weight`, else
`--canary-weight`) goes to the `canary` label's version: by the caller's key where it sends one (its
x-request-id, else the request's seed), so that a caller keeps its version; at random otherwise. A request that
names a version or a label is never re-routed. While a canary label names a version other than stable's, the
stable version's inputs are shadow-scored on it (`serving.lifecycle.shadow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from contract.labels import Routes, check_label, read_routes
from contract.repository import (
    ModelRepositoryError,
    ModelVersion,
    VersionListing,
    read_version_dir,
    scan_versions,
    without_paths,
)
from contract.settings import SettingError, check_settings, setting
from serving.dataplane.admission import Slots
from serving.dataplane.batcher import BatchSettings
from serving.dataplane.engine import EngineObserver, LimitSettings, TelemetrySettings, VaeEngine
from serving.dataplane.runtime import (
    GraphSessions,
    ProviderUnavailable,
    RuntimeSettings,
    load_sessions,
    release_freed_memory,
)
from serving.errors import NotFound
from serving.lifecycle.policy import (
    CANARY_LABEL,
    LATEST,
    STABLE_LABEL,
    VersionPolicy,
    canary_bucket,
    resolve_default,
)
from serving.lifecycle.shadow import Comparison, Pair, ShadowObserver, ShadowScoring, ShadowSettings
from serving.tracing import OFF, REQUEST_ID, Span, Tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepositorySettings:
    """Which versions of which model directory the server serves, and how it follows the directory."""

    model_dir: Path = setting(
        Path("models/vae-mnist"), "model directory holding integer versions and labels.json", metavar="DIR"
    )
    version_policy: str = setting(
        "latest",
        "versions to serve: latest, latest:N, specific:V1,V2 or all; versions a label names are served too",
        metavar="POLICY",
    )
    default_version: str = setting(
        LATEST,
        "what a request naming no version gets: latest (the newest served), a label (e.g. stable) or a number",
        metavar="ROUTE",
    )
    poll_seconds: float = setting(
        5.0, "look for new, removed and relabelled versions this often (0: never; SIGHUP looks at once)", minimum=0
    )
    canary_weight: float = setting(
        0.0,
        "share of the requests naming no version that go to the canary label's version (sticky per caller key: "
        "x-request-id, else the request's seed); labels.json's canary_weight overrides it without a restart",
        minimum=0.0,
        maximum=1.0,
    )

    def __post_init__(self) -> None:
        check_settings(self)
        try:
            VersionPolicy.parse(self.version_policy)
        except ValueError as exc:
            raise SettingError("{version_policy}: {problem}", problem=exc) from None
        if self.default_version != LATEST and not self.default_version.isdecimal():
            try:
                check_label(self.default_version)
            except ValueError as exc:
                raise SettingError("{default_version}: {problem}, a number, or latest", problem=exc) from None


class ModelObserver(ShadowObserver, Protocol):
    """What the manager reports (the metrics module implements it)."""

    def model_loaded(self, name: str, version: int, provider: str, score_quantiles: Mapping[str, float]) -> None: ...

    def model_load_failed(self) -> None: ...

    def model_unloaded(self, version: int) -> None: ...

    def labels_changed(self, labels_by_version: dict[int, list[str]], default_version: int | None) -> None: ...

    def canary_changed(self, version: int | None, weight: float) -> None: ...

    def for_version(self, version: int) -> EngineObserver: ...


@dataclass(eq=False)
class _Served:
    engine: VaeEngine
    leases: int = 0  # requests using it now
    retired: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    retiring: Span | None = None  # from retirement to closing (tracing on)


class VersionState(enum.Enum):
    """Where a version is in its life on the server (GetModelInfo's VersionState, by name)."""

    AVAILABLE = "takes requests"
    UNLOADING = "no longer wanted: finishing the requests it has, then freed"
    FAILED = "refused by verification or warm-up: never served (tried again when its files change)"


@dataclass(frozen=True)
class VersionStatus:
    """One version as GetModelInfo reports it."""

    version: int
    state: VersionState
    labels: tuple[str, ...]
    is_default: bool
    error: str = ""  # why it FAILED: the file (relative to the model directory) and the check


class ModelManager:
    """The served versions of one model directory, and the routes to them."""

    def __init__(
        self,
        repository: RepositorySettings,
        runtime: RuntimeSettings,
        batching: BatchSettings,
        limits: LimitSettings,
        executor: Executor,
        observer: ModelObserver,
        check_version: Callable[[ModelVersion], None] = lambda version: None,
        telemetry: TelemetrySettings | None = None,
        tracing: Tracing = OFF,
        shadow: ShadowSettings | None = None,
    ) -> None:
        self.repository = repository
        self.policy = VersionPolicy.parse(repository.version_policy)
        self.runtime, self.batching, self.limits = runtime, batching, limits
        self.telemetry = telemetry or TelemetrySettings()
        self.tracing = tracing  # version loads and retirements are spans; engines trace their batches
        self.executor = executor
        self.observer = observer
        self.check_version = check_version  # start-up checks a version must pass besides its own verification
        self.name = Path(repository.model_dir).name
        self._served: dict[int, _Served] = {}
        self._retiring: set[_Served] = set()
        self._closing: set[asyncio.Task[None]] = set()  # retired versions being closed (awaited by `close`)
        self._routes = Routes()  # labels.json as last read
        self._labels: dict[str, int] = {}
        self._default: int | None = None
        self._canary: int | None = None  # the canary label's version, when served and not the default
        self._canary_weight = 0.0
        self.shadow = ShadowScoring(shadow or ShadowSettings(), self._lease_number, observer)
        self._failed: dict[int, tuple[tuple[tuple[str, int, int], ...], str]] = {}  # version → (files, reason)
        self._labels_problem: str | None = None  # why labels.json was last unreadable (logged once per problem)
        self._ignored_dirs: set[str] = set()  # directories named beyond MAX_VERSION, logged once
        # Shared by every version; one connection gets the share of them it gets of the batchers' queues.
        per_connection = max(1, int(batching.max_queue_share * limits.max_sample_streams))
        self.stream_slots = Slots(limits.max_sample_streams, "streaming calls", per_connection)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._loader_closed = False
        self._refreshing = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the directory and policy say; ModelRepositoryError when nothing could be served."""
        self.shadow.start()
        await self.refresh("start")
        if not self._served:
            reasons = [reason for _, reason in self._failed.values()]
            raise ModelRepositoryError(reasons[0] if reasons else f"{self.repository.model_dir}: no versions to serve")
        if self.repository.poll_seconds > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="model-poller")

    async def close(self) -> None:
        """Stop polling and every version (the server has drained its requests before this)."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.shadow.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for served in [*self._served.values(), *self._retiring]:
            await self._close(served)
        self._served.clear()
        self._loader_closed = True
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.repository.poll_seconds)
            try:
                await self.refresh("poll")
            except Exception:  # a bug here must not stop polling; the versions served stay as they are
                log.exception("model_refresh_failed")

    async def refresh(self, reason: str) -> None:
        """Bring the served versions in line with the directory, the labels and the policy."""
        async with self._refreshing:
            try:
                listing, read = await asyncio.get_running_loop().run_in_executor(self._loader, self._read_directory)
            except ModelRepositoryError as exc:  # the model directory itself is gone or unreadable
                if reason == "start":
                    raise
                fields = {"path": str(self.repository.model_dir), "error": str(exc)}
                log.error("model_dir_unreadable", extra={"fields": fields})
                return
            self._log_ignored(listing.refused)
            present = list(listing.versions)
            routes = self._usable_routes(read)
            self._failed = {version: failure for version, failure in self._failed.items() if version in present}
            wanted = await self._load_wanted(present, routes.labels)
            keep = wanted & self._served.keys()
            for version in set(self._served) - (keep or set(self._served)):  # never retire the last ones
                self._retire(version)
            self._set_routes(routes)

    async def _load_wanted(self, present: list[int], labels: dict[str, int]) -> set[int]:
        """Load what the policy and the labels want, among the versions not known to fail; returns the wanted.

        The policy chooses among loadable versions: when `latest`'s newest fails, the next newest is wanted.
        """
        while True:
            loadable = [version for version in present if not self._failed_unchanged(version)]
            wanted = set(self.policy.select(loadable)) | {v for v in labels.values() if v in loadable}
            missing = sorted(wanted - self._served.keys(), reverse=True)  # the newest first
            if not missing:
                return wanted
            for version in missing:
                await self._load(version)

    # -- routing ------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self, version: int | None = None, label: str | None = None, seed: int | None = None
    ) -> AsyncIterator[VaeEngine]:
        """The engine of the version asked for (by number, label, or the default route), held until exit.

        The default route sends the canary weight's share to the canary (module docstring): by the caller's
        x-request-id, else `seed`, the request's seed where it has one."""
        served = self._resolve(version, label)
        if self._canary_weight > 0 and not (version or label):
            served = self._canary_or(served, seed)
        served.leases += 1
        try:
            yield served.engine
        finally:
            served.leases -= 1
            if served.retired and served.leases == 0:
                self._close_soon(served)

    @property
    def routes_by_request_id(self) -> bool:
        """Whether the version a request naming none gets depends on its caller's key now (a canary weight)."""
        return self._canary is not None and self._canary_weight > 0

    def _canary_or(self, default: _Served, seed: int | None) -> _Served:
        """The canary's engine for the canary weight's share of the callers (by key) or requests, else `default`."""
        canary = self._served.get(self._canary) if self._canary is not None else None
        if canary is None:
            return default
        key = REQUEST_ID.get()
        if key is None and seed is not None:
            key = f"seed:{seed}"
        share = canary_bucket(key) if key is not None else random.random()
        return canary if share < self._canary_weight else default

    def _lease_number(self, version: int) -> contextlib.AbstractAsyncContextManager[VaeEngine]:
        return self.lease(version=version)

    def engine(self, version: int | None = None, label: str | None = None) -> VaeEngine:
        """The engine serving `version` or `label` (neither: the default route's) now, for a look at its state."""
        return self._resolve(version, label).engine

    def comparison(self, version: int | None = None, label: str | None = None) -> Comparison:
        """Shadow scoring's evidence on a candidate (by number or label; neither: the canary's version) against
        stable; NotFound when neither names one and no canary label names a served version."""
        if not version:
            try:
                version = self._resolve(None, label or CANARY_LABEL).engine.version.number
            except NotFound as exc:
                raise NotFound(str(exc) if label else f"no candidate to compare: {exc}") from None
        return self.shadow.comparison(version)

    def status(self) -> list[VersionStatus]:
        """Every version served, unloading or failed, newest first."""
        labels_of = self._labels_by_version()
        available = VersionState.AVAILABLE
        rows = [VersionStatus(v, available, tuple(labels_of.get(v, ())), v == self._default) for v in self._served]
        rows += [
            VersionStatus(s.engine.version.number, VersionState.UNLOADING, (), False)
            for s in self._retiring
            if not s.closed.is_set()
        ]
        model_dir = self.repository.model_dir
        rows += [
            VersionStatus(v, VersionState.FAILED, (), False, without_paths(reason, model_dir))
            for v, (_, reason) in self._failed.items()
        ]
        return sorted(rows, key=lambda row: (-row.version, row.state.name))

    def _resolve(self, version: int | None, label: str | None) -> _Served:
        if label:
            number = self._labels.get(label)
            if number is None or number not in self._served:
                where = "names no version" if number is None else f"names version {number}, which is not served"
                raise NotFound(f"label {label!r} {where}; {self._describe_served()}")
            return self._served[number]
        if version:
            if version not in self._served:
                raise NotFound(f"model version {version} is not served; {self._describe_served()}")
            return self._served[version]
        if self._default is None:
            raise NotFound(f"no version is served; {self._describe_served()}")
        return self._served[self._default]

    def _describe_served(self) -> str:
        labels_of = self._labels_by_version()
        served = [f"{v}" + (f" ({', '.join(labels_of[v])})" if labels_of.get(v) else "") for v in sorted(self._served)]
        return f"served versions: {', '.join(served) or 'none'}"

    def _labels_by_version(self) -> dict[int, list[str]]:
        labels_of: dict[int, list[str]] = {}
        for label, version in sorted(self._labels.items()):
            labels_of.setdefault(version, []).append(label)
        return labels_of

    def _set_routes(self, routes: Routes) -> None:
        served = sorted(self._served)
        self._routes = routes
        labels = self._labels = routes.labels
        default = resolve_default(self.repository.default_version, served, labels)
        if default is None and served:
            default = served[-1]
            if default != self._default:
                fields = {"default_version": self.repository.default_version, "using": default}
                log.warning("default_route_unresolved", extra={"fields": fields})
        self._default = default
        self.observer.labels_changed(self._labels_by_version(), default)
        self._set_canary(routes)

    def _set_canary(self, routes: Routes) -> None:
        """The canary's share of the default route, and the pair of versions shadow scoring compares."""
        labels, default = routes.labels, self._default
        candidate = labels.get(CANARY_LABEL)
        canary = candidate if candidate in self._served and candidate != default else None
        weight = self.repository.canary_weight if routes.canary_weight is None else routes.canary_weight
        if (canary, weight) != (self._canary, self._canary_weight):
            log.info("canary_route", extra={"fields": {"canary": canary, "weight": weight, "default": default}})
            self.observer.canary_changed(canary, weight)
        self._canary, self._canary_weight = canary, weight
        stable = labels.get(STABLE_LABEL) if labels.get(STABLE_LABEL) in self._served else default
        pair = None
        if candidate is not None and stable is not None and candidate in self._served and candidate != stable:
            pair = Pair(stable, candidate)
        self.shadow.compare(pair)

    # -- loading and unloading ----------------------------------------------------------------------------------

    def _read_directory(self) -> tuple[VersionListing, Routes | ModelRepositoryError]:
        """The version directories and labels.json (in the loader thread); a labels file that cannot be read is
        returned as its error, so that it never keeps versions from loading."""
        listing = scan_versions(self.repository.model_dir)
        try:
            return listing, read_routes(self.repository.model_dir)
        except ModelRepositoryError as exc:
            return listing, exc

    def _usable_routes(self, read: Routes | ModelRepositoryError) -> Routes:
        """The labels and weight read, or the ones the server has (none at start-up) when labels.json cannot be
        read: that is logged once per problem, not on every poll."""
        if not isinstance(read, ModelRepositoryError):
            self._labels_problem = None
            return read
        if str(read) != self._labels_problem:
            self._labels_problem = str(read)
            log.error("labels_unreadable", extra={"fields": {"error": str(read), "keeping": self._labels}})
        return self._routes

    def _log_ignored(self, refused: dict[str, str]) -> None:
        """Log each directory named like a version that cannot be one, once (again if it goes and comes back)."""
        for name in sorted(refused.keys() - self._ignored_dirs):
            fields = {"path": str(Path(self.repository.model_dir) / name), "reason": refused[name]}
            log.warning("version_dir_ignored", extra={"fields": fields})
        self._ignored_dirs = set(refused)

    def _failed_unchanged(self, version: int) -> bool:
        """Whether `version` failed before and its files have not changed since (then it is not tried again)."""
        failed = self._failed.get(version)
        return failed is not None and failed[0] == _files_of(Path(self.repository.model_dir) / str(version))

    async def _load(self, version: int) -> None:
        """Verify, load and warm up `version`; serve it, or record why not (and raise ProviderUnavailable)."""
        path = Path(self.repository.model_dir) / str(version)
        files = _files_of(path)
        started = time.perf_counter()
        try:
            with self.tracing.lifecycle("vae.version.load", version) as span:
                in_span = contextvars.copy_context()  # the loader thread's steps are the span's children
                loop = asyncio.get_running_loop()
                sessions = await loop.run_in_executor(self._loader, in_span.run, self._verified_sessions, version)
                span.set_attribute("vae.provider", sessions.provider)
        except Exception as exc:  # verification, a provider that cannot run, a graph that fails its warm-up
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._failed[version] = (files, reason)
            self.observer.model_load_failed()
            log.error("model_load_failed", extra={"fields": {"version": version, "path": str(path), "error": reason}})
            if isinstance(exc, ProviderUnavailable):
                raise
            return
        self._failed.pop(version, None)
        observer = self.observer.for_version(version)
        engine = VaeEngine(
            sessions,
            self.batching,
            self.limits,
            self.executor,
            observer,
            self.telemetry,
            self.stream_slots,
            self.tracing,
            self.shadow.offer,
        )
        engine.start()
        self._served[version] = _Served(engine)
        model = sessions.version
        self.observer.model_loaded(model.name, version, sessions.provider, model.score_quantiles)
        fields = {
            "name": model.name, "version": version, "path": str(model.path), "latent_dim": model.latent_dim,
            "provider": sessions.provider, "encoder_sha256": model.encoder.sha256,
            "decoder_sha256": model.decoder.sha256, "load_seconds": round(time.perf_counter() - started, 3),
        }  # fmt: skip
        log.info("model_loaded", extra={"fields": fields})

    def _verified_sessions(self, version: int) -> GraphSessions:
        """Verify, load and warm up a version (in the loader thread: the event loop keeps serving meanwhile)."""
        step = self.tracing.step
        with step("vae.version.verify"):
            model = read_version_dir(Path(self.repository.model_dir) / str(version), name=self.name, version=version)
            self.check_version(model)
        with step("vae.version.sessions"):
            sessions = load_sessions(model, self.runtime)
        sizes = sorted({1, self.batching.max_batch_size})
        with step("vae.version.warm_up", **{"vae.rows": sizes}):
            sessions.warm_up(sizes)
        return sessions

    def _retire(self, version: int) -> None:
        served = self._served.pop(version)
        served.retired = True
        served.retiring = self.tracing.start_lifecycle(
            "vae.version.retire", version, **{"vae.requests_in_flight": served.leases}
        )
        self._retiring.add(served)
        log.info("model_unloading", extra={"fields": {"version": version, "requests_in_flight": served.leases}})
        if served.leases == 0:
            self._close_soon(served)

    def _close_soon(self, served: _Served) -> None:
        """Close a retired version in a task of its own, kept until it is done (`close` awaits the rest)."""
        task = asyncio.get_running_loop().create_task(self._close(served), name="model-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, served: _Served) -> None:
        if served.closed.is_set():
            return
        served.closed.set()
        await served.engine.close()
        self._retiring.discard(served)
        version = served.engine.version.number
        if version not in self._served:  # not loaded again meanwhile
            self.observer.model_unloaded(version)
        log.info("model_unloaded", extra={"fields": {"version": version}})
        if served.retiring is not None:
            served.retiring.end()
        # Once this coroutine has returned, nothing holds the engine: then give its memory back.
        asyncio.get_running_loop().call_soon(self._release_memory)

    def _release_memory(self) -> None:
        if not self._loader_closed:
            self._loader.submit(release_freed_memory)


def _files_of(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of a version directory's files: what tells a failed version changed since."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))
    except OSError:
        return ()
