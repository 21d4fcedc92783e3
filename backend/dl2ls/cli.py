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
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import orjson

from dl2ls import __version__
from dl2ls.convert import (
    KindError, convert_entries, convert_sources, entry_key, identities, scan, scan_config, settings_fingerprint,
    source_of, verify_sources,
)
from dl2ls.dataloop.model import LIMITS, MediaDefaults
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio.tasks import MEDIA_FIELDS, VERSION_FIELDS, ConvertOptions, check_template
from dl2ls.report import InputError, Report, escape

log = logging.getLogger("dl2ls")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad option or unreadable side file: one line, exit 2."""


# ----------------------------------------------------------------------------- shared helpers


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


def _limits(args):
    """--max-item-size, for the readers."""
    from dl2ls.dataloop import read

    text = getattr(args, "max_item_size", None)
    if text is None:
        return None
    try:
        return read.ReadLimits(max_item_bytes=read.parse_size(text))
    except ValueError as err:
        raise UsageError(f"--max-item-size: {err}") from None


def _write_atomic(path: str, chunks: Iterator[bytes], keep: Callable[[], bool] = lambda: True) -> bool:
    """Write through a temporary file beside the target, so a killed run leaves no half file; the
    new file takes the old one's place only if `keep()` says so after the last chunk (a run that
    converted nothing keeps the earlier output). A symlink is written through (the link stays); a
    FIFO or a device (`-o /dev/stdout`) is written to directly. New files get the umask's mode."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{path} is a folder: give a file name")
    if target.exists() and not target.is_file():  # a FIFO, a device: nothing to replace
        try:
            with open(target, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
        except OSError as err:
            raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
        return True
    target = target.resolve() if target.is_symlink() else target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        if not keep():
            Path(tmp).unlink(missing_ok=True)
            return False
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
        return True
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _print_report(report: Report, args) -> None:
    """The summary table, or with -q only the lines about what failed."""
    if getattr(args, "quiet", False):
        for problem in report.problems:
            if problem.outcome in ("failed", "item-failed"):
                print(problem.line(), file=sys.stderr)
    else:
        print(report.summary(), file=sys.stderr)


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
        for converted in convert_sources(args.sources, options, defaults, report, args.kind, _limits(args)):
            yield (b"\n" if first else b",\n") + converted.body
            first = False
        yield b"\n]\n"

    try:
        # a run that converted nothing keeps an earlier good output
        written = _write_atomic(args.output, tasks(), keep=lambda: report.items_converted > 0 or not report.failed)
    except KindError as err:
        raise UsageError(f"{err}; {args.output} is left as it was") from None
    if args.report:
        _write_atomic(args.report, iter([orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2)]))
    _print_report(report, args)
    if written:
        log.info("wrote %d tasks to %s", report.items_converted, escape(args.output))
    else:
        print(f"dl2ls convert: nothing converted: {escape(args.output)} is left as it was", file=sys.stderr)
    if report.items_converted == 0 and report.items_failed:
        return EXIT_USAGE
    return EXIT_FAILED if report.failed else EXIT_OK


# ----------------------------------------------------------------------------- label-config


def cmd_label_config(args) -> int:
    xml, report = generate_config(args.sources, args.ontology, args.kind, _label_map(args.label_map), _limits(args))
    if args.output:
        _write_atomic(args.output, iter([xml.encode()]))
        log.info("wrote %s", escape(args.output))
    else:
        sys.stdout.write(xml)
    return EXIT_FAILED if report.items_failed else EXIT_OK


def generate_config(sources: list[str], ontology: str | None, kind: str | None,
                    label_map: dict[str, str] | None = None, limits=None) -> tuple[str, Report]:
    """The labeling config for what the sources hold (see convert.scan_config)."""
    colors = lsconfig.colors_from_ontology(_read_json_file(ontology, "--ontology")) if ontology else {}
    try:
        xml, report = scan_config(sources, colors, kind, label_map, limits)
    except ValueError as err:  # KindError too
        raise UsageError(str(err)) from None
    for problem in report.problems:
        print(problem.line(), file=sys.stderr)
    return xml, report


# ----------------------------------------------------------------------------- push


