"""The cost of one call does not grow with the number of migrations (issue 8).

No timings: these count the work a call does (model advances, rows decoded,
links scanned), which is what grows with N when something is quadratic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apitools import Api

from lmwatch import store as store_module
from lmwatch.clock import VirtualClock
from lmwatch.drivers import simphysics
from lmwatch.drivers.inventory import Inventory, load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.drivers.sim_world import SqliteWorld
from lmwatch.engine import Engine, EngineSettings
from lmwatch.metrics import Metrics
from lmwatch.model import MigrationRequest, StartPlan, State
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import MigrationRecord, Store

PLAN = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)


def _inventory(pairs: int, per_link: int) -> Inventory:
    lines = ["hosts:"]
    for p in range(pairs):
        lines += [f"  - {{name: s{p}, memory: 1TiB}}", f"  - {{name: d{p}, memory: 1TiB}}"]
    lines.append("links:")
    lines += [f"  - {{between: [s{p}, d{p}], bandwidth: 1GiB/s}}" for p in range(pairs)]
    lines.append("instances:")
    for p in range(pairs):
        for k in range(per_link):
            lines.append(
                f"  - {{name: vm{p}-{k}, host: s{p}, memory: 8GiB, working_set: 64MiB, "
                "change_rate: 1MiB/s}"
            )
    return load_inventory_text("\n".join(lines) + "\n")


async def _started(pairs: int, per_link: int) -> tuple[SimDriver, VirtualClock, list[str]]:
    clock = VirtualClock()
    driver = SimDriver(_inventory(pairs, per_link), clock)
    ids = []
    for p in range(pairs):
        for k in range(per_link):
            mid = f"m{p}-{k}"
            request = MigrationRequest(instance=f"vm{p}-{k}", source=f"s{p}", destination=f"d{p}")
            await driver.start(mid, request, PLAN)
            ids.append(mid)
    return driver, clock, ids


@pytest.fixture
def advances(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the model's advance (one job moved forward once)."""
    counter = [0]
    original = simphysics.Migration.advance

    def counted(self: simphysics.Migration, dt: float) -> None:
        counter[0] += 1
        original(self, dt)

    monkeypatch.setattr(simphysics.Migration, "advance", counted)
    return counter


@pytest.mark.parametrize("pairs", [5, 50])
async def test_a_sample_advances_only_the_jobs_of_its_link(pairs: int, advances: list[int]) -> None:
    driver, clock, ids = await _started(pairs, per_link=2)
    await clock.advance(0.5)
    advances[0] = 0
    await driver.sample(ids[0])
    assert advances[0] == 2  # its own job and the one sharing its link; not 2 x pairs


async def test_polls_in_wall_clock_time_cost_linear_work(advances: list[int]) -> None:
    driver, clock, ids = await _started(20, per_link=1)
    advances[0] = 0
    for mid in ids:  # each poll sees a later clock, as under the daemon
        await clock.advance(0.01)
        await driver.sample(mid)
        await driver.sample(mid)  # same instant: nothing to advance
        await clock.advance(0.001)
        await driver.wait_event(mid, 0.0)  # its next event is known from the sample
    assert advances[0] == len(ids)  # N polls cost N advances, not N x N


def test_link_lookups_do_not_scan_the_links() -> None:
    inventory = _inventory(30, per_link=1)
    scans = [0]

    class Counting(tuple[Any, ...]):
        def __iter__(self) -> Any:
            scans[0] += 1
            return super().__iter__()

    object.__setattr__(inventory, "links", Counting(inventory.links))
    for p in range(30):
        assert inventory.bandwidth(f"s{p}", f"d{p}") == 1024**3
        assert inventory.bandwidth(f"d{p}", f"s{p}") == 1024**3
        assert inventory.link(f"s{p}", f"s{(p + 1) % 30}") is None
    assert scans[0] <= 1


# --- store and API: admission, list pages, flushing --------------------------------


def _record(number: int, state: State = State.COPYING) -> MigrationRecord:
    return MigrationRecord(
        id=f"m{number:04d}",
        instance=f"vm{number}",
        source="a",
        destination="b",
        labels={},
        requested_profile=None,
        profile_name="default",
        profile_reason="the default",
        profile={"name": "default"},
        memory_bytes=1024,
        state=state,
        created_at=1000.0 + number,
    )


