"""The one planner on its own (pure): identity, media, predictions, deletions and the project's
model_version, in the cases that could duplicate, lose or misplace predictions."""

from __future__ import annotations

import orjson
import pytest

from dl2ls.labelstudio.push import META_KEY, ExistingTask, Planner, Stats, mass_deletion, prediction_hash

RESULT = [{"id": "a", "type": "videorectangle", "value": {}}]
DIGEST = prediction_hash(RESULT, None)


def task(item_id, filename="/cam1/clip.mp4", fps=25.0, result=RESULT, version="v"):
    data = {"video": f"https://dl/{item_id}", "dataloop_item_id": item_id, "dataloop_filename": filename, "fps": fps}
    if item_id is None:
        del data["dataloop_item_id"]
    return {"data": data, "predictions": [{"model_version": version, "result": result}]}


def plan(planner, t, stats=None, previous=()):
    return planner.plan(t, orjson.dumps(t), stats or Stats(), previous)


def existing(tid, data, versions=(), total=None, recorded=None, annotations=0, created=False):
    if data.get("dataloop_item_id") == "A":  # a task dl2ls made for item A: nothing missing from its data
        data = {**task("A")["data"], **data}
    meta = {META_KEY: {"predictions": recorded}} if recorded is not None else {}
    if created:
        meta[META_KEY]["created"] = True
    return ExistingTask(tid, data, annotations, len(versions) if total is None else total, list(versions), meta)


def test_an_item_lands_on_the_task_that_shares_the_longest_path():
    tasks = [existing(1, {"video": "s3://b/cam1/clip.mp4"}), existing(2, {"video": "s3://b/cam2/clip.mp4"})]
    planner = Planner(tasks, "video", "filename")
    planner.match_paths({"A": "/cam2/clip.mp4", "B": "/cam1/clip.mp4"})
    assert plan(planner, task("A", "/cam2/clip.mp4")).task_id == 2
    assert plan(planner, task("B", "/cam1/clip.mp4")).task_id == 1


@pytest.mark.parametrize("tasks, items, reported", [
    # one item, two tasks that fit it equally
    (["s3://b/cam1/clip.mp4", "s3://b/cam2/clip.mp4"], {"A": "/clip.mp4"}, "item /clip.mp4 fits tasks 1"),
    # two items, one task that knows only the file name: it fits both equally
    (["https://host/clip.mp4"], {"A": "/cam1/clip.mp4", "B": "/cam2/clip.mp4"}, "task /clip.mp4 fits items A"),
])
def test_equally_good_candidates_match_neither_and_are_reported(tasks, items, reported):
    warnings, stats = [], Stats()
    planner = Planner([existing(i + 1, {"video": v}) for i, v in enumerate(tasks)], "video", "filename",
                      warn=warnings.append)
    planner.match_paths(items)
    for key, path in items.items():
        assert plan(planner, task(key, path), stats) is None  # on no task, not even a new one
    assert stats.items_ambiguous == len(items) and stats.tasks_created == 0
    assert any(reported in w for w in warnings), warnings


@pytest.mark.parametrize("tasks, item", [
    (["s3://b/cam1/clip.mp4"], "/cam2/clip.mp4"),  # cam2's task is not in the project: cam1's is not it
    (["s3://b/x/clip.mp4"], "/y/clip.mp4"),
])
def test_a_folder_that_differs_is_another_file(tasks, item):
    planner = Planner([existing(i + 1, {"video": v}) for i, v in enumerate(tasks)], "video", "filename")
    planner.match_paths({"B": item})
    assert plan(planner, task("B", item)).new_task is not None


def test_an_item_that_has_its_task_still_keeps_others_off_a_task_of_its_path():
    tasks = [existing(1, {"video": "s3://b/cam1/clip.mp4", "dataloop_item_id": "A", "dataloop_filename": "/cam1/clip.mp4"}),
             existing(2, {"video": "https://host/clip.mp4"})]
    planner = Planner(tasks, "video", "filename")
    planner.match_paths({"A": "/cam1/clip.mp4", "B": "/cam2/clip.mp4"})
    assert plan(planner, task("B", "/cam2/clip.mp4")) is None  # task 2 fits A as well as B: neither takes it


def test_a_task_that_belongs_to_another_item_is_never_adopted():
    tasks = [existing(1, {"video": "s3://b/cam1/clip.mp4", "dataloop_item_id": "A"})]
    planner = Planner(tasks, "video", "filename")
    planner.match_paths({"B": "/cam1/clip.mp4"})
    assert plan(planner, task("B", "/cam1/clip.mp4")).new_task is not None


def test_items_without_an_id_are_known_by_their_path_in_every_match_mode():
    for mode in ("item-id", "filename"):
        ours = existing(5, {"video": "/clip.mp4", "dataloop_filename": "/sub/clip.mp4", "fps": 25.0}, ["v"],
                        recorded={"v": DIGEST})
        planner = Planner([ours], "video", mode)
        planner.match_paths({"file:/sub/clip.mp4": "/sub/clip.mp4"})
        stats = Stats()
        change = plan(planner, task(None, "/sub/clip.mp4"), stats)
        assert change.task_id == 5 and not change.writes_anything and stats.predictions_unchanged == 1