def cmd_push(args) -> int:
    from dl2ls.labelstudio import push

    options = _convert_options(args)
    defaults = _defaults(args)
    limits = _limits(args)
    local = _local_media(args, options)
    gateway = _media_policy(args, options)
    pusher = push.Pusher(os.environ.get("LABEL_STUDIO_URL", ""), os.environ.get("LABEL_STUDIO_API_KEY", ""))
    if gateway:
        print(f"dl2ls push: warning: {gateway}", file=sys.stderr)
    project_id, existing, current_version = None, [], None
    if args.new_project:
        try:
            titled = pusher.projects_titled(args.new_project)
        except push.PushError as err:
            if not args.dry_run:
                raise
            # a dry run needs no server: without one it plans the project as new
            log.warning("%s: planning as a new project", err)
            titled = []
        if len(titled) > 1:
            raise UsageError(f"{len(titled)} projects are titled {args.new_project!r} "
                             f"(ids {', '.join(str(p.id) for p in titled)}): pass --project ID")
        if titled:  # an earlier run of this command created it (maybe interrupted): go on there
            args.project = titled[0].id
            theirs = sum(1 for t in pusher.existing_tasks(args.project) if push.META_KEY not in t.meta)
            if theirs:  # a project of the same name that dl2ls did not fill: not ours to write into
                raise UsageError(f"project {args.project} is titled {args.new_project!r} and holds {theirs} tasks "
                                 "dl2ls did not make: pass --project ID to push into it, or another title")
            log.info("project %d is titled %r already: pushing into it", args.project, escape(args.new_project))
        else:
            xml = _read_text(args.label_config, "--label-config") if args.label_config else \
                generate_config(args.sources, None, args.kind, options.label_map, limits)[0]
            config = _parse_config(xml, "--label-config" if args.label_config else "generated config")
            if not args.dry_run:
                project = pusher.create_project(args.new_project, xml)
                project_id = project.id
                config = _parse_config(project.label_config or xml, f"project {project_id}'s labeling config")
    elif args.label_config:
        raise UsageError("--label-config goes with --new-project; an existing project's own config is used")
    scanned = None
    if args.project is not None:
        project = pusher.project(args.project)
        project_id, current_version = project.id, project.model_version
        config = _parse_config(project.label_config or "", f"project {project_id}'s labeling config")
        if project.task_number:
            # the project's tasks are listed (the server's time) while the sources are read and
            # hashed (ours); only the items that changed are read again and converted
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dl2ls-list") as pool:
                listing = pool.submit(lambda: list(pusher.existing_tasks(project_id)))
                try:
                    scanned = scan(args.sources, limits)
                finally:
                    existing = listing.result()
        log.info("project %d: %d tasks", project_id, len(existing))
    options.config = config
    if project_id is not None:
        if local is not None:
            local.storage(pusher, project_id, args.create_storage, args.dry_run)
        if args.media_url:
            _check_media_storage(pusher, project_id, args.media_url, "push")
    stats, report = push.Stats(), Report()
    planner = push.Planner(existing, config.objects[0].data_key, args.match,
                           warn=lambda line: report.warn("push", line))
    if args.match == "filename":
        found = {s.key: s.filename for s in scanned if s.key} if scanned is not None else identities(args.sources, limits)
        planner.match_paths(found)

    def refused(result: push.BatchResult) -> None:
        for change, why in result.refused:
            stats.items_failed += 1
            report.item_failed(InputError(change.item or "?", None, f"Label Studio refused it: {why}"))

    fingerprint = settings_fingerprint(options, defaults)

    def unchanged(entry) -> bool:
        key = entry_key(entry)
        return key is not None and planner.unchanged(key, source_of(entry.digest, fingerprint) or "", stats)

    def changed_entries():
        for one in scanned:
            if one.key is not None and planner.unchanged(one.key, source_of(one.entry.digest, fingerprint) or "",
                                                         stats):
                report.items_unchanged += 1
                continue
            yield one.reload(limits)

    def changes():
        converted_items = (convert_entries(changed_entries(), options, defaults, report, args.kind)
                           if scanned is not None else
                           convert_sources(args.sources, options, defaults, report, args.kind, limits, "push",
                                           skip=unchanged))
        for converted in converted_items:
            if local is not None:
                local.point(converted, options.config)
            yield planner.plan(converted.task, converted.body, stats, source=source_of(converted.digest, fingerprint))

    try:
        push.apply(pusher, project_id, changes(), dry_run=args.dry_run, on_batch=refused)
    except KindError as err:
        raise UsageError(str(err)) from None
    version = planner.model_version(current_version, stats)
    if version and not args.dry_run:
        pusher.set_model_version(project_id, version)
        log.info("project %d model_version = %s", project_id, escape(version))
    if local is not None:
        local.finish()
    _print_report(report, args)
    print(("dry run, nothing written: would have " if args.dry_run else "") + stats.summary(), file=sys.stderr)
    if args.report:
        doc = {**report.to_json(), "push": {**stats.to_json(), "project": project_id, "dry_run": args.dry_run}}
        _write_atomic(args.report, iter([orjson.dumps(doc, option=orjson.OPT_INDENT_2)]))
    if report.items_converted == 0 and report.items_failed:
        return EXIT_USAGE
    return EXIT_FAILED if report.failed else EXIT_OK


# ----------------------------------------------------------------------------- where tasks' media points

