"""The sync's state in Redis (`RedisState`, for workers on several machines) behaves as the SQLite
`State` does: every method is run against both, with the same expectations, on a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest

from dl2ls.labelstudio.push import META_KEY, Change, ExistingTask
from dl2ls.localserver import free_port
from dl2ls.sync import ItemRow, RedisState, State, StateError


@pytest.fixture(params=["sqlite", "redis"])
def state(request, tmp_path):
    if request.param == "sqlite":
        opened = State(tmp_path / "state.sqlite")
    else:  # only this side needs redis-server
        opened = RedisState(request.getfixturevalue("redis_client"), 7)
    yield opened
    opened.close()


def row(item: str, scope: str = "s1", digest: str | None = "h", **fields) -> ItemRow:
    return ItemRow(item, fields.pop("updated_at", "2024-01-01T00:00:00.000Z"), fields.pop("annotations", 2), digest,
                   fields.pop("versions", ["dataloop-human"]), scope, **fields)


def record(digest: str) -> dict:
    return {"predictions": {"dataloop-human": digest}}


def task(task_id: int, meta: dict | None = None) -> ExistingTask:
    return ExistingTask(task_id, {"dataloop_item_id": f"i{task_id}"}, meta=meta or {})


def test_items_of_a_few_reads_only_those(state):
    state.commit([row(f"i{n}") for n in range(1200)] + [row("i5", scope="s2", digest="other")])
    assert state.items("s1", only=["i5", "i1199", "missing"]) == {"i5": row("i5"), "i1199": row("i1199")}
    assert state.items("s1", only=[f"i{n}" for n in range(0, 1200, 2)]) == {f"i{n}": row(f"i{n}")
                                                                            for n in range(0, 1200, 2)}
    assert state.items("s2", only=["i5"]) == {"i5": row("i5", scope="s2", digest="other")}
    assert state.items("s1", only=[]) == {}


def test_commit_keeps_rows_forgets_pairs_and_sets_meta(state):
    failing = row("c", digest=None).failed("Label Studio said 400", now=1000.0).failed("again", now=2000.0)
    state.commit([row("a"), row("b", versions=[]), failing], meta={"project": "7", "cursor:s1": "2024-01-01"})
    assert state.items("s1") == {"a": row("a"), "b": row("b", versions=[]), "c": failing}
    assert failing.failures == 2 and failing.retry_at > 2000.0 and state.items("s1")["c"].last_error == "again"
    assert (state.get("project"), state.get("cursor:s1"), state.get("nothing")) == ("7", "2024-01-01", None)

    state.commit([row("b", digest="h2", annotations=5)], forget=[("s1", "a"), ("s1", "never-there")],
                 meta={"cursor:s1": "2024-02-01"})
    assert state.items("s1") == {"b": row("b", digest="h2", annotations=5), "c": failing}
    assert (state.get("project"), state.get("cursor:s1")) == ("7", "2024-02-01")

    # a row that is also forgotten is kept (the forgetting comes first)
    state.commit([row("a", digest="back")], forget=[("s1", "a")])
    assert state.items("s1")["a"] == row("a", digest="back")
    state.commit([], forget=[("s1", "a"), ("s1", "b"), ("s1", "c")])
    assert state.items("s1") == {}


def test_scopes_are_kept_apart(state):
    state.commit([row("a", "s1", digest="one"), row("b", "s1")])
    state.commit([row("a", "s2", digest="two"), row("z", "s2")])
    assert state.items("s1") == {"a": row("a", "s1", digest="one"), "b": row("b", "s1")}
    assert state.items("s2") == {"a": row("a", "s2", digest="two"), "z": row("z", "s2")}
    state.commit([], forget=[("s1", "a")])  # a filter that no longer holds the item: the other scope keeps it
    assert set(state.items("s1")) == {"b"}
    assert state.items("s2")["a"] == row("a", "s2", digest="two")
    assert state.items("s3") == {}


def test_with_records_applies_a_record_only_where_the_task_has_none(state):
    state.keep_records([Change(item="i1", task_id=1, record=record("kept")),
                        Change(item="i2", task_id=2, record=record("kept"))])
    own = {META_KEY: record("own"), "other": 1}
    seen = list(state.with_records([task(1), task(2, own), task(3, {"other": 1})]))
    assert [t.id for t in seen] == [1, 2, 3]
    assert seen[0].recorded == {"dataloop-human": "kept"} and seen[0].meta == {META_KEY: record("kept")}
    assert seen[1].recorded == {"dataloop-human": "own"} and seen[1].meta == own  # its own record wins
    assert seen[2].meta == {"other": 1} and seen[2].recorded == {}

    # more than one batch (500), in order, lazily
    state.keep_records([Change(item=f"i{n}", task_id=n, record=record(str(n))) for n in range(1000, 2200, 2)])
    many = state.with_records(task(n) for n in range(1000, 2200))
    out = list(many)
    assert [t.id for t in out] == list(range(1000, 2200))
    assert all(t.recorded == ({"dataloop-human": str(t.id)} if t.id % 2 == 0 else {}) for t in out)
    assert list(state.with_records([])) == []


def test_intend_marks_tasks_without_overwriting_a_record(state):
    state.intend(c for c in [Change(item="i10", task_id=10), Change(item="i11", task_id=11), Change(item="new")])
    assert state.written_to([10, 11, 12]) == {10, 11}
    assert state.written_to([]) == set()
    assert state.tasks_of(["i10", "i11", "new"]) == {"i10": 10, "i11": 11}
    marked = next(state.with_records([task(10)]))
    assert marked.meta == {META_KEY: {}} and marked.recorded == {}  # an intent is no record of predictions

    state.keep_records([Change(item="i10", task_id=10, record=record("landed"))])
    state.intend([Change(item="i10", task_id=10), Change(item="elsewhere", task_id=10)])  # INSERT OR IGNORE
    assert next(state.with_records([task(10)])).recorded == {"dataloop-human": "landed"}
    assert state.tasks_of(["i10", "elsewhere"]) == {"i10": 10}


def test_keep_records_follow_tasks_and_items(state):
    state.keep_records([Change(item="i1", task_id=1, record=record("a")),
                        Change(item="i2", task_id=2, record=record("b")),
                        Change(item="i3", task_id=3),  # nothing recorded: no record
                        Change(item="i4", record=record("x"))])  # no task: nothing to record on
    assert state.written_to([1, 2, 3, 4]) == {1, 2}
    assert state.tasks_of(["i1", "i2", "i3", "i4", "unknown"]) == {"i1": 1, "i2": 2}

    # a deleted task's record goes, and the item no longer points at it
    state.keep_records([Change(item="i1", task_id=1, delete_task=True), Change(item="gone", task_id=99,
                                                                               delete_task=True)])
    assert state.written_to([1, 2]) == {2} and state.tasks_of(["i1", "i2"]) == {"i2": 2}
    assert next(state.with_records([task(1)])).meta == {}

    # a record naming another item moves the task to it
    state.keep_records([Change(item="i5", task_id=2, record=record("c"))])
    assert state.tasks_of(["i2", "i5"]) == {"i5": 2}

    # two tasks on one item: the highest id, then the other once it is deleted
    state.keep_records([Change(item="dup", task_id=9, record=record("d")),
                        Change(item="dup", task_id=5, record=record("d"))])
    assert state.tasks_of(["dup"]) == {"dup": 9}
    state.keep_records([Change(item="dup", task_id=9, delete_task=True)])
    assert state.tasks_of(["dup"]) == {"dup": 5}

    # kept and deleted in one call: the deletion wins, as it comes last
    state.keep_records([Change(item="i7", task_id=7, record=record("e")), Change(item="i7", task_id=7,
                                                                                 delete_task=True)])
    assert state.written_to([7]) == set() and state.tasks_of(["i7"]) == {}
    state.keep_records([])
    state.keep_records(iter([Change(item="i8", task_id=8, record=record("f"))]))
    assert state.tasks_of(iter(["i8"])) == {"i8": 8}


def test_tasks_of_many_items(state):
    state.keep_records([Change(item=f"i{n}", task_id=n, record=record("r")) for n in range(1, 1300)])
    assert state.tasks_of(f"i{n}" for n in range(0, 1400)) == {f"i{n}": n for n in range(1, 1300)}
    assert state.written_to(range(1200, 1400)) == set(range(1200, 1300))


def test_without_item_and_tried_lately(state):
    now = time.time()
    state.without_item([1, 2], now=now - 100)
    state.without_item([3])
    state.without_item([])
    assert state.tried_lately([1, 2, 3, 4], within=50) == {3}
    assert state.tried_lately([1, 2, 3, 4], within=200) == {1, 2, 3}
    state.without_item([1], now=now)  # tried again: replaced
    assert state.tried_lately([1, 2, 3, 4], within=50) == {1, 3}
    assert state.tried_lately([], within=50) == set()
    assert state.tried_lately(range(5, 1500), within=1e9) == set()


def test_twenty_thousand_items_round_trip_in_pages(state):
    scans = []
    if isinstance(state, RedisState):  # items() pages through the hash, never one HGETALL reply
        client = state.redis
        original = client.hscan

        def counted(*args, **kwargs):
            scans.append(1)
            return original(*args, **kwargs)

        client.hscan = counted
        client.hgetall = None  # any use fails
    rows = [row(f"item-{n:05d}", digest=f"{n:040x}", versions=["dataloop-human", f"model-{n % 3}"])
            for n in range(20_000)]
    state.commit(rows, meta={"project": "7"})
    assert state.items("s1") == {r.item_id: r for r in rows}
    if isinstance(state, RedisState):
        assert len(scans) > 1


# ----------------------------------------------------------------------------- Redis only


def test_keys_and_path(redis_client):
    state = RedisState(redis_client, 7)
    other = RedisState(redis_client, 8, prefix="other")
    assert state.path == "redis:dl2ls:state:7" and other.path == "redis:other:state:8"
    state.commit([row("a", "s1")], meta={"project": "7"})
    state.keep_records([Change(item="a", task_id=1, record=record("r"))])
    state.without_item([1])
    assert sorted(k.decode() for k in redis_client.keys("*")) == [
        "dl2ls:state:7:items:s1", "dl2ls:state:7:meta", "dl2ls:state:7:task-of", "dl2ls:state:7:tasks",
        "dl2ls:state:7:without"]
    assert other.items("s1") == {} and other.get("project") is None and other.tasks_of(["a"]) == {}
    assert RedisState(redis_client, 8).written_to([1]) == set()  # another project of the same prefix


def test_a_client_that_decodes_replies(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    state = RedisState(client, 7)
    state.commit([row("a")], meta={"project": "7"})
    state.keep_records([Change(item="a", task_id=1, record=record("r"))])
    assert state.items("s1") == {"a": row("a")} and state.get("project") == "7"
    assert state.tasks_of(["a"]) == {"a": 1} and next(state.with_records([task(1)])).recorded
    client.close()


def test_an_unreachable_redis_is_a_state_error_without_the_password(redis_server):
    import redis

    client = redis.Redis.from_url(f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0", socket_connect_timeout=2)
    with pytest.raises(StateError) as caught:
        RedisState(client, 7)
    assert "redis:dl2ls:state:7" in str(caught.value) and "hunter2" not in str(caught.value)


def test_concurrent_writers_lose_nothing(redis_server, redis_client):
    """Subset jobs of one project on several machines: each writes its own rows, records and marks
    at once (a client, and so a connection, each); every call is atomic, so nothing is lost and the
    reverse index stays consistent."""
    writers, rounds = 4, 150
    errors: list[BaseException] = []
    start = threading.Barrier(writers)

    def write(w: int) -> None:
        client = redis_server.client()
        state = RedisState(client, 7)
        try:
            start.wait()
            for n in range(rounds):
                item = f"w{w}-{n}"
                state.commit([row(item), row(f"shared-{n}", scope=f"scope-{w}")], meta={f"worker:{w}": str(n)})
                mine, theirs = w * 10_000 + n, 1_000_000 + w * 10_000 + n
                state.intend([Change(item=item, task_id=mine), Change(item="contended", task_id=theirs)])
                # every other task is deleted right after it landed, in the same call
                state.keep_records([Change(item=item, task_id=mine, record=record(item)),
                                    Change(item="contended", task_id=theirs, record=record("x"))]
                                   + [Change(item=item, task_id=mine, delete_task=True),
                                      Change(item="contended", task_id=theirs, delete_task=True)] * (n % 2 == 0))
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            client.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors

    client = redis_server.client()
    state = RedisState(client, 7)
    items = state.items("s1")
    assert set(items) == {f"w{w}-{n}" for w in range(writers) for n in range(rounds)}
    assert all(set(state.items(f"scope-{w}")) == {f"shared-{n}" for n in range(rounds)} for w in range(writers))
    assert {state.get(f"worker:{w}") for w in range(writers)} == {str(rounds - 1)}
    tasks = [w * 10_000 + n for w in range(writers) for n in range(rounds)]
    assert state.written_to(tasks) == {t for t in tasks if t % 2 == 1}
    odd = {f"w{w}-{n}": w * 10_000 + n for w in range(writers) for n in range(1, rounds, 2)}
    assert state.tasks_of(list(odd) + [f"w{w}-{n}" for w in range(writers) for n in range(0, rounds, 2)]) == odd
    # the item every writer wrote on: its index holds exactly the surviving tasks
    survivors = sorted(1_000_000 + t for t in tasks if t % 2 == 1)
    assert sorted(int(t) for t in client.hget("dl2ls:state:7:task-of", "contended").split(b",")) == survivors
    assert state.tasks_of(["contended"]) == {"contended": max(survivors)}
    client.close()