def test_a_tasks_media_is_never_changed_only_missing_keys_added():
    storage = existing(2, {"video": "s3://b/x/clip.mp4"})
    planner = Planner([storage], "video", "filename")
    planner.match_paths({"B": "/x/clip.mp4"})
    change = plan(planner, task("B", "/x/clip.mp4"))
    assert change.data_update["video"] == "s3://b/x/clip.mp4" and change.data_update["fps"] == 25.0
    assert change.data_update["dataloop_item_id"] == "B"
    ours = existing(1, {"video": "/data/local-files/?d=clip.mp4", "dataloop_item_id": "A", "fps": 25.0,
                        "dataloop_filename": "/cam1/clip.mp4"}, ["v"], recorded={"v": DIGEST})
    warnings = []
    change = plan(Planner([ours], "video", warn=warnings.append), task("A", "/cam1/moved.mp4", fps=29.97))
    assert change.data_update is None and not change.writes_anything  # nothing of the user's is rewritten
    assert "differs" in warnings[0]


@pytest.mark.parametrize("case, existing_task, write, replace, counts", [
    ("unchanged", existing(1, {"dataloop_item_id": "A"}, ["v", "other"], recorded={"v": DIGEST}),
     False, [], {"predictions_unchanged": 1}),
    ("changed", existing(1, {"dataloop_item_id": "A"}, ["v"], recorded={"v": "old"}),
     True, ["v"], {"predictions_replaced": 1}),
    ("duplicate left by a killed run", existing(1, {"dataloop_item_id": "A"}, ["v"], total=2, recorded={"v": DIGEST}),
     True, ["v"], {"predictions_replaced": 1}),
    ("deleted by someone", existing(1, {"dataloop_item_id": "A"}, [], recorded={"v": DIGEST}),
     True, [], {"predictions_created": 1}),
    ("written before dl2ls kept records", existing(1, {"dataloop_item_id": "A"}, ["v"]),
     True, ["v"], {"predictions_replaced": 1}),
    ("a stale version", existing(1, {"dataloop_item_id": "A"}, ["v", "gone"], recorded={"v": DIGEST, "gone": "x"}),
     False, ["gone"], {"predictions_unchanged": 1, "predictions_deleted": 1}),
])
def test_each_version_ends_with_exactly_one_prediction(case, existing_task, write, replace, counts):
    stats = Stats()
    change = plan(Planner([existing_task], "video"), task("A"), stats)
    assert bool(change.write) is write, case
    assert change.replace_versions == replace, case
    for name, value in counts.items():
        assert getattr(stats, name) == value, (case, name)
    if change.writes_anything:  # the record follows what was written
        assert change.meta_update[META_KEY]["predictions"] == {"v": DIGEST}


def test_the_same_item_twice_in_the_sources_is_planned_once():
    warnings, stats = [], Stats()
    planner = Planner([], "video", warn=warnings.append)
    assert plan(planner, task("A"), stats).new_task is not None
    assert plan(planner, task("A"), stats) is None
    assert stats.tasks_created == 1 and "more than once" in warnings[0]


def test_tasks_claiming_one_item_the_oldest_is_its_task():
    warnings = []
    planner = Planner([existing(9, {"dataloop_item_id": "A"}), existing(3, {"dataloop_item_id": "A"})], "video",
                      warn=warnings.append)
    assert plan(planner, task("A")).task_id == 3 and "[3, 9]" in warnings[0]


def test_new_tasks_carry_the_record_of_their_predictions():
    change = plan(Planner([], "video"), task("A"))
    assert orjson.loads(change.new_task)["meta"] == {META_KEY: {"predictions": {"v": DIGEST}, "created": True}}


@pytest.mark.parametrize("annotations, versions, total, created, deleted", [
    (0, ["v"], 1, True, True),  # dl2ls made it, only ours on it, nobody annotated: the task goes
    (1, ["v"], 1, True, False),  # someone annotated (or skipped) it: the task stays for the people
    (0, ["v", "theirs"], 2, True, False),  # another source's predictions are on it
    (0, ["v"], 2, True, False),  # a prediction whose version the listing cannot show (empty) is on it
    (0, ["v"], 1, False, False),  # the user's own task (e.g. from cloud storage), adopted: it stays
])
def test_a_deleted_items_predictions_go_and_its_task_only_when_nothing_else_is_on_it(annotations, versions, total,
                                                                                      created, deleted):
    t = existing(1, {"dataloop_item_id": "A"}, versions, total=total, recorded={"v": DIGEST},
                 annotations=annotations, created=created)
    change = Planner([t], "video").plan_deleted("A", [], Stats())
    assert change.replace_versions == ["v"] and change.delete_task is deleted


