"""The parts of a Label Studio labeling config the backend uses, and the label mapping.

The backend works on one ``<Image>`` with a ``<BrushLabels>`` (the masks it returns) and,
usually, a ``<RectangleLabels>`` (the boxes annotators draw, with ``smart="true"`` for the
interactive tool) on the same image::

    <View>
      <Image name="image" value="$image" zoom="true"/>
      <RectangleLabels name="box" toName="image" smart="true">
        <Label value="Person" background="#2a9d8f" predicted_values="person,pedestrian"/>
      </RectangleLabels>
      <BrushLabels name="mask" toName="image">
        <Label value="Person" background="#2a9d8f"/>
      </BrushLabels>
    </View>

Label mapping (model class name -> Label Studio label): a ``<Label>``'s ``predicted_values``
(comma-separated model class names) first, else its ``value`` or ``alias`` equal to the class
name ignoring case. Box-prompted masks need no mapping: a brush takes its rectangle's label.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class LabelConfigError(ValueError):
    """A labeling config the backend cannot work with; the message says what is missing."""


@dataclass(frozen=True)
class Control:
    """One ``<RectangleLabels>`` / ``<BrushLabels>``: its name, the image it points at, its
    labels (``value`` in order) and per label the model class names it stands for."""

    name: str
    to_name: str
    labels: tuple[str, ...]
    predicted_values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # label -> model names (lower case)
    aliases: dict[str, str] = field(default_factory=dict)  # label -> alias

    def find(self, label: str | None) -> str | None:
        """This control's label equal to ``label`` ignoring case (or whose alias is), else None."""
        if not label:
            return None
        key = label.strip().lower()
        for value in self.labels:
            if value.lower() == key or self.aliases.get(value, "").lower() == key:
                return value
        return None


@dataclass(frozen=True)
class LabelConfig:
    """The image tag (``image_name``, task data key ``image_key``) and the controls on it."""

    image_name: str
    image_key: str
    brush: Control | None
    rectangle: Control | None

    def brush_label_for(self, rectangle_label: str | None) -> str | None:
        """The brush label for a rectangle labelled ``rectangle_label``: the same name (any
        case), else a brush label whose predicted_values share a model class with the
        rectangle label's, else the only brush label; None when ambiguous or none."""
        if self.brush is None:
            return None
        same = self.brush.find(rectangle_label)
        if same is not None:
            return same
        if rectangle_label and self.rectangle is not None:
            rect_label = self.rectangle.find(rectangle_label)
            wanted = set(self.rectangle.predicted_values.get(rect_label or "", ())) | {rectangle_label.lower()}
            for value in self.brush.labels:
                if wanted & set(self.brush.predicted_values.get(value, ())):
                    return value
        if len(self.brush.labels) == 1:
            return self.brush.labels[0]
        return None


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a labeling config (XML) into a :class:`LabelConfig`.

    Picks the first ``<BrushLabels>`` whose ``toName`` is an ``<Image>``, and the first
    ``<RectangleLabels>`` on that same image (either may be missing, not both).

    Raises:
        LabelConfigError: not XML, no ``<Image>``, or neither control on an image.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise LabelConfigError(f"the labeling config is not valid XML: {err}") from None
    images = {}
    for el in root.iter():
        if el.tag == "Image" and el.get("name"):
            images[el.get("name")] = _data_key(el.get("value") or el.get("valueList") or "")
    if not images:
        raise LabelConfigError("the labeling config has no <Image> tag")
    brushes = [_control(el) for el in root.iter("BrushLabels") if el.get("toName") in images]
    rects = [_control(el) for el in root.iter("RectangleLabels") if el.get("toName") in images]
    if not brushes and not rects:
        raise LabelConfigError("the labeling config needs <BrushLabels> (and <RectangleLabels>) on an <Image>")
    brush = brushes[0] if brushes else None
    image_name = brush.to_name if brush else rects[0].to_name
    rect = next((r for r in rects if r.to_name == image_name), None)
    return LabelConfig(image_name=image_name, image_key=images[image_name], brush=brush, rectangle=rect)


def _data_key(value: str) -> str:
    """``$image`` -> ``image`` (the task data key)."""
    return value[1:] if value.startswith("$") else value


def _control(el: ET.Element) -> Control:
    labels, predicted, aliases = [], {}, {}
    for child in el.iter("Label"):
        value = child.get("value")
        if value is None:
            continue
        labels.append(value)
        pv = child.get("predicted_values") or child.get("predictedValues")
        if pv:
            predicted[value] = tuple(v.strip().lower() for v in pv.split(",") if v.strip())
        if child.get("alias"):
            aliases[value] = child.get("alias")
    return Control(el.get("name", ""), el.get("toName", ""), tuple(labels), predicted, aliases)


def class_to_label_map(class_names: list[str], control: Control) -> dict[int, str]:
    """Model class index -> label of ``control`` (``predicted_values`` first, then the
    name ignoring case). Classes without a label are left out (their detections are dropped)."""
    mapping: dict[int, str] = {}
    for index, name in enumerate(class_names):
        key = name.strip().lower()
        by_pv = [value for value in control.labels if key in control.predicted_values.get(value, ())]
        if by_pv:
            mapping[index] = by_pv[0]
            continue
        found = control.find(name)
        if found is not None:
            mapping[index] = found
    return mapping


def label_to_class_map(class_names: list[str], control: Control) -> dict[str, int]:
    """Label of ``control`` -> model class index (the inverse of :func:`class_to_label_map`,
    for training data); labels matching no class are left out."""
    lower = {name.strip().lower(): i for i, name in enumerate(class_names)}
    mapping: dict[str, int] = {}
    for value in control.labels:
        for candidate in control.predicted_values.get(value, ()) + (value.lower(), control.aliases.get(value, "").lower()):
            if candidate in lower:
                mapping[value] = lower[candidate]
                break
    return mapping
