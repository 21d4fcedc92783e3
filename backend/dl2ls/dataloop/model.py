"""One typed model of a Dataloop item, its annotations and their snapshots, validated on decode.

Pure: bytes in, typed objects out. The item is decoded leniently (its annotations are kept raw)
and every annotation is then decoded on its own, so one malformed annotation fails alone and the
good ones around it still convert. Field names follow Dataloop's JSON; see
`shared/reference/dataloop.md` for what each means.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dl2ls.report import InputError


class Point(msgspec.Struct, gc=False):
    x: float
    y: float


# Geometry by type (see the reference): box [p1, p2] or [p1, p2, angle]; segment/polyline
# [[p, ...]]; point, ellipse, note: an object; binary: a data URL or {data}; class: [] or none.
# Points inside lists decode straight into `Point`s, the commonest case by far.
Geometry = list[Point | float | list[Point]] | dict[str, Any] | str | None


class Snapshot(msgspec.Struct, gc=False):
    """A stored frame of a video annotation (`metadata.system.snapshots_[i]`)."""

    frame: int
    label: str  # the SDK fails on the whole annotation without it; so do we, with a reason
    data: Geometry = None
    fixed: bool = False
    objectVisible: bool | None = True  # null: dtlpy reads it as not visible
    namedAttributes: dict[str, Any] | None = None
    attributes: Any = None


class ModelInfo(msgspec.Struct, gc=False):
    name: Any = None
    model_id: Any = None
    confidence: Any = None  # 0..1 by the docs; strings and out-of-range values are checked later


class AnnotationSystem(msgspec.Struct, gc=False):
    frame: int = 0
    endFrame: int | None = None
    snapshots_: list[Snapshot] = []
    attributes: dict[str, Any] | None = None
    automated: Any = None
    model: ModelInfo | None = None


class AnnotationUser(msgspec.Struct, gc=False):
    model: ModelInfo | None = None


class AnnotationMetadata(msgspec.Struct, gc=False):
    system: AnnotationSystem | None = None
    user: AnnotationUser | None = None


class Annotation(msgspec.Struct, gc=False):
    type: str
    label: str
    id: str | None = None
    coordinates: Geometry = None
    attributes: Any = None  # v1: a list of strings
    metadata: AnnotationMetadata | None = None
    source: str | None = None
    description: Any = None

    @property
    def system(self) -> AnnotationSystem:
        md = self.metadata
        return md.system if md is not None and md.system is not None else _EMPTY_SYSTEM

    @property
    def model(self) -> ModelInfo | None:
        """The Dataloop model that produced this annotation, if any (user metadata wins)."""
        md = self.metadata
        if md is None:
            return None
        if md.user is not None and md.user.model is not None:
            return md.user.model
        return md.system.model if md.system is not None else None

    @property
    def is_timeline(self) -> bool:
        s = self.system
        return bool(s.snapshots_) or (s.endFrame or 0) > 0 or s.frame > 0


_EMPTY_SYSTEM = AnnotationSystem()


class Ffmpeg(msgspec.Struct, gc=False):
    width: Any = None
    height: Any = None
    nb_read_frames: Any = None
    avg_frame_rate: Any = None


class ItemSystem(msgspec.Struct, gc=False):
    mimetype: str | None = None
    width: Any = None
    height: Any = None
    fps: Any = None
    nb_frames: Any = None
    duration: Any = None
    ffmpeg: Ffmpeg | None = None


class ItemMetadata(msgspec.Struct, gc=False):
    fps: Any = None
    system: ItemSystem | None = None


# Decoded structs never form reference cycles, so they stay out of the garbage collector's way
# (gc=False): a large export allocates millions of them.


class Item(msgspec.Struct):
    """An item JSON as exported (one file per item, or one element of an export array).

    `annotations` holds decoded `Annotation`s when the whole item validated in one pass (the fast,
    usual case), else the raw JSON of each, decoded one by one by `decode_annotation`."""

    annotations: list[Any] | None = []
    id: str | None = None
    id_: str | None = msgspec.field(default=None, name="_id")
    datasetId: str | None = None
    dir: str | None = None
    filename: str | None = None
    name: str | None = None
    stream: str | None = None
    metadata: ItemMetadata | None = None


class _RawItem(Item):
    annotations: list[msgspec.Raw] | None = []


class _TypedItem(Item):
    annotations: list[Annotation] | None = []


_typed_item_decoder = msgspec.json.Decoder(_TypedItem)
_item_decoder = msgspec.json.Decoder(_RawItem)
_annotation_decoder = msgspec.json.Decoder(Annotation)
_any_decoder = msgspec.json.Decoder()


@dataclass(slots=True)
class Media:
    """What a Label Studio task needs to know about the media: size, and for video its clock."""

    kind: str  # "video" | "image"
    width: float | None
    height: float | None
    fps: float | None = None
    frames_count: int | None = None
    duration: float | None = None
    notes: list[str] = field(default_factory=list)  # what the report should warn about the item


@dataclass(slots=True)
class MediaDefaults:
    """Fallbacks from the command line for items that do not carry their own metadata."""

    fps: float | None = None
    width: float | None = None
    height: float | None = None


def decode_json(data: bytes | memoryview, origin: str) -> Any:
    """Decode a JSON document; NaN/Infinity (which Python's json writes) are accepted so that the
    annotations holding them can be reported one by one instead of losing the whole file. Input
    nested too deeply, or not UTF-8, is an InputError like any other bad JSON."""
    if not len(data) or not bytes(data[:4096]).strip():
        raise InputError(origin, None, "empty file")
    try:
        return _any_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as err:
        first = err
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        if isinstance(first, msgspec.DecodeError) and isinstance(err, RecursionError):
            first = err
        reason = _short(first)
        raise InputError(origin, None, reason if isinstance(first, (UnicodeDecodeError, RecursionError))
                         else f"not valid JSON ({reason})") from None


def decode_item(data: bytes | memoryview, origin: str) -> Item:
    """Decode one item in one pass; when that fails, keep the annotations raw so that each is
    decoded (and fails) on its own in `decode_annotation`."""
    # msgspec raises UnicodeDecodeError for bytes that are not UTF-8 and RecursionError for input
    # nested deeper than Python's stack: both are bad input, reported like a malformed document
    try:
        return _typed_item_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        data = bytes(data)  # raw annotations refer to their buffer: give them their own
    try:
        return _item_decoder.decode(data)
    except msgspec.ValidationError as err:
        raise InputError(origin, None, f"not a Dataloop item: {_short(err)}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        doc = decode_json(data, origin)  # raises the precise JSON error, or tolerates NaN
        return item_from_object(doc, origin)


def item_from_object(doc: Any, origin: str) -> Item:
    try:
        item = msgspec.convert(_raw_annotations(doc), _RawItem)
    except msgspec.ValidationError as err:
        raise InputError(origin, None, f"not a Dataloop item: {_short(err)}") from None
    except RecursionError as err:
        raise InputError(origin, None, _short(err)) from None
    # Python's json (the NaN fallback) accepts escaped lone surrogates ("\udc80") that msgspec
    # refuses and that no JSON writer accepts later: the item's own texts must be real Unicode
    for value in (item.id, item.id_, item.datasetId, item.dir, item.filename, item.name, item.stream):
        if value is not None and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(origin, None, f"not a Dataloop item: {ascii(value)[:80]} holds a lone UTF-16 "
                                               "surrogate, not a character") from None
    return item


def _raw_annotations(doc: Any) -> Any:
    """Re-encode annotations of an already-parsed item so that they decode one by one."""
    if isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
        doc = dict(doc)
        doc["annotations"] = [msgspec.Raw(_dumps(a)) for a in doc["annotations"]]
    return doc


def _dumps(obj: Any) -> bytes:
    # json.dumps keeps NaN as the literal NaN, which decode_annotation then reports precisely
    return json.dumps(obj).encode()


def decode_annotation(raw: Annotation | msgspec.Raw | bytes, origin: str, index: int) -> Annotation:
    """Decode and validate one annotation; errors name the file and the annotation."""
    if isinstance(raw, Annotation):
        return raw
    try:
        ann = _annotation_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError) as err:
        obj = None
        try:
            obj = json.loads(bytes(raw))
        except (ValueError, RecursionError):  # not UTF-8 (a ValueError), or nested too deeply
            pass
        ann_id = _id_of(obj, index)
        if not ann_id.isascii():  # an id that is itself a lone surrogate must not reach the report
            ann_id = ann_id.encode("utf-8", "backslashreplace").decode("utf-8")
        if not isinstance(obj, dict):
            raise InputError(origin, ann_id, _short(err)) from None
        try:
            ann = msgspec.convert(obj, Annotation)
            # what json accepted and msgspec refused may be lone surrogates ("\udc80"): texts that
            # would stop the task from being written; msgspec's encoder refuses them as orjson does
            msgspec.json.encode(obj)
        except msgspec.ValidationError as err2:
            raise InputError(origin, ann_id, _short(err2)) from None
        except UnicodeEncodeError:
            raise InputError(origin, ann_id, "a text holds a lone UTF-16 surrogate, not a character "
                                             "(e.g. an escaped \\udc80)") from None
        except RecursionError as err2:
            raise InputError(origin, ann_id, _short(err2)) from None
    return ann


def annotation_ref(ann: Annotation | None, index: int) -> str:
    return ann.id if ann is not None and ann.id else f"ann{index}"


def _id_of(obj: Any, index: int) -> str:
    if isinstance(obj, dict):
        for key in ("id", "_id"):
            if isinstance(obj.get(key), str):
                return obj[key]
    return f"ann{index}"


def _short(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply to read"
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{err.object[err.start]:02x} in a string)"
    return str(err).splitlines()[0][:300]


# ---------------------------------------------------------------------------- item metadata


def item_id(item: Item) -> str | None:
    return item.id or item.id_


def media_of(item: Item | None, annotations: list[Annotation], defaults: MediaDefaults, origin: str) -> Media:
    """Decide whether the item is a video or an image and read its size and clock.

    Metadata in the item wins; the command-line defaults fill what is missing. Missing size is an
    error for the whole item; for fps see `_fps`."""
    md = item.metadata if item is not None else None
    system = md.system if md is not None and md.system is not None else ItemSystem()
    ff = system.ffmpeg or Ffmpeg()
    mimetype = system.mimetype or ""
    if mimetype.startswith("video/"):
        kind = "video"
    elif mimetype.startswith("image/"):
        kind = "image"
    elif any(a.is_timeline for a in annotations):
        kind = "video"
    else:
        kind = "image"

    width = _positive(system.width, "width", origin) or _positive(ff.width, "width", origin) or defaults.width
    height = _positive(system.height, "height", origin) or _positive(ff.height, "height", origin) or defaults.height
    if kind == "image":
        return Media("image", width, height)

    notes: list[str] = []
    fps = _fps(md, system, ff, defaults, origin, notes)
    frames = _count(system.nb_frames) or _count(ff.nb_read_frames)
    duration = _positive(system.duration, "duration", origin)
    if frames is None and duration and fps:
        frames = round(duration * fps)
    if duration is None and frames and fps:
        duration = frames / fps
    return Media("video", width, height, fps, frames, duration, notes)


#: What dtlpy assumes when an item has no fps (`entities/annotation_collection.py`, `from_json(fps=25)`).
DATALOOP_DEFAULT_FPS = 25.0


def _fps(md: ItemMetadata | None, system: ItemSystem, ff: Ffmpeg, defaults: MediaDefaults, origin: str,
         notes: list[str]) -> float:
    """The item's frame rate: the first of its fps fields that is there (null is not), else the
    --fps default, else Dataloop's own default of 25, reported. A field that is there but holds no
    frame rate (0, negative, NaN, a word, absurdly large) fails the item: guessing would shift
    every frame in time."""
    fields = (("metadata.fps", md.fps if md is not None else None), ("metadata.system.fps", system.fps),
              ("metadata.system.ffmpeg.avg_frame_rate", ff.avg_frame_rate))
    for name, value in fields:
        if value is None or (name.endswith("avg_frame_rate") and value == "0/0"):
            continue  # null, and ffprobe's own "rate unknown", are no value: the next source may have one
        rate = _rate(value)
        if rate is None or not FLOORS["fps"] <= rate <= LIMITS["fps"]:
            raise InputError(origin, None, f"item {name} {repr(value)[:80]} is not a frame rate "
                                           f"(expected a number of frames per second up to {LIMITS['fps']:g})")
        return rate
    if defaults.fps:
        return defaults.fps
    notes.append(f"no fps in the item: Dataloop's default {DATALOOP_DEFAULT_FPS:g} used (pass --fps to set it)")
    return DATALOOP_DEFAULT_FPS


def require_media(media: Media, origin: str) -> None:
    missing = []
    if not media.width or not media.height:
        missing.append("size (pass --width/--height)")
    if missing:
        raise InputError(origin, None, f"{media.kind} item has no " + " and no ".join(missing))


# Plausible upper bounds: beyond them a value is a corrupt export, not a video.
LIMITS = {"fps": 1000.0, "width": 1e6, "height": 1e6, "duration": 1e7, "frames": 1e9}
FLOORS = {"fps": 1e-3, "width": 1.0, "height": 1.0, "duration": 1e-6}  # below: not a real value


def _positive(value: Any, what: str, origin: str) -> float | None:
    """A positive number, or None when missing or not positive (the next source may have it);
    an absurdly large one is an error."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(number) or number < FLOORS[what]:
        return None
    if number > LIMITS[what]:
        raise InputError(origin, None, f"item {what} {value!r} is beyond any real media (max {LIMITS[what]:g})")
    return number


def _count(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number <= 0 or number > LIMITS["frames"]:
        return None
    return int(number)


def _rate(value: Any) -> float | None:
    """A number, a numeric string ("29.97") or ffprobe's fraction ("30000/1001"); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and "/" in value:
        num, _, den = value.partition("/")
        try:
            rate = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return None
    else:
        try:
            rate = float(value)
        except (TypeError, ValueError):
            return None
    return rate if math.isfinite(rate) else None