@pytest.mark.parametrize("doomed, total, allow, allowed", [
    (20, 21, False, True),  # at most 20 always
    (21, 100, False, False),  # 21% of the project
    (21, 1000, False, True),  # 2.1%
    (500, 600, True, True),  # asked for
])
def test_mass_deletions_are_refused_unless_asked_for(doomed, total, allow, allowed):
    check = mass_deletion([(f"i{k}", k) for k in range(doomed)], total, allow)
    assert check.allowed is allowed
    if not allowed:
        assert "--allow-mass-delete" in check.line() and "i0 (task 0)" in check.line()


@pytest.mark.parametrize("current, recorded, expected, warns", [
    (None, {}, "v", False),  # a project without one takes ours
    ("", {}, "v", False),
    ("v", {}, None, False),  # already ours
    ("dataloop-old", {"dataloop-old": "x"}, "v", False),  # one of dl2ls's own: follows
    ("someone-elses", {}, None, True),  # a version someone chose stays, and we say how to see ours
])
def test_the_projects_model_version_follows_dl2ls_only_where_it_is_dl2ls(current, recorded, expected, warns):
    warnings, stats = [], Stats()
    planner = Planner([existing(1, {"dataloop_item_id": "B"}, recorded=recorded)], "video", warn=warnings.append)
    plan(planner, task("A"), stats)
    assert planner.model_version(current, stats) == expected
    assert bool(warnings) is warns


def test_a_dropped_connection_during_deletes_is_retried_then_one_line(monkeypatch):
    import httpx

    from dl2ls.labelstudio import push as push_module

    monkeypatch.setattr(push_module.time, "sleep", lambda s: None)
    pusher = push_module.Pusher("http://127.0.0.1:9", "token")
    calls = []

    def flaky(prediction_id, request_options=None):
        calls.append(prediction_id)
        if len(calls) < 3:  # Label Studio restarting: the connection drops twice
            raise httpx.ReadError("connection reset")

    monkeypatch.setattr(pusher.client.predictions, "delete", flaky)
    pusher.delete_prediction(7)
    assert calls == [7, 7, 7]

    monkeypatch.setattr(pusher.client.predictions, "delete",
                        lambda *a, **k: (_ for _ in ()).throw(httpx.ReadError("down")))
    try:
        pusher.delete_prediction(8)
    except push_module.PushError as err:
        assert "cannot reach Label Studio" in str(err) and "\n" not in str(err)
    else:
        raise AssertionError("a server that stays down is an error")


def test_the_task_pager_failing_midway_is_one_line(monkeypatch):
    import httpx

    from dl2ls.labelstudio import push as push_module

    monkeypatch.setattr(push_module.time, "sleep", lambda s: None)
    pusher = push_module.Pusher("http://127.0.0.1:9", "token")
    first = httpx.Response(200, content=orjson.dumps({"total": 2, "tasks": [{"id": 1, "data": {}}]}))
    answers = [first]

    def request(path, method="GET", params=None, request_options=None):
        if answers:
            return answers.pop()
        raise httpx.ConnectError("refused")  # the second page never comes

    monkeypatch.setattr(pusher.client._client_wrapper.httpx_client, "request", request)
    tasks = pusher.existing_tasks(1)
    assert next(tasks).id == 1
    with pytest.raises(push_module.PushError, match=r"^tasks of project 1 \(page 2\): cannot reach Label Studio"):
        next(tasks)


@pytest.mark.parametrize("case, versions, total, source, skipped", [
    ("same source, predictions intact", ["v"], 1, "s1", True),
    ("the item or the settings changed", ["v"], 1, "s2", False),
    ("someone deleted the prediction", [], 0, "s1", False),
    ("a duplicate to clean up", ["v"], 2, "s1", False),
])
def test_an_item_is_converted_again_unless_its_source_and_predictions_are_as_recorded(case, versions, total, source,
                                                                                      skipped):
    t = existing(1, {"dataloop_item_id": "A"}, versions, total=total, recorded={"v": DIGEST})
    t.meta[META_KEY]["source"] = "s1"
    stats = Stats()
    assert Planner([t], "video").unchanged("A", source, stats) is skipped, case
    assert stats.predictions_unchanged == (1 if skipped else 0)


def test_the_record_carries_the_source_so_the_next_run_can_skip_converting():
    change = Planner([], "video").plan(task("A"), orjson.dumps(task("A")), Stats(), source="s1")
    assert orjson.loads(change.new_task)["meta"][META_KEY]["source"] == "s1"
    t = existing(1, {"dataloop_item_id": "A"}, ["v"], recorded={"v": DIGEST})  # written before sources were kept
    change = Planner([t], "video").plan(task("A"), b"{}", Stats(), source="s1")
    assert change.write == [] and change.meta_update[META_KEY] == {"predictions": {"v": DIGEST}, "source": "s1"}
