"""The `dl2ls` command: convert Dataloop exports into Label Studio tasks, generate a labeling
config, and verify a conversion frame by frame.

Exit codes (stable; scripts depend on them):
  0  everything converted (approximations allowed) / verify: exact (or within --tolerance)
  1  some items or annotations failed (the output still holds the rest) / verify: differences
  2  usage error, or nothing readable
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import orjson

from dl2ls import __version__
from dl2ls.dataloop.model import LIMITS, MediaDefaults, decode_annotation, media_of
from dl2ls.dataloop.read import Entry, count_items, iter_items
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio.evaluate import Verdict, compare_item
from dl2ls.labelstudio.mappers import family_of
from dl2ls.labelstudio.tasks import MEDIA_FIELDS, VERSION_FIELDS, ConvertOptions, check_template, to_task
from dl2ls.report import InputError, Report
from dl2ls.tracks import item_tracks

log = logging.getLogger("dl2ls")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad option or unreadable side file: one line, exit 2."""


# ----------------------------------------------------------------------------- shared helpers


def _entries(sources: list[str], what: str) -> Iterator[Entry]:
    """Every item of every source, with a progress bar on a terminal."""
    total = 0
    for s in sources:
        n = count_items(s)
        total = None if n is None or total is None else total + n
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="item", desc=what, file=sys.stderr, leave=False)
    try:
        for source in sources:
            for entry in iter_items(source):
                yield entry
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _read_json_file(path: str, option: str):
    try:
        return orjson.loads(Path(path).read_bytes())
    except OSError as err:
        raise UsageError(f"{option} {path}: {err.strerror or err}") from None
    except orjson.JSONDecodeError as err:
        raise UsageError(f"{option} {path}: not valid JSON ({err})") from None