LOCAL_FILES = "/data/local-files/?d="
MISSING_LINES = 10  # push --media-root: items without a file named one by one, then counted
DOCUMENT_ROOT_ENV = ("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "LOCAL_FILES_DOCUMENT_ROOT")  # Label Studio's order
# --media-url schemes that a Label Studio cloud import storage resolves (to presigned URLs): the
# SDK's storage kind, the field holding its bucket, and its name in Label Studio's settings
CLOUD_SCHEMES = {"s3": ("s3", "bucket", "Amazon S3"), "gs": ("gcs", "bucket", "Google Cloud Storage"),
                 "azure-blob": ("azure", "container", "Azure Blob Storage")}


MIN_MEDIA_SECRET = 16


def _media_policy(args, options: ConvertOptions) -> str | None:
    """Where the media of the tasks push and sync create points: --media-url's template, else
    (push) --media-root's local files, else the backend's signed /media URLs when DL2LS_PUBLIC_URL
    and DL2LS_MEDIA_SECRET are both set, else Dataloop's stream URL, which a browser cannot load:
    then the warning to print once per run (an existing task's media is never changed)."""
    if args.media_url or getattr(args, "media_root", None):
        return None
    from urllib.parse import urlsplit

    from dl2ls.media import MediaProxy

    public = os.environ.get("DL2LS_PUBLIC_URL", "").strip()
    secret = os.environ.get("DL2LS_MEDIA_SECRET", "")
    if public and secret:
        if len(secret) < MIN_MEDIA_SECRET:
            raise UsageError(f"DL2LS_MEDIA_SECRET must be at least {MIN_MEDIA_SECRET} characters: one signed URL "
                             "is enough to guess a short one offline (e.g. openssl rand -hex 24)")
        try:
            parts = urlsplit(public)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError("DL2LS_PUBLIC_URL must be the dl2ls backend's http(s) URL as browsers reach it "
                             "(e.g. https://dl2ls.example.com)")
        if parts.username or parts.password:
            raise UsageError("DL2LS_PUBLIC_URL must not carry user:password@: it goes into every task's media URL")
        options.media_proxy = MediaProxy(public, secret)
        return None
    half = (" (DL2LS_PUBLIC_URL is set, DL2LS_MEDIA_SECRET is not)" if public else
            " (DL2LS_MEDIA_SECRET is set, DL2LS_PUBLIC_URL is not)" if secret else "")
    return ("new tasks will point at Dataloop's stream URL (.../items/<id>/stream), which Label "
            f"Studio's editor cannot load: the browser has no Dataloop token{half}. Fix: set DL2LS_PUBLIC_URL and "
            "DL2LS_MEDIA_SECRET (the dl2ls backend streams it through signed /media URLs), or `dl2ls fetch --media` "
            "then `dl2ls push --media-root DIR` (Label Studio's local files), or --media-url TEMPLATE for a bucket "
            "the project has as cloud storage")


def _check_media_storage(pusher, project_id: int, template: str, command: str) -> None:
    """--media-url s3://, gs://, azure-blob://: Label Studio resolves such URIs only through an
    import storage of that kind (and bucket) in the project. One warning line when the project has
    none (not an error: it may be added later); a few list requests, once per run."""
    from dl2ls.labelstudio.push import PushError

    match = re.match(r"([a-z][a-z0-9+.-]*)://([^/]*)", template)
    if not match or match.group(1) not in CLOUD_SCHEMES:
        return
    scheme = match.group(1)
    kind, field, label = CLOUD_SCHEMES[scheme]
    # the bucket the URIs name, when the template fixes it (rendered twice: a bucket from a field varies;
    # {filename} and {dir} start with "/", as Dataloop's do)
    buckets = {re.match(r"[^:]*://([^/]*)", template.format(id=v, name=v, filename="/" + v, dir="/" + v,
                                                               dataset_id=v, stream=v)).group(1) for v in ("a", "b")}
    fixed = buckets.pop() if len(buckets) == 1 else None
    try:
        storages = pusher.import_storages(project_id, kind)
    except PushError as err:
        print(escape(f"dl2ls {command}: warning: cannot check project {project_id}'s {label} storages: {err}"),
              file=sys.stderr)
        return
    if storages and (fixed is None or fixed in {getattr(s, field, None) for s in storages}):
        return
    which = f"{label} import storage" + (f" for {field} {fixed!r}" if fixed else "")
    print(escape(f"dl2ls {command}: warning: --media-url gives {scheme}:// URIs, and project {project_id} has no "
                 f"{which}: Label Studio resolves them (to presigned URLs) only through one, so the editor "
                 "cannot load the media until it is added (project Settings > Cloud Storage > Add Source Storage; "
                 "it need not be synced)"), file=sys.stderr)


class _LocalMedia:
    """push --media-root: tasks point at Label Studio's local files, /data/local-files/?d=<the
    item's file relative to LOCAL_FILES_DOCUMENT_ROOT>, under the items/ folder fetch --media wrote."""

    def __init__(self, folder: Path, document_root: Path):
        self.folder, self.document_root = folder, document_root
        self.missing = 0

    def url(self, path: Path) -> str:
        from urllib.parse import quote

        return LOCAL_FILES + quote(path.relative_to(self.document_root).as_posix())  # as Label Studio quotes

    def template(self) -> str:
        """A --media-url equivalent for the settings fingerprint (each task's URL is then set exactly)."""
        return self.url(self.folder).replace("{", "{{").replace("}", "}}") + "{filename}"

    def point(self, converted, config) -> None:
        """Set a converted task's media to its item's file; one line when the file is not there
        (the task is created all the same: the URL is right once fetch --media brings the file)."""
        from dl2ls.dataloop import write

        info, task = converted.info, converted.task
        obj = config.object_for(info.media.kind)
        if obj is None or not (info.item_id or info.filename or info.name):
            return
        path = write.media_path(self.folder, info.dir, info.filename, info.name, info.item_id or "item")
        task["data"][obj.data_key] = self.url(path)
        converted.body = orjson.dumps(task)
        if not path.is_file():
            self.missing += 1
            if self.missing <= MISSING_LINES:
                print(escape(f"dl2ls push: warning: item {info.item_id or info.origin} has no file at {path}: "
                             "its task points there all the same (`dl2ls fetch --media` brings it)"), file=sys.stderr)

    def finish(self) -> None:
        if self.missing > MISSING_LINES:
            print(f"dl2ls push: warning: {self.missing} items in all have no file under {escape(self.folder)}",
                  file=sys.stderr)

    def storage(self, pusher, project_id: int, create: bool, dry_run: bool) -> None:
        """Label Studio serves /data/local-files/ only under a local files storage of the project:
        with --create-storage, make one at the folder unless the project has one at it or above
        (recursive scan, blob URLs, never synced: push makes the tasks, a sync would duplicate
        them); without, one warning line when the project has none."""
        storages = pusher.import_storages(project_id, "local")
        for s in storages:
            there = Path(os.path.normpath(s.path)) if isinstance(getattr(s, "path", None), str) else None
            if there is not None and (there == self.folder or there in self.folder.parents):
                log.info("project %d's local files storage %s serves %s", project_id, s.id, escape(self.folder))
                return
        if not create:
            print(escape(f"dl2ls push: warning: project {project_id} has no local files storage at {self.folder} "
                         "or above it, and Label Studio serves /data/local-files/ only under one: pass "
                         "--create-storage, or add it (Settings > Cloud Storage > Add Source Storage > Local "
                         "files) without syncing it"), file=sys.stderr)
            return
        if dry_run:
            print(escape(f"dry run: would create a local files storage at {self.folder} in project {project_id}"),
                  file=sys.stderr)
            return
        created = pusher.create_local_storage(project_id, str(self.folder), "dl2ls media")
        log.info("created local files storage %s at %s in project %d (not synced: push makes the tasks)",
                 created.id, escape(self.folder), project_id)


def _local_media(args, options: ConvertOptions) -> _LocalMedia | None:
    """--media-root DIR: the items/ folder (DIR, or DIR/items), under LOCAL_FILES_DOCUMENT_ROOT."""
    if getattr(args, "create_storage", False) and not args.media_root:
        raise UsageError("--create-storage goes with --media-root")
    if not getattr(args, "media_root", None):
        return None
    if args.media_url:
        raise UsageError("--media-root and --media-url both say where the tasks' media is: give one")
    root_text = next((os.environ[name] for name in DOCUMENT_ROOT_ENV if os.environ.get(name)), None)
    if not root_text:
        raise UsageError("--media-root needs LOCAL_FILES_DOCUMENT_ROOT: the folder Label Studio serves "
                         "/data/local-files/ from (the value Label Studio runs with; LOCAL_FILES_SERVING_ENABLED "
                         "must be true there too)")
    folder = Path(args.media_root)
    if not folder.is_dir():
        raise UsageError(f"--media-root {escape(folder)}: no such folder (`dl2ls fetch --media` writes DIR/items)")
    if folder.name != "items" and (folder / "items").is_dir():
        folder = folder / "items"
    candidates = [(Path(os.path.abspath(root_text)), Path(os.path.abspath(folder))),
                  (Path(os.path.realpath(root_text)), Path(os.path.realpath(folder)))]
    for root, where in candidates:
        if root in where.parents:
            local = _LocalMedia(where, root)
            options.media_url = local.template()
            options.media_proxy = None
            return local
    if any(root == where for root, where in candidates):
        raise UsageError(f"--media-root {escape(folder)} is LOCAL_FILES_DOCUMENT_ROOT itself: Label Studio serves "
                         "local files only from a folder below it; move the files one level down")
    raise UsageError(f"--media-root {escape(folder)} is not under LOCAL_FILES_DOCUMENT_ROOT "
                     f"({escape(root_text)}): Label Studio serves /data/local-files/ only from there")


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
    from dl2ls.dataloop.model import decode_item
    from dl2ls.report import escape

    filters = _dql(args.filter)
    if not 1 <= args.media_workers <= MAX_MEDIA_WORKERS:
        raise UsageError(f"--media-workers must be between 1 and {MAX_MEDIA_WORKERS}")
    client = api.DataloopClient()
    client.me()
    client.dataset(args.dataset)
    root = Path(args.output)
    count = annotations = skipped = 0
    media = _MediaPlan(root / "items") if args.media else None

    def skip(where: str, reason: str) -> None:  # one line, and the next item
        nonlocal skipped
        skipped += 1
        print(escape(f"dl2ls fetch: skipped {where}: {reason}"), file=sys.stderr)

    def save(item: dict, key: str, body: bytes, where: str, size: int | None) -> None:
        nonlocal count, annotations
        path = write.item_path(root, item.get("dir"), item.get("filename"), item.get("name"), key)
        try:
            write.write_atomic(path, body)
        except OSError as err:
            return skip(where, f"cannot write {path}: {err.strerror or err}")
        count += 1
        anns = item.get("annotations")
        annotations += len(anns) if isinstance(anns, list) else 0
        if media is not None:
            clash = media.add(write.media_job(media.root, key, item.get("dir"), item.get("filename"),
                                              item.get("name"), size))
            if clash:
                skip(f"the media of item {key}", f"its local name is item {clash}'s too: not downloaded")

    if args.method == "export":
        # one element at a time from a temporary file: memory follows the largest item
        for element in client.export_items(args.dataset, filters, limits=_limits(args)):
            where = f"export element {element.index}"
            if element.error is not None:
                skip(where, element.error)
                continue
            try:
                # the reader's own rules (UTF-8, depth, an item object), so what is written converts
                item = decode_item(element.data, where)
            except InputError as err:
                skip(where, err.reason)
                continue
            key = item.id or item.id_
            if not key:
                skip(where, "an item with neither id nor _id")
                continue
            fields = {"dir": item.dir, "filename": item.filename, "name": item.name,
                      "annotations": item.annotations}
            size = write.size_in(element.data) if media is not None else None
            save(fields, key, element.data, f"{where} (item {key})", size)
    else:
        for item in client.query(args.dataset, filters):  # entries without any id are skipped there
            key = api.item_key(item)
            item["annotations"] = client.item_annotations(key)
            try:
                body = orjson.dumps(item)
            except orjson.JSONEncodeError as err:  # e.g. a lone surrogate that Python's json let through
                skip(f"item {key}", f"cannot be written as JSON ({err})")
                continue
            save(item, key, body, f"item {key}", write.item_size(item.get("metadata")))
    skipped += client.counters.skipped
    media_line = ""
    if media is not None:
        done = media.run(client, args.media_workers)
        skipped += done.failed
        media_line = (f"; media into {root / 'items'}: {done.downloaded} downloaded ({_bytes(done.bytes)}), "
                      f"{done.kept} already complete" + (f", {done.failed} failed" if done.failed else ""))
    print(f"fetched {count} items ({annotations} annotations) of dataset {args.dataset} into {root / 'json'} "
          f"with {client.counters.requests} requests ({client.counters.retries} retried)" + media_line
          + (f"; {skipped} skipped" if skipped else ""), file=sys.stderr)
    return EXIT_FAILED if skipped else EXIT_OK


MAX_MEDIA_WORKERS = 32


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _MediaDone:
    downloaded = kept = failed = bytes = 0


class _MediaPlan:
    """fetch --media: the items' binaries to download into `root` (the export's items/ folder),
    one job per item, each to its own path."""

    def __init__(self, root: Path):
        self.root = root
        self.jobs: list = []
        self.claimed: dict[Path, str] = {}

    def add(self, job) -> str | None:
        """Plan a download; the id of the item that already has its path, if one does."""
        other = self.claimed.setdefault(job.path, job.item_id)
        if other != job.item_id:
            return other
        self.jobs.append(job)
        return None

    def run(self, client, workers: int) -> _MediaDone:
        """Download what is not complete from an earlier run (see write.complete), `workers` at a
        time, each streamed to a temporary file and renamed into place when whole; a failure is
        one line and the rest goes on. Ctrl-C stops the downloads under way (their temporary files
        go) and keeps the files already complete, so that a rerun goes on from there."""
        from dl2ls.dataloop import write
        from dl2ls.dataloop.api import DataloopError, Stopped
        from dl2ls.report import describe

        done = _MediaDone()
        # one fetch --media at a time per folder: a run clears the partial files a killed run left,
        # which must not be another live run's
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.root, os.O_RDONLY)  # the folder itself is the lock: nothing left in it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise UsageError(f"another dl2ls fetch --media is writing into {self.root}: wait for it") from None
        try:
            return self._run(client, workers, done, write, DataloopError, Stopped, describe)
        finally:
            os.close(lock)

    def _run(self, client, workers, done, write, DataloopError, Stopped, describe) -> _MediaDone:
        import threading
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        todo = []
        for job in self.jobs:
            if write.complete(job.path, job.size):
                done.kept += 1
            else:
                todo.append(job)
        self.jobs = []
        if not todo:
            return done
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            sizes = [job.size for job in todo]
            bar = tqdm(total=None if None in sizes else sum(sizes), unit="B", unit_scale=True,
                       desc="media", file=sys.stderr, leave=False)
        stop = threading.Event()

        def one(job) -> int:
            write.clear_parts(job.path)  # what a killed run left beside it
            return client.download_media(job.item_id, job.path, stop, bar.update if bar else None)

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dl2ls-media")
        pending: dict = {}
        queue = iter(todo)
        try:
            while True:
                # a bounded number in flight: memory follows the workers, not the dataset
                for job in queue:
                    pending[pool.submit(one, job)] = job
                    if len(pending) >= 2 * workers:
                        break
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = pending.pop(future)
                    try:
                        written = future.result()
                        done.bytes += written
                        done.downloaded += 1
                        if job.size is not None and written != job.size:  # whole as HTTP goes: kept, said
                            print(escape(f"dl2ls fetch: warning: media of item {job.item_id}: {written} bytes where "
                                         f"Dataloop's metadata.system.size says {job.size}: kept, and a rerun "
                                         "downloads it again"), file=sys.stderr)
                    except (DataloopError, Stopped, OSError) as err:
                        done.failed += 1
                        print(escape(f"dl2ls fetch: media of item {job.item_id}: {err}"), file=sys.stderr)
                    except Exception as err:  # noqa: BLE001 - this item alone fails, the rest goes on
                        done.failed += 1
                        print(escape(f"dl2ls fetch: media of item {job.item_id}: {describe(err)}"), file=sys.stderr)
        except BaseException:  # Ctrl-C (or a worker interrupted): stop what is under way, keep what is whole
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
        return done


