"""Items -> Label Studio tasks: task data (media URL, Dataloop ids, fps) and predictions grouped
by `model_version`, with scores. Pure: no I/O."""

from __future__ import annotations

import string
from collections import defaultdict
from dataclasses import dataclass, field

from dl2ls.labelstudio.config import LabelConfig, default_config
from dl2ls.labelstudio.mappers import Context, convert_track
from dl2ls.media import MediaProxy
from dl2ls.report import InputError, Report, describe
from dl2ls.tracks import ItemInfo, ItemTracks

DEFAULT_MODEL_VERSION = "dataloop-{source}"
HUMAN_SOURCE = "human"  # the source name of annotations no Dataloop model produced
MEDIA_FIELDS = ("id", "name", "filename", "dir", "dataset_id", "stream")
VERSION_FIELDS = ("source", "model_id", "dataset_id", "item_id")


@dataclass
class ConvertOptions:
    config: LabelConfig = field(default_factory=default_config)
    label_map: dict[str, str] = field(default_factory=dict)
    tolerance_px: float = 0.0
    model_version: str = DEFAULT_MODEL_VERSION
    media_url: str | None = None
    media_proxy: MediaProxy | None = None  # without media_url: tasks point at the backend's /media


def check_template(template: str, fields: tuple[str, ...], option: str) -> None:
    """Reject a template with unknown fields before any item is converted."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise ValueError(f"{option}: unknown field {{{unknown[0]}}}; use {', '.join('{' + f + '}' for f in fields)}")
    try:
        template.format(**{f: "x" for f in fields})
    except (ValueError, IndexError, KeyError) as err:
        raise ValueError(f"{option}: {template!r}: {err}") from None


def media_url(info: ItemInfo, template: str | None, proxy: MediaProxy | None = None) -> str:
    """The task's media: the user's template, else the backend's signed /media URL of the item,
    else the item's Dataloop stream URL (which a browser without a Dataloop token cannot load)."""
    if template:
        values = {"id": info.item_id, "name": info.name, "filename": info.filename, "dir": info.dir,
                  "dataset_id": info.dataset_id, "stream": info.stream}
        return template.format(**{k: ("" if v is None else v) for k, v in values.items()})
    if proxy is not None and info.item_id:
        return proxy.url(info.item_id)
    return info.stream or info.filename or info.name or info.origin


def score_of(values: list[float]) -> float | None:
    """A prediction's score: the mean of its regions' model confidences."""
    return round(sum(values) / len(values), 6) if values else None


def to_task(item: ItemTracks, opts: ConvertOptions) -> tuple[dict, Report]:
    """One Label Studio task with one prediction per source (Dataloop model, or human)."""
    report = Report()
    info = item.info
    for type_, ref, reason in item.failures:
        report.count(type_, "failed", info.origin, ref, reason)
    for type_, ref, reason in item.skipped:
        report.count(type_, "skipped", info.origin, ref, reason)
    for note in info.media.notes:
        report.warn(info.origin, note)
    obj = opts.config.object_for(info.media.kind)
    if obj is None:
        raise InputError(info.origin, None, f"the labeling config has no <{info.media.kind.capitalize()}> "
                                            f"for this {info.media.kind} item")
    ctx = Context(opts.config, obj, info.media, opts.label_map, opts.tolerance_px)
    if obj.frame_rate and not obj.frame_rate.startswith("$"):
        try:
            rate = float(obj.frame_rate)
        except ValueError:
            rate = None
        if rate is not None and abs(rate - info.media.fps) > 1e-6:
            report.warn(info.origin, f"the config's frameRate={obj.frame_rate} differs from the video's "
                                     f"{info.media.fps:g} fps: frames will drift; use frameRate=\"$fps\"")
    by_version: dict[str, list[dict]] = defaultdict(list)
    scores: dict[str, list[float]] = defaultdict(list)
    for track in item.tracks:
        for warning in track.warnings or ():
            report.warn(info.origin, warning, track.annotation_id)
        try:
            out = convert_track(track, ctx)
        except (ValueError, ArithmeticError) as err:  # geometry Label Studio cannot show
            report.count(track.type, "failed", info.origin, track.annotation_id, str(err))
            continue
        except Exception as err:  # noqa: BLE001 - unforeseen: this annotation fails alone, the item goes on
            report.count(track.type, "failed", info.origin, track.annotation_id, describe(err))
            continue
        report.count(track.type, out.outcome, info.origin, track.annotation_id, out.reason)
        report.attributes.update({k: v for k, v in out.attributes.items() if v})
        if opts.tolerance_px > 0:
            report.max_error_px = max(report.max_error_px, out.error_px)
        if not out.results:
            continue
        version = opts.model_version.format(
            source=track.model or HUMAN_SOURCE, model_id=track.model_id or "",
            dataset_id=info.dataset_id or "", item_id=info.item_id or "",
        )
        by_version[version].extend(out.results)
        if track.confidence is not None:
            scores[version].append(track.confidence)
        if info.media.kind == "video":
            report.keyframes["emitted"] += out.keyframes
    if info.media.kind == "video":
        report.keyframes["stored"] += item.stored_frames
    report.items_converted += 1

    data = {obj.data_key: media_url(info, opts.media_url, opts.media_proxy), "dataloop_item_id": info.item_id,
            "dataloop_dataset_id": info.dataset_id, "dataloop_filename": info.filename}
    if info.media.kind == "video":
        data["fps"] = info.media.fps
    predictions = []
    for version in sorted(by_version):
        prediction = {"model_version": version}
        score = score_of(scores[version])
        if score is not None:
            prediction["score"] = score
        prediction["result"] = by_version[version]
        predictions.append(prediction)
    return {"data": data, "predictions": predictions}, report