def test_admission_decodes_only_the_instance_s_record(
    shared_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = shared_store  # of each kind (SQLite, PostgreSQL)
    for number in range(60):
        store.insert(_record(number), "accepted")
    decoded = [0]
    original = store_module._from_row

    def counted(row: Any) -> MigrationRecord:
        decoded[0] += 1
        return original(row)

    monkeypatch.setattr(store_module, "_from_row", counted)
    found = store.active_for_instance("vm42")
    assert found is not None and found.id == "m0042"
    assert store.active_for_instance("vm-unknown") is None
    assert decoded[0] == 1  # not every unfinished record


def test_store_pages_follow_list_order(shared_store: Store) -> None:
    store = shared_store  # of each kind (SQLite, PostgreSQL)
    for number in (3, 1, 2, 5, 4):
        state = State.COMPLETED if number % 2 else State.COPYING
        store.insert(_record(number, state), "accepted")
    everything = [r.id for r in store.list()]
    first = store.page(limit=2)
    second = store.page(limit=2, after=first[-1].id)
    third = store.page(limit=2, after=second[-1].id)
    assert [r.id for r in first + second + third] == everything
    assert len(third) == 1
    done = store.page(State.COMPLETED, limit=2)
    assert [r.id for r in done] == ["m0001", "m0003"]
    assert [r.id for r in store.page(State.COMPLETED, limit=2, after="m0003")] == ["m0005"]
    assert store.page(limit=2, after="nobody") == []


def test_transitions_are_not_flushed_but_acceptance_is(store: Store) -> None:
    def synchronous() -> int:
        return int(store._db.execute("PRAGMA synchronous").fetchone()[0])

    assert synchronous() == 1  # NORMAL: a transition is written, not flushed
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    record = _record(1)
    store.insert(record, "accepted")
    assert "PRAGMA synchronous=FULL" in statements
    assert statements.index("PRAGMA synchronous=FULL") < statements.index("COMMIT")
    statements.clear()
    store.update(record, event=("state", "now copying", None), state=State.COPYING)
    assert not any("synchronous=FULL" in s for s in statements)
    assert synchronous() == 1


async def test_the_list_comes_in_pages(api: Api) -> None:
    ids = []
    for instance in ("quiet", "quiet2", "quiet3"):
        answer = await api.post(
            "/v1/migrations", {"instance": instance, "source": "a", "destination": "b"}
        )
        assert answer.status == 202, answer.text
        ids.append(answer.body["id"])
    whole = await api.get("/v1/migrations")
    assert "next" not in whole.body
    assert sorted(m["id"] for m in whole.body["migrations"]) == sorted(ids)
    ids = [m["id"] for m in whole.body["migrations"]]  # list order: created_at, then id
    first = await api.get("/v1/migrations?limit=2")
    assert [m["id"] for m in first.body["migrations"]] == ids[:2]
    assert first.body["next"] == ids[1]
    rest = await api.get(f"/v1/migrations?limit=2&after={first.body['next']}")
    assert [m["id"] for m in rest.body["migrations"]] == ids[2:]
    assert rest.body["next"] is None
    assert (await api.get("/v1/migrations?after=nope")).body == {"migrations": [], "next": None}
    for query in ("limit=0", "limit=x", f"limit={10**6}"):
        answer = await api.get(f"/v1/migrations?{query}")
        assert answer.status == 422, query
        assert answer.body["errors"][0]["loc"] == ["query", "limit"]


async def test_metrics_are_rendered_off_the_event_loop(
    api: Api, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    original = metrics.render

    def recorded() -> bytes:
        threads.append(threading.get_ident())
        return original()

    monkeypatch.setattr(metrics, "render", recorded)
    answer = await api.get("/metrics")
    assert answer.status == 200
    assert threads and threads[0] != threading.get_ident()


# --- the poll path: polls spread over the interval -------------------------------------


def _engine(
    tmp_path: Path, count: int, new_id: Callable[[], str] | None = None
) -> tuple[Engine, SimDriver, VirtualClock, Store]:
    """An engine in virtual time that may run `count` migrations on one link at once."""
    clock = VirtualClock()
    driver = SimDriver(_inventory(1, per_link=count), clock)
    store = Store.open(tmp_path / "lmwatch.db")
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("profiles:\n  - name: default\n    max_blackout: 300ms\n")
    engine = Engine(
        driver=driver,
        store=store,
        profiles=ProfileRegistry(profiles),
        clock=clock,
        metrics=Metrics(),
        settings=EngineSettings(
            poll_interval=1.0,
            max_per_source=count,
            max_per_destination=count,
            measure_change_rate=False,
        ),
        new_id=new_id,
    )
    return engine, driver, clock, store


async def _submit(engine: Engine, count: int) -> None:
    for k in range(count):
        await engine.submit(MigrationRequest(instance=f"vm0-{k}", source="s0", destination="d0"))


async def test_migrations_started_together_poll_spread_over_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 migrations started at one instant: their polls do not all come due at once."""
    count = 40
    # Ids as the engine makes them (random UUIDs), but seeded: a poll's phase is a
    # hash of its migration's id, so random ids would make this check a lottery.
    ids = random.Random(1)
    engine, driver, clock, store = _engine(
        tmp_path, count, new_id=lambda: str(uuid.UUID(int=ids.getrandbits(128), version=4))
    )
    polls: list[float] = []
    original = driver.sample

    async def sample(migration_id: str) -> Any:
        polls.append(clock.now())
        return await original(migration_id)

    monkeypatch.setattr(driver, "sample", sample)
    await engine.start()
    try:
        await _submit(engine, count)
        await clock.advance(0.0)
        polls.clear()
        started = clock.now()
        await clock.advance(5.0)
    finally:
        await engine.stop()
        store.close()
    # the fourth second (every migration polls once in each second)
    window = [t - started for t in polls if started + 3.0 <= t < started + 4.0]
    assert len(window) == count
    tenths = Counter(int((t % 1.0) * 10) for t in window)
    assert len(tenths) >= 8  # spread over at least 8 of the 10 tenths of the interval
    assert max(tenths.values()) <= count // 4  # no tenth has more than a quarter of them


async def test_progress_is_published_only_to_listeners_and_gauges_are_looked_up_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 5
    engine, driver, clock, store = _engine(tmp_path, count)
    published: list[str] = []
    publish = engine.hub.publish

    def counted_publish(type_: str, data: Any) -> Any:
        published.append(type_)
        return publish(type_, data)

    monkeypatch.setattr(engine.hub, "publish", counted_publish)
    lookups = [0]
    gauge = engine._effects.metrics.remaining
    labels = gauge.labels

    def counted_labels(*values: str) -> Any:
        lookups[0] += 1
        return labels(*values)

    monkeypatch.setattr(gauge, "labels", counted_labels)
    polls = [0]
    original = driver.sample

    async def sample(migration_id: str) -> Any:
        polls[0] += 1
        return await original(migration_id)

    monkeypatch.setattr(driver, "sample", sample)
    await engine.start()
    try:
        await _submit(engine, count)
        await clock.advance(10.0)
        assert polls[0] >= 10 * count
        assert "progress" not in published  # nobody listens
        assert lookups[0] == count  # one lookup per migration, not one per poll
        subscription = engine.hub.subscribe()
        await clock.advance(2.0)
        assert published.count("progress") >= count  # a listener gets every migration's
        assert subscription.queue
    finally:
        await engine.stop()
        store.close()


def test_prediction_json_is_the_prediction_s_fields() -> None:
    from dataclasses import asdict

    from lmwatch.model import Prediction
    from lmwatch.records import prediction_json

    prediction = Prediction(1.0, 2.0, 3, None, 0.5, False, 7, 0.25)
    assert prediction_json(prediction) == asdict(prediction)
    assert prediction_json(None) is None


# --- the collector ---------------------------------------------------------------------


def test_serve_freezes_start_up_and_collects_less_often_once_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 2,000 migrations the collector's full scans stopped the loop for 0.2-0.6 s every
    second or two, freeing nothing: `lmwatch serve` settles it once it is ready."""
    import gc

    from lmwatch import daemon

    calls: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "set_threshold", lambda *t: calls.append(f"threshold {t}"))

    async def run(settings: Any, *, on_ready: Any = None, **_: Any) -> None:
        calls.append("started")
        assert on_ready is not None
        on_ready([("127.0.0.1", 1)])
        calls.append("stopped")

    monkeypatch.setattr(daemon, "run", run)
    monkeypatch.setattr(daemon, "configure", lambda *_: None)  # leave the test's logging
    assert daemon.serve(daemon.settings_from({})) == 0
    young, older = daemon.GC_YOUNG_THRESHOLD, daemon.GC_OLDER_THRESHOLD
    assert calls == ["started", "freeze", f"threshold {(young, older, older)}", "stopped"]
    assert young >= 10 * 700  # far above Python's default


class _CountingWorld(SqliteWorld):
    """The SQLite keeper, remembering which jobs each save wrote."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.saved: list[set[str]] = []

    def save(self, state, at, jobs, *, drop=()):  # type: ignore[no-untyped-def]
        self.saved.append(set(jobs))
        super().save(state, at, jobs, drop=drop)


async def test_the_periodic_world_save_writes_the_advanced_links_jobs_not_every_job(
    tmp_path: Path,
) -> None:
    """Once `save_every` has passed, a poll saves its own link's jobs (and the world's
    small state), never every job of every link at once: at thousands of jobs that one
    save stalled the daemon. A restarted simulator still finds every job."""
    pairs = 20
    hosts = "\n".join(
        f"  - {{name: s{i}, memory: 64GiB}}\n  - {{name: d{i}, memory: 64GiB}}"
        for i in range(pairs)
    )
    instances = "\n".join(
        f"  - {{name: vm{i}, host: s{i}, memory: 16GiB, working_set: 16MiB, change_rate: 1MiB/s}}"
        for i in range(pairs)
    )
    text = f"hosts:\n{hosts}\ndefault_bandwidth: 1GiB/s\ninstances:\n{instances}\n"
    clock = VirtualClock()
    world = _CountingWorld(str(tmp_path / "world.db"))
    driver = SimDriver(load_inventory_text(text), clock, world=world, save_every=5.0)
    plan = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
    for i in range(pairs):
        await driver.start(f"m{i}", MigrationRequest(f"vm{i}", f"s{i}", f"d{i}"), plan)
    await clock.advance(6.0)
    world.saved.clear()
    await driver.sample("m3")
    assert world.saved and max(len(jobs) for jobs in world.saved) == 1
    assert set().union(*world.saved) == {"m3"}
    world.saved.clear()
    for i in range(pairs):
        await driver.sample(f"m{i}")
    assert max(len(jobs) for jobs in world.saved) == 1  # every link saved its own, in turn
    assert set().union(*world.saved) == {f"m{i}" for i in range(pairs) if i != 3}
    world.close()
    again = SimDriver(
        load_inventory_text(text), clock, world=SqliteWorld(str(tmp_path / "world.db"))
    )
    for i in range(pairs):
        assert (await again.sample(f"m{i}")).memory_transferred > 0


# --- admission and scheduling keep per-host figures (no walk over every migration) ----


class _CountingDict(dict[str, Any]):
    """The engine's supervisions, counting every one a caller looks at."""

    visits = 0

    def values(self) -> Any:
        for value in super().values():
            self.visits += 1
            yield value

    def items(self) -> Any:
        for item in super().items():
            self.visits += 1
            yield item

    def __iter__(self) -> Any:
        for key in super().__iter__():
            self.visits += 1
            yield key