# ----------------------------------------------------------------------------- sync


def cmd_sync(args) -> int:
    from dl2ls import sync
    from dl2ls.dataloop.api import DataloopClient, DataloopError
    from dl2ls.labelstudio import push

    options = _convert_options(args)
    defaults = _defaults(args)
    filters = _dql(args.filter)
    gateway = _media_policy(args, options)
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
        if gateway:  # one line per run
            print(f"dl2ls sync: warning: {gateway}", file=sys.stderr)
        if args.media_url:
            _check_media_storage(pusher, args.project, args.media_url, "sync")
        report = Report()
        try:
            summary = sync.run_once(client, pusher, args.dataset, args.project, state, filters, options, defaults,
                                    report, allow_mass_delete=args.allow_mass_delete, limits=_limits(args))
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
        return EXIT_FAILED if report.failed or summary.deletions_refused else EXIT_OK

    if every is None:
        return job()
    sync.schedule(job, every)
    return EXIT_OK


# ----------------------------------------------------------------------------- serve


def cmd_serve(args) -> int:
    from dl2ls.server import serve

    if args.source and not Path(args.source).exists():
        raise UsageError(f"--source {args.source}: no such file or folder")
    if not args.source:
        from dl2ls.service import ParamsError, parse_params

        if not (os.environ.get("DATALOOP_API_KEY") or (os.environ.get("DATALOOP_USERNAME")
                                                       and os.environ.get("DATALOOP_PASSWORD"))):
            raise UsageError("the service reads Dataloop: set DATALOOP_API_KEY (or DATALOOP_USERNAME and "
                             "DATALOOP_PASSWORD), or serve an export folder offline with --source PATH")
        try:
            parse_params({}, os.environ.get("DL2LS_DATASET") or None)
        except ParamsError as err:
            raise UsageError(f"DL2LS_DATASET: {err}") from None
    try:
        workers = int(os.environ.get("WORKERS", "1"))
        threads = int(os.environ.get("THREADS", "8"))
    except ValueError:
        raise UsageError("WORKERS and THREADS must be whole numbers") from None
    if workers < 1 or threads < 1:
        raise UsageError("WORKERS and THREADS must be at least 1")
    for name in ("DL2LS_HEADER_TIMEOUT", "DL2LS_BODY_TIMEOUT"):  # read by dl2ls.web's worker
        try:
            if os.environ.get(name) and not 0 < float(os.environ[name]) < 86400:
                raise ValueError
        except ValueError:
            raise UsageError(f"{name} must be a number of seconds") from None
    log.info("serving %s on %s:%d (%d workers x %d threads)",
             escape(args.source) if args.source else f"Dataloop (state in {os.environ.get('MODEL_DIR') or './dl2ls-model'})",
             args.host, args.port, workers, threads)
    serve(args.source, args.host, args.port, workers, threads)
    return EXIT_OK


