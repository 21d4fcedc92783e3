"""Trust at the edges, against a real Label Studio (and the Dataloop stand-in): an item lands on
its own task or on none, a task's media is the user's, a command run twice leaves one of
everything, and a sync never deletes what it merely did not see."""

from __future__ import annotations

import json

import pytest

from dl2ls.labelstudio import push as push_module
from test_dataloop_api import sample_item
from test_push_server import TRACKER, make_export, push_report, run, stored
from test_sync import CONFIG, held, sync


def export_of(folder, items: dict[str, tuple[str | None, str]]):
    """Items (the tracker sample) by file name -> (item id or None, label), one JSON each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (path, (item_id, label)) in enumerate(items.items()):
        item = json.loads(json.dumps(TRACKER))
        item["id"] = item_id
        item["filename"], item["name"], item["dir"] = path, path.rsplit("/", 1)[1], path.rsplit("/", 1)[0] or "/"
        item["stream"] = f"https://dataloop.example/items/{item_id}/stream"
        for k, ann in enumerate(item["annotations"]):
            ann["id"] = f"{i}_{k}"
            ann["label"] = label
            for s in ann["metadata"]["system"]["snapshots_"]:
                s["label"] = label
        if item_id is None:
            del item["id"]
        (folder / f"item{i}.json").write_text(json.dumps(item))
    return folder


def video_project(ls, title, tasks):
    project = ls.projects.create(title=title, label_config=CONFIG.replace(
        '<Label value="pedestrian"/>', '<Label value="pedestrian"/><Label value="car"/>'))
    if tasks:
        ls.projects.import_tasks(project.id, request=[{"data": {"video": url}} for url in tasks])
    return project.id


def test_tasks_with_one_file_name_in_two_folders_each_get_their_own_item(ls_env, tmp_path, capsys):
    pid = video_project(ls_env, "two folders", ["s3://b/cam1/clip.mp4", "s3://b/cam2/clip.mp4"])
    src = export_of(tmp_path / "x", {"/cam2/clip.mp4": ("B", "car"), "/cam1/clip.mp4": ("A", "person")})
    code, rep = push_report(capsys, tmp_path, src, "--project", pid, "--match", "filename")
    assert code == 0 and rep["push"]["tasks_created"] == 0
    by_media = {h["task"].data["video"]: h for h in stored(ls_env, pid).values()}
    assert len(by_media) == 2
    for media, item, label in (("s3://b/cam1/clip.mp4", "A", "person"), ("s3://b/cam2/clip.mp4", "B", "car")):
        assert by_media[media]["task"].data["dataloop_item_id"] == item
        (prediction,) = by_media[media]["predictions"]["dataloop-human"]
        assert {r["value"]["labels"][0] for r in prediction["result"]} == {label}
    code, rep = push_report(capsys, tmp_path, src, "--project", pid, "--match", "filename")
    assert rep["push"]["predictions_unchanged"] == 2 and rep["push"]["tasks_created"] == 0


def test_an_ambiguous_match_is_reported_and_left_alone(ls_env, tmp_path, capsys):
    pid = video_project(ls_env, "ambiguous", ["s3://b/cam1/clip.mp4", "s3://b/cam2/clip.mp4"])
    src = export_of(tmp_path / "x", {"/clip.mp4": ("C", "car")})
    code, rep = push_report(capsys, tmp_path, src, "--project", pid, "--match", "filename")
    assert rep["push"]["items_ambiguous"] == 1 and rep["push"]["tasks_created"] == 0
    assert any("fits tasks" in p["reason"] and "/cam1/clip.mp4" in p["reason"] and "/cam2/clip.mp4" in p["reason"]
               for p in rep["problems"])
    assert all(h["predictions"] == {} and "dataloop_item_id" not in h["task"].data
               for h in stored(ls_env, pid).values())


@pytest.mark.parametrize("match", ["item-id", "filename"])
def test_items_without_an_id_pushed_twice_write_nothing_the_second_time(ls_env, tmp_path, capsys, match):
    pid = video_project(ls_env, f"no ids {match}", [])
    src = export_of(tmp_path / "x", {"/a/clip.mp4": (None, "car"), "/b/clip.mp4": (None, "person")})
    code, rep = push_report(capsys, tmp_path, src, "--project", pid, "--match", match)
    assert code == 0 and rep["push"]["tasks_created"] == 2
    media = sorted(h["task"].data["video"] for h in stored(ls_env, pid).values())
    code, rep = push_report(capsys, tmp_path, src, "--project", pid, "--match", match)
    assert rep["push"]["tasks_created"] == 0 and rep["push"]["predictions_unchanged"] == 2
    assert sorted(h["task"].data["video"] for h in stored(ls_env, pid).values()) == media


def test_a_re_push_leaves_the_tasks_media_untouched(ls_env, tmp_path, capsys):
    src = make_export(tmp_path / "export", 2)
    code, rep = push_report(capsys, tmp_path, src, "--new-project", "media stays")
    pid = rep["push"]["project"]
    task = stored(ls_env, pid)["item0000"]["task"]
    ls_env.tasks.update(str(task.id), data={**task.data, "video": "/data/local-files/?d=demo/clip.webm"})
    code, rep = push_report(capsys, tmp_path, src, "--project", pid, "--media-url", "https://elsewhere/{name}")
    assert code == 0
    assert stored(ls_env, pid)["item0000"]["task"].data["video"] == "/data/local-files/?d=demo/clip.webm"
    assert stored(ls_env, pid)["item0001"]["task"].data["video"] == "https://example.com/clip_1.webm"


def test_new_project_run_twice_leaves_one_project(ls_env, tmp_path, capsys, monkeypatch, killed_after_import):
    src = make_export(tmp_path / "export", 3)
    monkeypatch.setattr(push_module, "FIRST_BATCH", 1)
    killed_after_import.arm()
    assert run(capsys, "push", src, "--new-project", "once only")[0] == 130
    killed_after_import.disarm()
    code, rep = push_report(capsys, tmp_path, src, "--new-project", "once only")
    assert code == 0 and rep["push"]["tasks_created"] == 2
    projects = [p for p in ls_env.projects.list(title="once only") if p.title == "once only"]
    assert len(projects) == 1 and len(stored(ls_env, projects[0].id)) == 3


def test_a_push_with_nothing_to_change_only_reads(ls_env, tmp_path, capsys, monkeypatch):
    src = make_export(tmp_path / "export", 4)
    code, rep = push_report(capsys, tmp_path, src, "--new-project", "no-op")
    counts = {}
    for name in ("import_tasks", "import_predictions", "delete_prediction", "delete_task", "update_task",
                 "set_model_version", "task_predictions"):
        original = getattr(push_module.Pusher, name)
        monkeypatch.setattr(push_module.Pusher, name, lambda self, *a, _n=name, _o=original, **k: (
            counts.__setitem__(_n, counts.get(_n, 0) + 1), _o(self, *a, **k))[1])
    code, rep = push_report(capsys, tmp_path, src, "--project", rep["push"]["project"])
    assert code == 0 and rep["push"]["predictions_unchanged"] == 4 and counts == {}


# ----------------------------------------------------------------------------- sync


@pytest.fixture
def dataset(ls_env, tmp_path, monkeypatch):
    from dataloop_standin import DataloopStandIn

    standin = DataloopStandIn().start()
    for i in range(30):
        item = sample_item(i)
        item["dir"] = "/batch1" if i < 15 else "/batch2"
        item["filename"] = f"{item['dir']}/{item['name']}"
        standin.put_item("ds1", item)
    monkeypatch.setenv("DATALOOP_API_URL", standin.url)
    monkeypatch.setenv("DATALOOP_API_KEY", standin.api_key)
    project = ls_env.projects.create(title="trust", label_config=CONFIG)
    yield standin, project.id, tmp_path / "state.sqlite"
    standin.stop()


def test_a_changed_filter_deletes_nothing(dataset, ls_env, capsys, tmp_path):
    standin, pid, state = dataset
    for batch in ("/batch1", "/batch2", "/batch1"):
        flt = tmp_path / f"{batch[1:]}.json"
        flt.write_text(json.dumps({"dir": batch}))
        code, err = sync(capsys, pid, state, "--filter", flt)
        assert code == 0, err
    now = held(ls_env, pid)
    assert len(now) == 30 and all(len(h["versions"]["dataloop-human"]) == 1 for h in now.values())


def test_a_mass_deletion_is_refused_with_a_list(dataset, ls_env, capsys):
    standin, pid, state = dataset
    assert sync(capsys, pid, state)[0] == 0
    gone = sorted(standin.datasets["ds1"])[:25]
    for item_id in gone:
        del standin.datasets["ds1"][item_id]
    code, err = sync(capsys, pid, state)
    assert code == 1 and "refused to delete 25 of 30" in err and gone[0] in err and "--allow-mass-delete" in err
    assert len(held(ls_env, pid)) == 30
    code, err = sync(capsys, pid, state, "--allow-mass-delete")
    assert code == 0 and "deleted 25" in err
    assert set(held(ls_env, pid)) == set(standin.datasets["ds1"])


def test_an_item_that_merely_left_the_listing_is_not_deleted(dataset, ls_env, capsys):
    standin, pid, state = dataset
    assert sync(capsys, pid, state)[0] == 0
    hidden = sorted(standin.datasets["ds1"])[0]
    standin.datasets["ds1"][hidden]["hidden"] = True  # still in Dataloop, no longer listed
    original = standin.datasets["ds1"][hidden]
    del standin.datasets["ds1"][hidden]
    standin.datasets.setdefault("elsewhere", {})[hidden] = original  # GET /items/{id} still finds it
    code, err = sync(capsys, pid, state)
    assert code == 0 and "left the scope 1" in err
    assert len(held(ls_env, pid)[hidden]["versions"]["dataloop-human"]) == 1


def test_a_poisoned_item_is_quarantined_while_the_rest_converge(dataset, ls_env, capsys, monkeypatch):
    standin, pid, state = dataset
    poison = sorted(standin.datasets["ds1"])[7]
    original = push_module.Pusher._post_bulk

    def refuse_poison(self, what, path, parts):
        if any(poison.encode() in p for p in parts):  # what a server answers for a body it will not take
            raise push_module.Rejected(f"{what}: HTTP 413: request entity too large")
        return original(self, what, path, parts)

    monkeypatch.setattr(push_module.Pusher, "_post_bulk", refuse_poison)
    code, err = sync(capsys, pid, state)
    assert code == 1 and poison in err and "refused" in err
    now = held(ls_env, pid)
    assert len(now) == 29 and all(len(h["versions"]["dataloop-human"]) == 1 for h in now.values())
    code, err = sync(capsys, pid, state)  # tried again once, then it waits
    assert code == 1
    code, err = sync(capsys, pid, state)
    assert code == 0 and "quarantined 1" in err and "read 0" in err
    monkeypatch.setattr(push_module.Pusher, "_post_bulk", original)


@pytest.mark.parametrize("omit", [set(), {"hasNextPage"}])
def test_a_capped_page_size_deletes_nothing(dataset, ls_env, capsys, omit):
    standin, pid, state = dataset
    assert sync(capsys, pid, state)[0] == 0
    standin.page_cap = 7  # the server returns 7 items a page, whatever pageSize asks
    standin.omit_page_fields = omit  # and may leave hasNextPage out (totalPagesCount then tells)
    code, err = sync(capsys, pid, state)
    assert code == 0 and "items seen 30" in err and "deleted 0" in err
    now = held(ls_env, pid)
    assert len(now) == 30 and all(len(h["versions"]["dataloop-human"]) == 1 for h in now.values())


def test_overlapping_scopes_keep_their_own_records(dataset, ls_env, capsys, tmp_path):
    standin, pid, state = dataset
    flt = tmp_path / "batch1.json"
    flt.write_text(json.dumps({"dir": "/batch1"}))
    assert sync(capsys, pid, state)[0] == 0  # the whole dataset
    assert sync(capsys, pid, state, "--filter", flt)[0] == 0  # a part of it (reads it: a new scope)
    code, err = sync(capsys, pid, state)  # the whole dataset again: nothing to read, nothing left
    assert code == 0 and "read 0" in err and "left the scope" not in err
    code, err = sync(capsys, pid, state, "--filter", flt)
    assert code == 0 and "read 0" in err


def test_a_state_from_before_scopes_is_read(tmp_path):
    import sqlite3

    from dl2ls.sync import State

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); CREATE TABLE items (item_id TEXT "
                     "PRIMARY KEY, updated_at TEXT, annotations INTEGER, content_hash TEXT, versions TEXT);"
                     "INSERT INTO items VALUES ('i1', 't', 2, 'h', '[\"v\"]');")
    db.commit()
    db.close()
    state = State(path)
    try:
        (row,) = state.items("any-scope").values()
        assert (row.item_id, row.content_hash, row.versions) == ("i1", "h", ["v"])
    finally:
        state.close()
