"""push's Planner on its own (pure): what each converted task needs, in the cases that could
duplicate or lose predictions."""

from __future__ import annotations

from dl2ls.labelstudio.push import ExistingTask, Planner, Stats, media_name, prediction_hash

RESULT = [{"id": "a", "type": "videorectangle", "value": {}}]


def task(item_id, filename="/cam1/clip.mp4", fps=25.0, result=RESULT, version="v"):
    return {"data": {"video": f"https://dl/{item_id}", "dataloop_item_id": item_id, "dataloop_filename": filename,
                     "fps": fps}, "predictions": [{"model_version": version, "result": result}]}


def existing(tid, data, **versions):
    return ExistingTask(tid, data, {v: [(pid, h) for pid, h in ps] for v, ps in versions.items()})


def test_media_name_reads_storage_and_local_file_urls():
    assert media_name("s3://bucket/a/clip.mp4") == "clip.mp4"
    assert media_name("/data/local-files/?d=videos/a%20b/clip.mp4") == "clip.mp4"
    assert media_name("") is None


def test_file_name_matching_never_takes_a_task_that_belongs_to_another_item():
    tasks = [existing(1, {"video": "s3://b/cam1/clip.mp4", "dataloop_item_id": "A"}),
             existing(2, {"video": "s3://b/storage/other.mp4"})]
    planner = Planner(tasks, "video", match="filename")
    change = planner.plan(task("B", filename="/cam2/clip.mp4"), Stats())
    assert change.new_task is not None  # not task 1, which is item A's


def test_one_storage_task_is_claimed_by_one_item_only():
    planner = Planner([existing(2, {"video": "s3://b/storage/clip.mp4"})], "video", match="filename")
    first = planner.plan(task("A", filename="/cam1/clip.mp4"), Stats())
    second = planner.plan(task("B", filename="/cam2/clip.mp4"), Stats())
    assert first.task_id == 2 and second.new_task is not None


def test_the_same_item_twice_in_the_sources_is_planned_once():
    warnings, stats = [], Stats()
    planner = Planner([], "video")
    assert planner.plan(task("A"), stats, warnings.append).new_task is not None
    assert planner.plan(task("A"), stats, warnings.append) is None
    assert stats.tasks_created == 1 and "more than once" in warnings[0]


def test_owned_task_data_follows_the_item_but_a_storage_url_stays():
    ours = existing(1, {"video": "https://dl/A", "dataloop_item_id": "A", "dataloop_filename": "/cam1/clip.mp4",
                        "fps": 25.0, "dataloop_dataset_id": None}, v=[(10, prediction_hash(RESULT, None))])
    change = Planner([ours], "video").plan(task("A", filename="/cam1/moved.mp4", fps=29.97), Stats())
    assert change.data_update["fps"] == 29.97 and change.data_update["dataloop_filename"] == "/cam1/moved.mp4"
    assert change.write == [] and change.delete == []  # the prediction itself is unchanged
    storage = existing(2, {"video": "s3://b/x/clip.mp4"})
    change = Planner([storage], "video", match="filename").plan(task("B", filename="/x/clip.mp4"), Stats())
    assert change.data_update["video"] == "s3://b/x/clip.mp4" and change.data_update["fps"] == 25.0


def test_replaced_unchanged_and_duplicate_predictions():
    digest = prediction_hash(RESULT, None)
    tasks = [existing(1, {"dataloop_item_id": "A"}, v=[(10, digest)], other=[(11, "x")]),
             existing(2, {"dataloop_item_id": "B"}, v=[(20, "old")]),
             existing(3, {"dataloop_item_id": "C"}, v=[(30, digest), (31, digest)])]
    stats = Stats()
    planner = Planner(tasks, "video")
    a, b, c = (planner.plan(task(i), stats) for i in "ABC")
    assert (a.write, a.delete) == ([], [])  # the other version is never touched
    assert b.delete == [20] and b.write[0]["task"] == 2
    assert c.delete == [31] and c.write == []
    assert (stats.predictions_unchanged, stats.predictions_replaced, stats.duplicates_removed) == (1, 1, 1)