# ----------------------------------------------------------------------------- worker


def cmd_worker(args) -> int:
    from redis.exceptions import RedisError

    from dl2ls import jobs
    from dl2ls.report import describe

    names = {"hooks": jobs.HOOKS, "sync": jobs.SYNCS}
    wanted = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not wanted or any(q not in names for q in wanted):
        raise UsageError("--queues: a comma-separated list of hooks and sync")
    if not os.environ.get("REDIS_URL"):
        raise UsageError("set REDIS_URL to the Redis the service queues its jobs in (redis://host:6379/0); "
                         "without it the service runs its jobs itself and needs no worker")
    if not (os.environ.get("DATALOOP_API_KEY") or (os.environ.get("DATALOOP_USERNAME")
                                                   and os.environ.get("DATALOOP_PASSWORD"))):
        raise UsageError("the jobs read Dataloop: set DATALOOP_API_KEY (or DATALOOP_USERNAME and DATALOOP_PASSWORD)")
    try:
        jobs.retry_seconds()
        return jobs.run_worker([names[q] for q in wanted], burst=args.burst, name=args.name, verbose=args.verbose)
    except ValueError as err:
        raise UsageError(str(err)) from None
    except (OSError, RedisError) as err:
        raise UsageError(f"Redis at {jobs.safe_url(os.environ['REDIS_URL'])}: {escape(describe(err))}") from None


