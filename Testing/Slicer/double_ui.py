"""Building the double's widgets from a .ui file, as ``slicer.util.loadUI`` (QUiLoader) and
``childWidgetVariables`` do (see ``slicer_double.py``)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional

from double_qt import (PATH_FILTERS, QComboBox, QDoubleSpinBox, QLabel, QLineEdit, QProgressBar, QPushButton,
                       QSpinBox, QWidget, ctkCollapsibleButton, ctkPathLineEdit, qMRMLCheckableNodeComboBox,
                       qMRMLNodeComboBox, qMRMLWidget)

WIDGET_CLASSES = {cls.__name__: cls for cls in (
    QWidget, QLabel, QPushButton, QProgressBar, QComboBox, QSpinBox, QDoubleSpinBox, QLineEdit,
    ctkCollapsibleButton, ctkPathLineEdit, qMRMLWidget, qMRMLNodeComboBox, qMRMLCheckableNodeComboBox)}


def _value(element: ET.Element) -> Any:
    kind = element[0]
    text = kind.text or ""
    if kind.tag == "number":
        return int(text)
    if kind.tag == "double":
        return float(text)
    if kind.tag == "bool":
        return text == "true"
    if kind.tag == "stringlist":
        return [s.text or "" for s in kind.findall("string")]
    if kind.tag == "set":
        return sum(PATH_FILTERS[part.split("::")[-1]] for part in text.split("|") if part)
    return text


def load_ui(path: str) -> QWidget:
    """What ``slicer.util.loadUI`` gives: the .ui file's top widget with its named child widgets (of the classes
    above; an unknown class is an error), their properties (dynamic ones such as ``SlicerParameterName``
    included), combo-box items, and the file's signal/slot connections."""
    root = ET.parse(path).getroot()
    widgets: Dict[str, QWidget] = {}

    def build(element: ET.Element, parent: Optional[QWidget]) -> QWidget:
        className = element.get("class")
        if className not in WIDGET_CLASSES:
            raise NotImplementedError(f"the Slicer double has no stand-in for {className}")
        widget = WIDGET_CLASSES[className](element.get("name"), className)
        for prop in element.findall("property"):
            name, value = prop.get("name"), _value(prop)
            if prop.get("stdset") == "0":
                widget.setProperty(name, value)
            elif name in ("geometry", "orientation"):
                continue
            elif name == "value":
                widget.value = value
            else:
                setattr(widget, name, value)
        for item in element.findall("item"):
            widget.addItem(item.find("property/string").text)
        if parent is not None:
            widget._parent = parent
            parent._children.append(widget)
        widgets[widget.name] = widget
        for child in element:
            for descendant in _child_widgets(child):
                build(descendant, widget)
        return widget

    top = build(root.find("widget"), None)
    for connection in root.iter("connection"):
        sender, receiver = widgets[connection.find("sender").text], widgets[connection.find("receiver").text]
        signal = connection.find("signal").text.split("(")[0]
        slot = getattr(receiver, connection.find("slot").text.split("(")[0])
        getattr(sender, signal).connect(slot)
    return top


def _child_widgets(element: ET.Element) -> List[ET.Element]:
    """Widgets directly under ``element``, looking through layouts and layout items."""
    if element.tag == "widget":
        return [element]
    found = []
    for child in element:
        found.extend(_child_widgets(child))
    return found


class UiVariables:
    """What ``slicer.util.childWidgetVariables`` returns: one attribute per named child widget."""


def child_widget_variables(widget: QWidget) -> UiVariables:
    ui = UiVariables()
    for child in widget.findChildren():
        setattr(ui, child.name, child)
    return ui