async def _one_more(
    tmp_path: Any, registry: ProfileRegistry, queued: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, int]:
    """Supervisions looked at and rows decoded to admit one more migration, with
    `queued` already waiting on the same source (limit: one under way per host)."""
    clock = VirtualClock()
    store = Store.open(tmp_path / f"n{queued}.db")
    engine = Engine(
        driver=SimDriver(_inventory(2, queued + 2), clock),
        store=store,
        profiles=registry,
        clock=clock,
        settings=EngineSettings(max_per_source=1, max_per_destination=1),
    )
    await engine.start()
    try:
        for k in range(queued):
            await engine.submit(
                MigrationRequest(instance=f"vm0-{k}", source="s0", destination="d0")
            )
        assert engine.active_count() == queued
        counting = _CountingDict(engine._supervisions)
        engine._supervisions = counting
        decoded = [0]
        original = store_module._from_row

        def counted(row: Any) -> MigrationRecord:
            decoded[0] += 1
            return original(row)

        monkeypatch.setattr(store_module, "_from_row", counted)
        named = MigrationRequest(instance=f"vm0-{queued}", source="s0", destination="d0")
        await engine.submit(named)
        chosen = MigrationRequest(instance=f"vm0-{queued + 1}", source="s0", destination=None)
        record, _ = await engine.submit(chosen)
        assert record.destination in ("d0", "s1", "d1")
        monkeypatch.undo()
        return counting.visits, decoded[0]
    finally:
        await engine.stop()
        store.close()