# ----------------------------------------------------------------------------- verify


def cmd_verify(args) -> int:
    tasks = _read_json_file(args.tasks, "tasks")
    if not isinstance(tasks, list):
        raise UsageError(f"{args.tasks}: expected a JSON array of Label Studio tasks")
    reported = _reported_skips(args.report) if args.report else set()
    found = verify_sources(args.source, tasks, _label_map(args.label_map), args.tolerance, _defaults(args), reported,
                           _limits(args))
    for line in found.lines:
        print(escape(line), file=sys.stderr)
    verdict = found.verdict
    print(f"checked {verdict.annotations} annotations over {verdict.frames} frames: "
          f"largest error {verdict.max_error_px:.6f} px, {len(verdict.mismatches)} differences"
          + (f", {found.without_task} items without a task in {escape(args.tasks)}" if found.without_task else "")
          + (f", {found.unreadable} unreadable items" if found.unreadable else ""))
    for kind, n in sorted(verdict.unchecked.items()):
        print(f"not compared: {n} × {kind}")
    if found.accepted:
        print(f"not compared: {found.accepted} skipped or failed as {escape(args.report)} says")
    if verdict.annotations == 0 and (found.unreadable or found.without_task):
        return EXIT_USAGE
    problems = found.unreadable or found.without_task
    return EXIT_OK if verdict.ok(args.tolerance) and not problems else EXIT_FAILED


