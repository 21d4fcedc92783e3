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
from pathlib import Path
from typing import Iterator

import orjson

from dl2ls import __version__
from dl2ls.dataloop.model import MediaDefaults, decode_annotation, media_of
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
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be a positive number")
    return MediaDefaults(args.fps, args.width, args.height)


def _write_atomic(path: str, chunks: Iterator[bytes]) -> None:
    """Write through a temporary file in the same folder, so a killed run leaves no half file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- convert


def cmd_convert(args) -> int:
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
        try:
            options.config = lsconfig.parse(Path(args.label_config).read_text())
        except OSError as err:
            raise UsageError(f"--label-config {args.label_config}: {err.strerror or err}") from None
        except lsconfig.ConfigError as err:
            raise UsageError(f"--label-config {args.label_config}: {err}") from None
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
    colors = {}
    if args.ontology:
        colors = lsconfig.colors_from_ontology(_read_json_file(args.ontology, "--ontology"))
    inv = lsconfig.Inventory()
    report = Report()
    kinds = set()
    for entry in _entries(args.sources, "scan"):
        if entry.note or entry.error is not None:
            if entry.error is not None:
                report.item_failed(entry.error)
            continue
        anns = []
        for index, raw in enumerate(entry.item.annotations):
            try:
                anns.append(decode_annotation(raw, entry.origin, index))
            except InputError:
                continue
        try:
            kind = media_of(entry.item, anns, MediaDefaults(), entry.origin).kind
        except InputError as err:
            report.item_failed(err)
            continue
        kinds.add(kind)
        for ann in anns:
            family = family_of(kind, ann.type)
            if family is None:
                continue
            inv.add(kind, family, ann.label)
            for snap in ann.system.snapshots_:
                inv.add(kind, family, snap.label)
    for problem in report.problems:
        log.warning("%s", problem.line())
    if inv.empty:
        print("dl2ls label-config: no annotations found in the sources", file=sys.stderr)
        return EXIT_USAGE
    if len(kinds) > 1:
        log.warning("the sources mix videos and images; a Label Studio project usually holds one kind of task")
    xml = lsconfig.generate(inv, colors)
    if args.output:
        _write_atomic(args.output, iter([xml.encode()]))
        log.info("wrote %s", args.output)
    else:
        sys.stdout.write(xml)
    return EXIT_FAILED if report.items_failed else EXIT_OK


# ----------------------------------------------------------------------------- verify


def cmd_verify(args) -> int:
    tasks = _read_json_file(args.tasks, "tasks")
    if not isinstance(tasks, list):
        raise UsageError(f"{args.tasks}: expected a JSON array of Label Studio tasks")
    by_id, by_file = {}, {}
    for task in tasks:
        data = task.get("data", {}) if isinstance(task, dict) else {}
        if data.get("dataloop_item_id"):
            by_id[data["dataloop_item_id"]] = task
        if data.get("dataloop_filename"):
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
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("label-config", help="generate a Label Studio labeling config for a source",
                       description="Generate the labeling config that shows everything in the sources: "
                                   "video with frameRate=\"$fps\", labels seen in annotations and snapshots.")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--ontology", metavar="labels.json", help="a Dataloop label tree: labels get its colours")
    p.set_defaults(func=cmd_label_config)

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
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="dl2ls: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"dl2ls {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dl2ls: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