def _label_map(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    data = _read_json_file(path, "--label-map")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UsageError(f"--label-map {path}: expected a JSON object of Dataloop label -> Label Studio label")
    return data


def _defaults(args) -> MediaDefaults:
    for name in ("fps", "width", "height"):
        value = getattr(args, name)
        if value is not None and not (0 < value <= LIMITS[name]):
            raise UsageError(f"--{name} must be a positive number up to {LIMITS[name]:g}")
    return MediaDefaults(args.fps, args.width, args.height)


def _write_atomic(path: str, chunks: Iterator[bytes]) -> None:
    """Write through a temporary file in the same folder, so a killed run leaves no half file."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{path} is a folder: give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- convert


def _convert_options(args) -> ConvertOptions:
    """The conversion options shared by convert and push, checked before any item is read."""
    options = ConvertOptions(label_map=_label_map(args.label_map), tolerance_px=args.tolerance,
                             model_version=args.model_version, media_url=args.media_url)
    if args.tolerance < 0:
        raise UsageError("--tolerance must be >= 0")
    try:
        check_template(args.model_version, VERSION_FIELDS, "--model-version")
        if args.media_url:
            check_template(args.media_url, MEDIA_FIELDS, "--media-url")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.label_config:
        options.config = _parse_config(_read_text(args.label_config, "--label-config"), "--label-config")
    return options


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"{option} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{option} {path}: not UTF-8 text") from None


def _parse_config(xml: str, where: str) -> lsconfig.LabelConfig:
    try:
        return lsconfig.parse(xml)
    except lsconfig.ConfigError as err:
        raise UsageError(f"{where}: {err}") from None


def cmd_convert(args) -> int:
    options = _convert_options(args)
    defaults = _defaults(args)
    report = Report()

    def tasks() -> Iterator[bytes]:
        first = True
        yield b"["
        for task in convert_entries(_entries(args.sources, "convert"), options, defaults, report):
            yield (b"\n" if first else b",\n") + orjson.dumps(task)
            first = False
        yield b"\n]\n"

    _write_atomic(args.output, tasks())
    if args.report:
        _write_atomic(args.report, iter([orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2)]))
    print(report.summary(), file=sys.stderr)
    log.info("wrote %d tasks to %s", report.items_converted, args.output)
    if report.items_converted == 0 and report.items_failed:
        return EXIT_USAGE
    return EXIT_FAILED if report.failed else EXIT_OK


def convert_entries(entries, options: ConvertOptions, defaults: MediaDefaults, report: Report) -> Iterator[dict]:
    """Items -> tasks, counting everything into `report`; bad items are reported and skipped."""
    for entry in entries:
        if entry.note:
            report.warn(entry.origin, entry.note)
            continue
        if entry.error is not None:
            report.item_failed(entry.error)
            continue
        try:
            item = item_tracks(entry.item, entry.origin, defaults)
            task, item_report = to_task(item, options)
        except InputError as err:
            report.item_failed(err)
            continue
        report.merge(item_report)
        yield task


# ----------------------------------------------------------------------------- label-config


def cmd_label_config(args) -> int:
    xml, report = generate_config(args.sources, args.ontology, args.kind, _label_map(args.label_map))
    if args.output:
        _write_atomic(args.output, iter([xml.encode()]))
        log.info("wrote %s", args.output)
    else:
        sys.stdout.write(xml)
    return EXIT_FAILED if report.items_failed else EXIT_OK


def generate_config(sources: list[str], ontology: str | None, kind: str | None,
                    label_map: dict[str, str] | None = None) -> tuple[str, Report]:
    """The labeling config for what the sources hold: labels per geometry, of one media kind."""
    colors = lsconfig.colors_from_ontology(_read_json_file(ontology, "--ontology")) if ontology else {}
    inventories = {"video": lsconfig.Inventory(), "image": lsconfig.Inventory()}
    report = Report()
    for entry in _entries(sources, "scan"):
        if entry.note or entry.error is not None:
            if entry.error is not None:
                report.item_failed(entry.error)
            continue
        anns = []
        for index, raw in enumerate(entry.item.annotations or []):
            try:
                anns.append(decode_annotation(raw, entry.origin, index))
            except InputError:
                continue
        try:
            item_kind = media_of(entry.item, anns, MediaDefaults(), entry.origin).kind
        except InputError as err:
            report.item_failed(err)
            continue
        inv = inventories[item_kind]
        label_map = label_map or {}
        for ann in anns:
            family = family_of(item_kind, ann.type)
            if family is None:
                continue
            for label in {ann.label, *(s.label for s in ann.system.snapshots_)}:
                label = label_map.get(label, label)
                if lsconfig.xml_safe(label):
                    inv.add(item_kind, family, label)
                else:
                    report.warn(entry.origin, f"label {label!r} has characters XML cannot hold: left out", ann.id)
    for problem in report.problems:
        print(problem.line(), file=sys.stderr)
    found = [k for k, inv in inventories.items() if not inv.empty]
    if kind is None and len(found) > 1:
        raise UsageError("the sources hold videos and images, and a Label Studio project holds one kind of "
                         "task: pass --kind video or --kind image")
    kind = kind or (found[0] if found else None)
    if kind is None or inventories[kind].empty:
        raise UsageError("no annotations found in the sources" + (f" on {kind}s" if kind else ""))
    return lsconfig.generate(inventories[kind], colors), report


# ----------------------------------------------------------------------------- push


def cmd_push(args) -> int:
    from dl2ls.labelstudio import push

    options = _convert_options(args)
    defaults = _defaults(args)
    pusher = push.Pusher(os.environ.get("LABEL_STUDIO_URL", ""), os.environ.get("LABEL_STUDIO_API_KEY", ""))
    if args.new_project:
        xml = _read_text(args.label_config, "--label-config") if args.label_config else \
            generate_config(args.sources, None, None, options.label_map)[0]
        config = _parse_config(xml, "--label-config" if args.label_config else "generated config")
        project_id = None if args.dry_run else pusher.create_project(args.new_project, xml)
        existing = []
    else:
        if args.label_config:
            raise UsageError("--label-config goes with --new-project; an existing project's own config is used")
        project = pusher.project(args.project)
        project_id = project.id
        config = _parse_config(project.label_config or "", f"project {project_id}'s labeling config")
        existing = pusher.existing_tasks(project_id)
        log.info("project %d: %d tasks", project_id, len(existing))
    options.config = config
    obj = config.objects[0]
    planner = push.Planner(existing, obj.data_key, args.match)
    stats, report = push.Stats(), Report()
    tasks = convert_entries(_entries(args.sources, "push"), options, defaults, report)
    changes = (planner.plan(task, stats, lambda w: report.warn("push", w)) for task in tasks)
    push.apply(pusher, project_id, changes, dry_run=args.dry_run)
    if stats.versions and not args.dry_run:
        # the labeling stream shows only predictions of the project's model_version; a new
        # project has already adopted the version of the first prediction it received
        version = stats.versions.most_common(1)[0][0]
        if not (args.new_project and version == stats.first_version):
            pusher.set_model_version(project_id, version)
        log.info("project %d model_version = %s", project_id, version)
    print(report.summary(), file=sys.stderr)
    print(("dry run, nothing written: would have " if args.dry_run else "") + stats.summary(), file=sys.stderr)
    if args.report:
        doc = {**report.to_json(), "push": {**{k: v for k, v in vars(stats).items() if k != "versions"},
                                            "versions": dict(stats.versions), "project": project_id,
                                            "dry_run": args.dry_run}}
        _write_atomic(args.report, iter([orjson.dumps(doc, option=orjson.OPT_INDENT_2)]))
    if report.items_converted == 0 and report.items_failed:
        return EXIT_USAGE
    return EXIT_FAILED if report.failed else EXIT_OK


# ----------------------------------------------------------------------------- fetch


def _dql(path: str | None) -> list[dict]:
    """--filter: a DQL filter object ({"$and": [...]} or one clause), or a list of clauses."""
    if not path:
        return []
    data = _read_json_file(path, "--filter")
    if isinstance(data, dict) and "filter" in data:  # a whole query body
        data = data["filter"]
    if isinstance(data, dict):
        return list(data["$and"]) if set(data) == {"$and"} and isinstance(data["$and"], list) else [data]
    if isinstance(data, list) and all(isinstance(c, dict) for c in data):
        return data
    raise UsageError(f"--filter {path}: expected a DQL filter object or a list of clauses")


def cmd_fetch(args) -> int:
    from dl2ls.dataloop import api, write
    from dl2ls.dataloop.read import split_array

    filters = _dql(args.filter)
    client = api.DataloopClient()
    client.me()
    client.dataset(args.dataset)
    root = Path(args.output)
    count = annotations = 0
    if args.method == "export":
        data = client.export(args.dataset, filters)
        for a, b in split_array(data):
            item = orjson.loads(data[a:b])
            path = write.item_path(root, item.get("dir"), item.get("filename"), item.get("name"), item["id"])
            write.write_atomic(path, data[a:b])
            count += 1
            annotations += len(item.get("annotations") or [])
    else:
        for item in client.query(args.dataset, filters):
            item["annotations"] = client.item_annotations(item["id"])
            path = write.item_path(root, item.get("dir"), item.get("filename"), item.get("name"), item["id"])
            write.write_atomic(path, orjson.dumps(item))
            count += 1
            annotations += len(item["annotations"])
    print(f"fetched {count} items ({annotations} annotations) of dataset {args.dataset} into {root / 'json'} "
          f"with {client.counters.requests} requests ({client.counters.retries} retried)", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------- sync


def cmd_sync(args) -> int:
    from dl2ls import sync
    from dl2ls.dataloop.api import DataloopClient, DataloopError
    from dl2ls.labelstudio import push

    options = _convert_options(args)
    defaults = _defaults(args)
    filters = _dql(args.filter)
    try:
        every = sync.parse_every(args.every) if args.every else None
    except ValueError as err:
        raise UsageError(str(err)) from None
    client = DataloopClient()
    pusher = push.Pusher(os.environ.get("LABEL_STUDIO_URL", ""), os.environ.get("LABEL_STUDIO_API_KEY", ""))

    def job() -> int:
        try:
            state = sync.State(args.state)
        except (sync.SyncBusy, sync.StateError) as err:
            print(f"dl2ls sync: {err}", file=sys.stderr)
            return EXIT_USAGE
        report = Report()
        try:
            summary = sync.run_once(client, pusher, args.dataset, args.project, state, filters, options, defaults,
                                    report)
        except (DataloopError, push.PushError, InputError) as err:
            if every is None:
                raise
            log.error("sync run failed: %s", err)  # the schedule goes on; the next run retries
            return EXIT_FAILED
        finally:
            state.close()
        for problem in report.problems:
            if problem.outcome != "approximated":
                print(problem.line(), file=sys.stderr)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {summary.line()}", file=sys.stderr, flush=True)
        return EXIT_FAILED if report.failed else EXIT_OK

    if every is None:
        return job()
    sync.schedule(job, every)
    return EXIT_OK


# ----------------------------------------------------------------------------- serve


def cmd_serve(args) -> int:
    from dl2ls.server import serve

    if not Path(args.source).exists():
        raise UsageError(f"--source {args.source}: no such file or folder")
    try:
        workers = int(os.environ.get("WORKERS", "1"))
        threads = int(os.environ.get("THREADS", "8"))
    except ValueError:
        raise UsageError("WORKERS and THREADS must be whole numbers") from None
    log.info("serving %s on %s:%d (%d workers x %d threads)", args.source, args.host, args.port, workers, threads)
    serve(args.source, args.host, args.port, workers, threads)
    return EXIT_OK


# ----------------------------------------------------------------------------- verify


def cmd_verify(args) -> int:
    tasks = _read_json_file(args.tasks, "tasks")
    if not isinstance(tasks, list):
        raise UsageError(f"{args.tasks}: expected a JSON array of Label Studio tasks")
    by_id, by_file = {}, {}
    for task in tasks:
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("dataloop_item_id"), str):
            by_id[data["dataloop_item_id"]] = task
        if isinstance(data.get("dataloop_filename"), str):
            by_file[data["dataloop_filename"]] = task
    label_map = _label_map(args.label_map)
    defaults = _defaults(args)
    verdict, failed, missing = Verdict(), 0, 0
    for entry in _entries([args.source], "verify"):
        if entry.note:
            continue
        if entry.error is not None:
            print(f"error: {entry.error}", file=sys.stderr)
            failed += 1
            continue
        try:
            item = item_tracks(entry.item, entry.origin, defaults)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        info = item.info
        task = by_id.get(info.item_id) if info.item_id else None
        task = task or by_file.get(info.filename)
        if task is None:
            print(f"{info.origin}: no task for this item in {args.tasks}", file=sys.stderr)
            missing += 1
            continue
        v = compare_item(item, task, label_map, args.tolerance)
        for m in v.mismatches[:20]:
            frame = f" frame {m.frame}" if m.frame is not None else ""
            print(f"{info.origin}: annotation {m.annotation}{frame}: {m.what}", file=sys.stderr)
        verdict.merge(v)
    print(f"checked {verdict.annotations} annotations over {verdict.frames} frames: "
          f"largest error {verdict.max_error_px:.6f} px, {len(verdict.mismatches)} differences"
          + (f", {missing} items without a task" if missing else "")
          + (f", {failed} unreadable items" if failed else ""))
    for kind, n in sorted(verdict.unchecked.items()):
        print(f"not compared: {n} × {kind}")
    if verdict.annotations == 0 and (failed or missing):
        return EXIT_USAGE
    return EXIT_OK if verdict.ok(args.tolerance) and not failed and not missing else EXIT_FAILED


# ----------------------------------------------------------------------------- parser


def _conversion_options(p: argparse.ArgumentParser, with_config: bool = True) -> None:
    if with_config:
        p.add_argument("--label-config", metavar="FILE",
                       help="the Label Studio project's labeling config: names, labels and mappers come from it "
                            "(default: the names `dl2ls label-config` generates, every label accepted)")
    p.add_argument("--model-version", default="dataloop-{source}", metavar="TEMPLATE",
                   help="prediction model_version; fields {source} (the Dataloop model's name, or 'human'), "
                        "{model_id}, {dataset_id}, {item_id} (default: %(default)s)")
    p.add_argument("--media-url", metavar="TEMPLATE",
                   help="task media URL; fields {id}, {name}, {filename}, {dir}, {dataset_id}, {stream} "
                        "(default: the item's stream URL, else its filename)")
    p.add_argument("--label-map", metavar="FILE", help='JSON object renaming labels, e.g. {"vehicle.car": "car"}')
    p.add_argument("--tolerance", type=float, default=0.0, metavar="PX",
                   help="allow a lossy keyframe simplification within PX pixels (default 0: exact); "
                        "the report gives the largest error introduced")
    _media_options(p)


def _media_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("items without metadata (bare annotation lists)")
    g.add_argument("--fps", type=float, help="frame rate of videos whose item JSON does not say")
    g.add_argument("--width", type=float, help="frame/image width in pixels, when the item does not say")
    g.add_argument("--height", type=float, help="frame/image height in pixels, when the item does not say")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dl2ls",
        description="Move Dataloop video and image annotations into Label Studio, frame-exact.",
        epilog="SOURCE is a Dataloop item JSON, a bare annotation list, a JSON array of items (the export "
               "API's output), an export folder (json/ tree), or an export .zip. "
               "Exit codes: 0 ok, 1 some items failed or differ, 2 usage error or nothing readable.",
    )
    parser.add_argument("--version", action="version", version=f"dl2ls {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert Dataloop exports into Label Studio tasks with predictions",
                       description="Convert Dataloop exports into a JSON array of Label Studio tasks, each "
                                   "with one prediction per source (Dataloop model, or human).")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("-o", "--output", required=True, metavar="tasks.json", help="where to write the tasks")
    p.add_argument("--report", metavar="FILE", help="also write the conversion report as JSON")
    _conversion_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("label-config", help="generate a Label Studio labeling config for a source",
                       description="Generate the labeling config that shows everything in the sources: "
                                   "video with frameRate=\"$fps\", labels seen in annotations and snapshots.")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--ontology", metavar="labels.json", help="a Dataloop label tree: labels get its colours")
    p.add_argument("--label-map", metavar="FILE", help="the --label-map convert will use: its labels go in the config")
    p.add_argument("--kind", choices=("video", "image"),
                   help="which items to configure for, when the sources hold both (a project holds one kind)")
    p.set_defaults(func=cmd_label_config)

    p = sub.add_parser("push", help="convert and write tasks and predictions into a Label Studio project",
                       description="Convert the sources against the project's labeling config and write them "
                                   "through Label Studio's bulk endpoints: new items become tasks with predictions; "
                                   "items that have a task get their predictions replaced per model_version. "
                                   "Idempotent: running it again changes nothing. Connection from LABEL_STUDIO_URL "
                                   "and LABEL_STUDIO_API_KEY (a legacy token or a personal access token).")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--project", type=int, metavar="ID", help="an existing project")
    target.add_argument("--new-project", metavar="TITLE",
                        help="create a project; its config is --label-config, else generated from the sources")
    p.add_argument("--match", choices=("item-id", "filename"), default="item-id",
                   help="how items find their existing task: data.dataloop_item_id, or also the media file name "
                        "(for tasks that came from cloud storage) (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    p.add_argument("--report", metavar="FILE", help="write the conversion report and the push summary as JSON")
    _conversion_options(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("fetch", help="download a Dataloop dataset as an export folder (json/ tree)",
                       description="Fetch a dataset through Dataloop's REST API and write what an export "
                                   "would (json/ mirroring the remote folders), so that convert, push and serve "
                                   "work offline from it. Credentials: DATALOOP_API_KEY, or DATALOOP_USERNAME and "
                                   "DATALOOP_PASSWORD; DATALOOP_API_URL for another gate.")
    p.add_argument("--dataset", required=True, metavar="ID")
    p.add_argument("-o", "--output", default="dataloop-export", metavar="DIR", help="(default: %(default)s)")
    p.add_argument("--filter", metavar="DQL.json", help="only the items matching this DQL filter")
    p.add_argument("--method", choices=("export", "query"), default="export",
                   help="export: one export command (fewest requests); query: items by query, then each "
                        "item's annotations (default: %(default)s)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("sync", help="keep a Label Studio project's predictions in step with a Dataloop dataset",
                       description="Fetch what changed in Dataloop since the last run (first run: everything), "
                                   "convert it against the project's labeling config and upsert it with push's "
                                   "logic. Incremental: an unchanged dataset costs a handful of Dataloop requests "
                                   "and no Label Studio writes. State (cursor, per-item hashes) in SQLite; a run "
                                   "killed anywhere converges on the next. Credentials as for fetch and push.")
    p.add_argument("--dataset", required=True, metavar="ID", help="the Dataloop dataset")
    p.add_argument("--project", required=True, type=int, metavar="ID", help="the Label Studio project")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="one run, for cron or a Kubernetes CronJob")
    when.add_argument("--every", metavar="INTERVAL", help="run now and then every INTERVAL (e.g. 15m, 1h), "
                                                         "with jitter, never two runs at once")
    p.add_argument("--state", default="dl2ls-state.sqlite", metavar="PATH", help="(default: %(default)s)")
    p.add_argument("--filter", metavar="DQL.json", help="only the items matching this DQL filter")
    _conversion_options(p, with_config=False)
    p.set_defaults(func=cmd_sync, label_config=None)

    p = sub.add_parser("serve", help="run the ML backend that Label Studio connects to (Settings > Model)",
                       description="Serve Label Studio's ML-backend protocol (/health, /setup, /predict, "
                                   "/webhook) from a Dataloop export, under gunicorn. Environment: "
                                   "BASIC_AUTH_USER/BASIC_AUTH_PASS (require basic auth), WORKERS, THREADS, "
                                   "LOG_LEVEL, DL2LS_MODEL_VERSION (default 'dataloop'), DL2LS_FPS/WIDTH/HEIGHT "
                                   "(for items without metadata).")
    p.add_argument("--source", required=True, metavar="PATH", help="anything convert reads")
    p.add_argument("--host", default="0.0.0.0", help="(default: %(default)s)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)), help="(default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("verify", help="check converted tasks frame by frame against the Dataloop source",
                       description="Evaluate every Label Studio result the way the editor does (interpolation, "
                                   "lifespans) on every frame and compare with the Dataloop timeline.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("tasks", metavar="tasks.json")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="PX", help="allowed box error in pixels")
    p.add_argument("--label-map", metavar="FILE", help="the --label-map used for convert")
    _media_options(p)
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    default = getattr(logging, os.environ.get("LOG_LEVEL", "INFO").upper(), logging.INFO)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else default
    logging.basicConfig(level=level, format="dl2ls: %(message)s", stream=sys.stderr)
    if not args.verbose:  # one line per HTTP request is noise; -v shows them
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"dl2ls {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dl2ls: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from dl2ls.dataloop.api import DataloopError
        from dl2ls.labelstudio.push import PushError

        if isinstance(err, BrokenPipeError):  # e.g. `dl2ls label-config ... | head`
            return EXIT_FAILED
        if not isinstance(err, (PushError, DataloopError, InputError)):
            raise
        print(f"dl2ls {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