def _reported_skips(path: str) -> set[tuple[str, str]]:
    """(file, annotation) of what a conversion report says it skipped or failed, with a reason."""
    doc = _read_json_file(path, "--report")
    problems = doc.get("problems") if isinstance(doc, dict) else None
    if not isinstance(problems, list):
        raise UsageError(f"--report {path}: not a dl2ls report (no problems list)")
    return {(p.get("file"), p.get("annotation")) for p in problems
            if isinstance(p, dict) and p.get("outcome") in ("skipped", "failed") and p.get("annotation")}


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
                   help="task media URL; fields {id}, {name}, {filename}, {dir}, {dataset_id}, {stream}. For media "
                        "in your own bucket: s3://bucket/prefix{filename}, gs://bucket/prefix{filename} or "
                        "azure-blob://container/prefix{filename}, which Label Studio turns into presigned URLs "
                        "through the project's import storage of that kind and bucket (push and sync say in one "
                        "line when the project has none). Default for push and sync: the dl2ls backend's signed "
                        "/media URLs when DL2LS_PUBLIC_URL (the backend as browsers reach it) and "
                        "DL2LS_MEDIA_SECRET are set; else the item's Dataloop stream URL, which the editor cannot "
                        "load without a Dataloop token (a warning line says so), else its filename. An existing "
                        "task's media is never changed")
    p.add_argument("--label-map", metavar="FILE", help='JSON object renaming labels, e.g. {"vehicle.car": "car"}')
    p.add_argument("--tolerance", type=float, default=0.0, metavar="PX",
                   help="allow a lossy keyframe simplification within PX pixels (default 0: exact); "
                        "the report gives the largest error introduced")
    _media_options(p)


def _kind_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=("video", "image"),
                   help="which items to take when the sources hold both: a Label Studio project holds one kind "
                        "of task (without it, mixed sources are refused)")


