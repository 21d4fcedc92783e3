"""Label Studio labeling configs: read one (names, labels, frame rate) and generate one.

Pure: XML strings in and out. The mappers are chosen by reading the config, so the names used in
results (`from_name`, `to_name`) and the labels allowed always come from here.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Iterable
from xml.sax.saxutils import quoteattr

OBJECT_TAGS = {"video": "video", "image": "image"}  # tag (lower case) -> media kind

# control tags that hold labels for another control (the Video merges <Labels> into its regions)
LABEL_HOLDERS = {"labels"}


@dataclass(slots=True)
class ObjectTag:
    tag: str  # "video" | "image"
    name: str
    data_key: str  # "$video" -> "video"
    frame_rate: str | None = None


@dataclass(slots=True)
class Control:
    tag: str  # lower case: "videorectangle", "rectanglelabels", "choices", "labels", ...
    name: str
    to_name: str
    labels: list[str] = field(default_factory=list)
    per_region: bool = False
    attrs: dict[str, str] = field(default_factory=dict)

    @property
    def result_type(self) -> str:
        return self.tag


@dataclass
class LabelConfig:
    xml: str
    objects: list[ObjectTag]
    controls: list[Control]
    any_label: bool = False  # the built-in default: every label is welcome

    def object_for(self, kind: str) -> ObjectTag | None:
        return next((o for o in self.objects if o.tag == kind), None)

    def controls_for(self, tag: str, to_name: str, per_region: bool | None = None) -> list[Control]:
        return [
            c for c in self.controls
            if c.tag == tag and c.to_name == to_name and (per_region is None or c.per_region == per_region)
        ]

    def labels_for(self, control: Control) -> set[str] | None:
        """Labels a region of this control may carry; None means any (the built-in default)."""
        if self.any_label:
            return None
        if control.tag in ("videorectangle", "rectangle", "polygon", "keypoint", "ellipse", "brush"):
            holders = [c for c in self.controls if c.tag in LABEL_HOLDERS and c.to_name == control.to_name]
            return {label for c in holders for label in c.labels}
        return set(control.labels)


class ConfigError(ValueError):
    pass


def parse(xml: str) -> LabelConfig:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise ConfigError(f"labeling config is not valid XML: {err}") from None
    objects, controls = [], []
    for el in root.iter():
        tag = el.tag.lower()
        name = el.get("name")
        if tag in OBJECT_TAGS and name:
            value = el.get("value", "")
            objects.append(ObjectTag(tag, name, value.lstrip("$"), el.get("frameRate")))
        elif name and el.get("toName"):
            labels = [child.get("value") for child in el if child.tag in ("Label", "Choice") and child.get("value")]
            controls.append(Control(
                tag=tag,
                name=name,
                to_name=el.get("toName").split(",")[0],
                labels=labels,
                per_region=el.get("perRegion", "").lower() == "true",
                attrs=dict(el.attrib),
            ))
    if not objects:
        raise ConfigError("labeling config has no <Video> or <Image> object tag")
    return LabelConfig(xml, objects, controls)


# ----------------------------------------------------------------------------- generation

# Names a generated config uses; convert without --label-config uses the same ones.
VIDEO = {"object": "video", "labels": "videoLabels", "box": "box", "timeline": "tl", "class": "cls"}
IMAGE = {"object": "image", "box": "label", "segment": "polygon", "point": "keypoint",
         "ellipse": "ellipse", "binary": "brush", "class": "cls"}


IMAGE_TAGS = {"box": "RectangleLabels", "segment": "PolygonLabels", "point": "KeyPointLabels",
              "ellipse": "EllipseLabels", "binary": "BrushLabels"}


@dataclass
class Inventory:
    """What a source holds, for generating a config: labels per media kind and geometry family."""

    video_spatial: dict[str, None] = field(default_factory=dict)
    video_class: dict[str, None] = field(default_factory=dict)
    image: dict[str, dict[str, None]] = field(default_factory=dict)  # IMAGE key -> labels

    def add(self, kind: str, family: str, label: str) -> None:
        if kind == "video":
            (self.video_class if family == "class" else self.video_spatial)[label] = None
        else:
            self.image.setdefault(family, {})[label] = None

    @property
    def empty(self) -> bool:
        return not (self.video_spatial or self.video_class or self.image)


def generate(inv: Inventory, colors: dict[str, str] | None = None) -> str:
    """A labeling config that can show everything in the inventory. A source that mixes videos and
    images gets both objects (the caller warns: a Label Studio project usually holds one kind)."""
    colors = colors or {}

    def labels_xml(tag: str, name: str, to: str, labels: Iterable[str], extra: str = "") -> list[str]:
        out = [f"  <{tag} name={quoteattr(name)} toName={quoteattr(to)}{extra}>"]
        for label in sorted(labels):
            color = colors.get(label)
            background = f" background={quoteattr(color)}" if color else ""
            out.append(f"    <Label value={quoteattr(label)}{background}/>")
        out.append(f"  </{tag}>")
        return out

    lines = ["<View>"]
    if inv.video_spatial or inv.video_class or not inv.image:
        v = VIDEO
        lines.append(f'  <Video name="{v["object"]}" value="${v["object"]}" frameRate="$fps"/>')
        lines += labels_xml("Labels", v["labels"], v["object"], inv.video_spatial, ' allowEmpty="true"')
        lines.append(f'  <VideoRectangle name="{v["box"]}" toName="{v["object"]}"/>')
        if inv.video_class:
            lines += labels_xml("TimelineLabels", v["timeline"], v["object"], inv.video_class)
    if inv.image:
        i = IMAGE
        lines.append(f'  <Image name="{i["object"]}" value="${i["object"]}"/>')
        for family, tag in IMAGE_TAGS.items():
            if family in inv.image:
                lines += labels_xml(tag, i[family], i["object"], inv.image[family])
        if "class" in inv.image:
            lines.append(f'  <Choices name="{i["class"]}" toName="{i["object"]}" choice="multiple">')
            lines += [f"    <Choice value={quoteattr(c)}/>" for c in sorted(inv.image["class"])]
            lines.append("  </Choices>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_safe(text: str) -> bool:
    """Whether XML 1.0 can hold the text at all (control characters it cannot, even escaped)."""
    return not _XML_INVALID.search(text)


def colors_from_ontology(tree: Any) -> dict[str, str]:
    """Dataloop label tree (`[{value: {tag, color, ...}, children: [...]}]`) -> label -> colour.
    Nested labels are keyed by their dotted path, as annotations name them."""
    out: dict[str, str] = {}

    def walk(nodes: Any, prefix: str) -> None:
        if isinstance(nodes, dict):
            nodes = nodes.get("labels") or nodes.get("roots") or [nodes]
        for node in nodes or []:
            if not isinstance(node, dict):
                continue
            value = node.get("value") or {}
            tag = value.get("tag")
            if not tag:
                continue
            path = f"{prefix}.{tag}" if prefix else tag
            if isinstance(value.get("color"), str):
                out[path] = value["color"]
                display = value.get("displayLabel")
                if display and display != tag and not prefix:
                    out.setdefault(display, value["color"])
            walk(node.get("children"), path)

    walk(tree, "")
    return out


def default_config() -> LabelConfig:
    """What convert uses without --label-config: the names `generate` gives, every label allowed."""
    inv = Inventory()
    inv.add("video", "box", "_")
    inv.add("video", "class", "_")
    for family in (*IMAGE_TAGS, "class"):
        inv.add("image", family, "_")
    config = parse(generate(inv))
    config.any_label = True
    return config