async def test_admitting_the_nth_migration_looks_at_no_other(
    tmp_path: Any, registry: ProfileRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    few = await _one_more(tmp_path, registry, 5, monkeypatch)
    many = await _one_more(tmp_path, registry, 60, monkeypatch)
    assert many == few  # the same work, whatever the number already accepted
    visits, decoded = many
    assert visits == 0  # no walk over the supervisions (reservations, the scheduler)
    assert decoded <= 2  # at most the instance's own record


async def test_a_freed_slot_starts_the_oldest_queued_migration_of_its_hosts(
    tmp_path: Any, registry: ProfileRegistry
) -> None:
    clock = VirtualClock()
    store = Store.open(tmp_path / "s.db")
    engine = Engine(
        driver=SimDriver(_inventory(3, 3), clock),
        store=store,
        profiles=registry,
        clock=clock,
        settings=EngineSettings(max_per_source=1, max_per_destination=1),
    )
    await engine.start()
    try:
        ids = {}
        for p in (0, 1):
            for k in range(3):
                record, _ = await engine.submit(
                    MigrationRequest(instance=f"vm{p}-{k}", source=f"s{p}", destination=f"d{p}")
                )
                ids[p, k] = record.id
                clock._now += 1.0  # distinct acceptance times
        states = lambda: {key: engine.get(i).state for key, i in ids.items()}  # noqa: E731
        assert states()[0, 1] is State.QUEUED and states()[1, 1] is State.QUEUED
        assert states()[0, 0] is not State.QUEUED and states()[1, 0] is not State.QUEUED
        await engine.cancel(ids[0, 2])  # a queued one leaves the queue, freeing nothing
        assert await clock.run_until(lambda: engine.get(ids[0, 0]).state.finished, limit=3600)
        assert await clock.run_until(
            lambda: engine.get(ids[0, 1]).state is not State.QUEUED, limit=60
        )
        assert engine.get(ids[0, 2]).state is State.CANCELLED
        assert await clock.run_until(lambda: engine.finished(ids.values()), limit=3 * 3600)
        assert engine.metrics.queued._value.get() == 0
        assert engine.metrics.active._value.get() == 0
    finally:
        await engine.stop()
        store.close()


async def test_the_whole_list_is_read_off_the_event_loop(
    api: Api, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "destination": "b"}
    )
    assert answer.status == 202, answer.text
    loop_thread = threading.get_ident()
    readers: list[int] = []
    original = engine.store.list
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    def slow_list(state: State | None = None) -> list[MigrationRecord]:
        readers.append(threading.get_ident())
        time.sleep(0.2)  # a table of tens of thousands of records
        return original(state)

    monkeypatch.setattr(engine.store, "list", slow_list)
    ticking = asyncio.create_task(ticker())
    whole = await api.get("/v1/migrations")
    ticking.cancel()
    assert whole.status == 200 and "next" not in whole.body
    assert [m["id"] for m in whole.body["migrations"]] == [answer.body["id"]]
    assert readers and loop_thread not in readers
    assert ticks > 20  # the loop went on while the table was read