def _media_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-item-size", metavar="SIZE", default="512M",
                   help="refuse a single item (a file, an array element, a zip entry) larger than this, "
                        "with a line naming it (default: %(default)s)")
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
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors (no summary table)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, one line per HTTP request")
    # the same flags after the command name (dl2ls convert -q ...); SUPPRESS keeps the top-level value
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and errors (no summary table)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, one line per HTTP request")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)  # type: ignore[method-assign]

    p = sub.add_parser("convert", help="convert Dataloop exports into Label Studio tasks with predictions",
                       description="Convert Dataloop exports into a JSON array of Label Studio tasks, each "
                                   "with one prediction per source (Dataloop model, or human).")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("-o", "--output", required=True, metavar="tasks.json", help="where to write the tasks")
    p.add_argument("--report", metavar="FILE", help="also write the conversion report as JSON")
    _kind_option(p)
    _conversion_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("label-config", help="generate a Label Studio labeling config for a source",
                       description="Generate the labeling config that shows everything in the sources: "
                                   "video with frameRate=\"$fps\", labels seen in annotations and snapshots.")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--ontology", metavar="labels.json", help="a Dataloop label tree: labels get its colours")
    p.add_argument("--label-map", metavar="FILE", help="the --label-map convert will use: its labels go in the config")
    _kind_option(p)
    p.add_argument("--max-item-size", metavar="SIZE", default="512M", help="as for convert (default: %(default)s)")
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
    local = p.add_argument_group("media as Label Studio's local files (after `dl2ls fetch --media`)")
    local.add_argument("--media-root", metavar="DIR",
                       help="new tasks point at /data/local-files/?d=<the item's file, relative to "
                            "LOCAL_FILES_DOCUMENT_ROOT>; DIR is the items/ folder fetch --media wrote (or the export "
                            "folder holding it). LOCAL_FILES_DOCUMENT_ROOT (or "
                            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) must be set here to the value Label Studio runs "
                            "with (and LOCAL_FILES_SERVING_ENABLED=true there), and DIR must be a folder below it. "
                            "An item whose file is not there gets a warning line and its task all the same (the URL "
                            "is right once the file comes). Not with --media-url")
    local.add_argument("--create-storage", action="store_true",
                       help="with --media-root: give the project a local files import storage at DIR (recursive, "
                            "blob URLs) unless it has one at DIR or above; never synced, since push makes the tasks "
                            "and a sync would add them twice. Label Studio serves local files only under such a "
                            "storage: without it, push says so in one line when the project has none")
    _kind_option(p)
    _conversion_options(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("fetch",
                       help="download a Dataloop dataset as an export folder (json/ tree; items/ with --media)",
                       description="Fetch a dataset through Dataloop's REST API and write what an export "
                                   "would (json/ mirroring the remote folders; with --media the binaries in items/), "
                                   "so that convert, push and serve work offline from it. Credentials: "
                                   "DATALOOP_API_KEY, or DATALOOP_USERNAME and DATALOOP_PASSWORD; DATALOOP_API_URL "
                                   "for another gate.")
    p.add_argument("--dataset", required=True, metavar="ID")
    p.add_argument("-o", "--output", default="dataloop-export", metavar="DIR", help="(default: %(default)s)")
    p.add_argument("--filter", metavar="DQL.json", help="only the items matching this DQL filter")
    p.add_argument("--max-item-size", metavar="SIZE", default="512M",
                   help="leave out (with a line) an exported item larger than this (default: %(default)s)")
    p.add_argument("--method", choices=("export", "query"), default="export",
                   help="export: one export command (fewest requests); query: items by query, then each "
                        "item's annotations (default: %(default)s)")
    p.add_argument("--media", action="store_true",
                   help="also download each item's binary (its video or image) into DIR/items/, mirroring the "
                        "remote folders as Dataloop's own export does (items/<dir>/<name>), for `push "
                        "--media-root`. Resumable: a rerun skips a file whose size equals the item's "
                        "metadata.system.size, or, when Dataloop gives no size, one that is there and not empty; "
                        "a download goes to a temporary file beside its place and is renamed in only when whole, "
                        "so a killed run leaves no half file. A failed item is one line (exit 1), the rest goes on")
    p.add_argument("--media-workers", type=int, default=4, metavar="N",
                   help="with --media: how many downloads at once (default: %(default)s)")
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
    p.add_argument("--allow-mass-delete", action="store_true",
                   help=f"let one run take away more than {int(100 * 0.10)}%% of the project's tasks (and more than 20) "
                        "for items Dataloop no longer has; without it such a run lists them and deletes none")
    _conversion_options(p, with_config=False)
    p.set_defaults(func=cmd_sync, label_config=None)

    p = sub.add_parser("serve", help="run the ML backend that Label Studio connects to (Settings > Model)",
                       description="Serve Label Studio's ML-backend protocol (/health, /setup, /predict, "
                                   "/webhook, /train, /metrics) under gunicorn. Without --source it is the service: "
                                   "connect it in Label Studio (Settings > Model) with Extra params "
                                   "{\"dataset\": \"<Dataloop dataset id>\"} and it pre-annotates imported tasks, "
                                   "answers /predict from Dataloop and syncs every project by itself (state in "
                                   "MODEL_DIR). Environment: DATALOOP_API_KEY; LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY "
                                   "(when the token Label Studio sends cannot be used); DL2LS_DATASET (a default "
                                   "dataset); DL2LS_PUBLIC_URL (this backend as Label Studio reaches it, when it "
                                   "cannot be found from the connection); DL2LS_DATALOOP_HOOK_SECRET (turns on "
                                   "/dataloop/webhook); BASIC_AUTH_USER/BASIC_AUTH_PASS; WORKERS, THREADS, "
                                   "DL2LS_JOB_THREADS; LOG_LEVEL; DL2LS_MODEL_VERSION (default 'dataloop'); "
                                   "DL2LS_FPS/WIDTH/HEIGHT (for items without metadata).")
    p.add_argument("--source", metavar="PATH", default=os.environ.get("DL2LS_SOURCE") or None,
                   help="serve this export offline (anything convert reads) instead of fetching from Dataloop")
    p.add_argument("--host", default="0.0.0.0", help="(default: %(default)s)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)), help="(default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run the service's jobs from Redis (REDIS_URL), on this machine or any other",
                       description="Run the jobs a `dl2ls serve` with REDIS_URL queues (pre-annotate new tasks, "
                                   "sync a project, a subset of a large first sync) on RQ, the job engine Label "
                                   "Studio itself uses. Start as many as you like, anywhere that reaches Redis, "
                                   "Dataloop and Label Studio: each takes one job at a time, hooks ahead of syncs; "
                                   "one project's jobs never overlap (a lease in Redis), except the subsets of one "
                                   "sync. SIGTERM stops it after the job at hand; a worker killed mid-job has its "
                                   "job retried by the others. Environment: REDIS_URL (required), DATALOOP_API_KEY "
                                   "(or DATALOOP_USERNAME/PASSWORD), LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY (when the "
                                   "token Label Studio sent at /setup cannot be used), DL2LS_DATASET, "
                                   "DL2LS_MODEL_VERSION, DL2LS_PUBLIC_URL and DL2LS_MEDIA_SECRET as the service has "
                                   "them, DL2LS_RETRY_SECONDS (the wait before each of the four retries, default "
                                   "15,60,240,960, or one number for all), DL2LS_SUBSET_SIZE "
                                   "(items per export subset, default 50000).")
    p.add_argument("--queues", default="hooks,sync", metavar="LIST",
                   help="which queues, in order of preference: hooks (connect, pre-annotate, upserts after "
                        "Dataloop's hooks), sync (syncs and their subsets) (default: %(default)s)")
    p.add_argument("--burst", action="store_true", help="stop when the queues are empty (scripts, tests)")
    p.add_argument("--name", help="this worker's name in RQ (default: RQ's, host and pid)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("verify", help="check converted tasks frame by frame against the Dataloop source",
                       description="Evaluate every Label Studio result the way the editor does (interpolation, "
                                   "lifespans) on every frame and compare with the Dataloop timeline.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("tasks", metavar="tasks.json")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="PX", help="allowed box error in pixels")
    p.add_argument("--label-map", metavar="FILE", help="the --label-map used for convert")
    p.add_argument("--report", metavar="FILE",
                   help="the conversion's report: annotations it says were skipped or failed (with a reason) are "
                        "not compared; without it every Dataloop annotation must show in the tasks")
    _media_options(p)
    p.set_defaults(func=cmd_verify)
    return parser


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_ENV = ("LABEL_STUDIO_API_KEY", "DATALOOP_API_KEY", "DATALOOP_PASSWORD", "BASIC_AUTH_PASS",
               "DL2LS_MEDIA_SECRET", "DL2LS_DATALOOP_HOOK_SECRET")


def redact_secrets(record: logging.LogRecord) -> bool:
    """A logging filter on every handler: whatever a library logs (httpx's request lines at -v),
    credentials in URLs and the values of the secret variables never reach the output, and
    control characters from the input cannot forge lines."""
    text = record.getMessage()
    clean = _URL_CREDENTIALS.sub("***@", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            clean = clean.replace(value, "***")
    clean = escape(clean)
    if clean != text:
        record.msg, record.args = clean, None
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    default = getattr(logging, os.environ.get("LOG_LEVEL", "INFO").upper(), logging.INFO)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else default
    logging.basicConfig(level=level, format="dl2ls: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redact_secrets)
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