async def test_a_start_decodes_each_stored_migration_once(
    store: Store, registry: ProfileRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = {"name": "default", "max_blackout": "1s"}
    for number in range(40):
        state = State.COMPLETED if number % 4 == 0 else State.QUEUED
        store.insert(dataclasses.replace(_record(number, state), profile=profile), "accepted")
    decoded = [0]
    original = store_module._from_row

    def counted(row: Any) -> MigrationRecord:
        decoded[0] += 1
        return original(row)

    monkeypatch.setattr(store_module, "_from_row", counted)
    clock = VirtualClock()
    engine = Engine(
        driver=SimDriver(_inventory(1, 1), clock),
        store=store,
        profiles=registry,
        clock=clock,
        settings=EngineSettings(max_per_source=0, max_per_destination=0),
    )
    await engine.start()
    try:
        assert engine.active_count() == 30
        assert decoded[0] == 40  # every row once: checked, taken back or learned from
    finally:
        await engine.stop()


def test_the_busy_scale_inventory_has_noisy_instances_that_never_converge_alone() -> None:
    """`python -m lmwatch.bench.scale --busy`: every instance writes faster than its
    share of the link copies and carries a real host's noise."""
    from lmwatch.bench.scale import BUSY_PROFILES, PER_JOB_MIB_S, inventory_yaml
    from lmwatch.profiles import load_profiles_text

    quiet = load_inventory_text(inventory_yaml(20, per_link=10))
    busy = load_inventory_text(inventory_yaml(20, per_link=10, busy=True))
    assert len(busy.instances) == len(quiet.instances) == 20
    assert all(i.jitter == 0.0 for i in quiet.instances)
    for instance in busy.instances:
        assert instance.jitter == 0.05 and instance.writer == "random"
        assert instance.change_rate.rate > PER_JOB_MIB_S * 1024**2  # type: ignore[union-attr]
    # ... under a profile that only waits, for the window to see them all
    (waiting,) = load_profiles_text(BUSY_PROFILES).profiles
    assert not (waiting.may_slow_down or waiting.may_pause or waiting.handover_allowed)
    assert waiting.deadline.fixed == 3600.0
