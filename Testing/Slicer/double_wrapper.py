"""``slicer.parameterNodeWrapper`` of the Slicer double, following Slicer's ``wrapper.py`` and
``guiConnectors.py`` (see ``slicer_double.py``). The one version difference modelled: ``connectGui`` returns
None in 5.8.0/5.8.1 and the tag in 5.10 (``connectParametersToGui`` returns it in both); in both, the node
observer that a binding adds is never removed."""
from __future__ import annotations

import typing
from typing import Any, Callable, Dict, List, Optional

from double_mrml import MODIFIED_EVENT, Node

SLICER_VERSION = {"value": "5.10"}  # set by slicer_double.install(version=...)
PARAMETER_NAME_PROPERTY = "SlicerParameterName"


class Choice:
    """Validator: the value must be one of ``choices``."""

    def __init__(self, choices: Any) -> None:
        self.choices = choices

    def validate(self, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange:
    """Validator: ``minimum <= value <= maximum``."""

    def __init__(self, minimum: Any, maximum: Any) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value: Any) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


def _validators(hint: Any) -> List[Any]:
    return [a for a in getattr(hint, "__metadata__", ()) if hasattr(a, "validate")]


def _base(hint: Any) -> Any:
    return typing.get_args(hint)[0] if hasattr(hint, "__metadata__") else hint


def _is_node_type(base: Any) -> bool:
    return isinstance(base, type) and issubclass(base, Node)


# -------------------------------------------------------------------------------------------- GUI connectors

class GuiConnector:
    signal = ""

    def __init__(self, widget: Any) -> None:
        self._widget = widget
        self._callback: Optional[Callable] = None

    def onChanged(self, callback: Optional[Callable]) -> None:
        self._callback = callback
        signal = getattr(self._widget, self.signal)
        if callback is None:
            signal.disconnect(self.changed)
        else:
            signal.connect(self.changed)

    def changed(self, *unused: Any) -> None:
        if self._callback:
            self._callback()

    def widget(self) -> Any:
        return self._widget


class ComboBoxConnector(GuiConnector):
    """QComboBoxToStringableConnector: creating it empties the box and adds the choices; ``read`` is
    ``choices[currentIndex]`` (so -1, an emptied box, reads the last choice)."""
    signal = "currentIndexChanged"

    def __init__(self, widget: Any, choices: Any) -> None:
        super().__init__(widget)
        self._choices = list(choices)
        widget.clear()
        for choice in self._choices:
            widget.addItem(str(choice))

    def read(self) -> Any:
        return self._choices[self._widget.currentIndex]

    def write(self, value: Any) -> None:
        if value not in self._choices:
            raise ValueError(f"Unable to find value {value} in choices {self._choices}")
        self._widget.currentIndex = self._choices.index(value)


class SpinBoxConnector(GuiConnector):
    """QSliderOrSpinBoxToIntConnector / QDoubleSpinBox...ToFloatConnector: the range comes from ``WithinRange``,
    else the whole int range (-inf..inf for floats), replacing the .ui file's."""
    signal = "valueChanged"

    def __init__(self, widget: Any, validators: List[Any], kind: type) -> None:
        super().__init__(widget)
        bounds = next((v for v in validators if isinstance(v, WithinRange)), None)
        if bounds is not None:
            widget.setRange(bounds.minimum, bounds.maximum)
        elif kind is int:
            widget.setRange(-(2 ** 31), 2 ** 31 - 1)
        else:
            widget.setRange(float("-inf"), float("inf"))

    def read(self) -> Any:
        return self._widget.value

    def write(self, value: Any) -> None:
        self._widget.value = value


class LineEditConnector(GuiConnector):
    signal = "textChanged"

    def read(self) -> str:
        return self._widget.text

    def write(self, value: str) -> None:
        self._widget.text = value


class NodeComboBoxConnector(GuiConnector):
    """qMRMLNodeComboBoxToNodeConnector: sets ``nodeTypes``; reads ``currentNode()``."""
    signal = "currentNodeChanged"

    def __init__(self, widget: Any, base: type) -> None:
        super().__init__(widget)
        widget.nodeTypes = [base.className]

    def read(self) -> Any:
        return self._widget.currentNode()

    def write(self, value: Any) -> None:
        self._widget.setCurrentNode(value)


def create_gui_connector(widget: Any, hint: Any) -> GuiConnector:
    base, kind = _base(hint), widget.className()
    if kind == "QComboBox" and base in (int, float, str, bool):
        choice = next((v for v in _validators(hint) if isinstance(v, Choice)), None)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        return ComboBoxConnector(widget, choice.choices)
    if (kind, base) in (("QSpinBox", int), ("QDoubleSpinBox", float)):
        return SpinBoxConnector(widget, _validators(hint), base)
    if kind == "QLineEdit" and base is str:
        return LineEditConnector(widget)
    if kind == "qMRMLNodeComboBox" and _is_node_type(base):  # the exact class, as Slicer's type() check
        return NodeComboBoxConnector(widget, base)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{hint}' to widget type '{kind}'")


# ----------------------------------------------------------------------------------------------- wrapper

def parameterNodeWrapper(cls: type) -> type:
    """Typed attributes with defaults over a parameter node; annotations resolved with ``typing.get_type_hints``
    (as Slicer does, so string annotations must resolve); defaults validated when written."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name, None) for name in hints}

    def validate(name: str, value: Any) -> None:
        base = _base(hints[name])
        if _is_node_type(base):
            if value is not None and not isinstance(value, base):
                raise ValueError(f"{name} must be a {base.className}, got {type(value).__name__}")
            return
        for validator in _validators(hints[name]):
            validator.validate(value)

    def read(self: Any, name: str) -> Any:
        node = self.parameterNode
        if _is_node_type(_base(hints[name])):
            return node.GetNodeReference(name)  # None once the referenced node left the scene
        return node.GetParameter(name)

    def write(self: Any, name: str, value: Any) -> None:
        validate(name, value)
        node = self.parameterNode
        if _is_node_type(_base(hints[name])):
            newId = value.GetID() if value is not None else None
            if node.GetNodeReferenceID(name) != newId:
                node.SetNodeReferenceID(name, newId)
                node.Modified()
        else:
            node.SetParameter(name, value)

    def __init__(self: Any, parameterNode: Any) -> None:
        self.parameterNode = parameterNode
        self._parameterGUIs: Dict[int, Dict[str, GuiConnector]] = {}
        self._nextParameterGUIsTag = 0
        self._updatingGUIFromParameterNode = False
        for name, value in defaults.items():
            if name not in parameterNode.parameters and parameterNode.GetNodeReferenceID(name) is None:
                validate(name, value)
                if not _is_node_type(_base(hints[name])):
                    parameterNode.parameters[name] = value

    def make_property(name: str) -> property:
        return property(lambda self: read(self, name), lambda self, value: write(self, name, value))

    def update_gui(self: Any) -> None:
        if self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        self.StartModify()
        try:
            for mapping in list(self._parameterGUIs.values()):
                for name, connector in mapping.items():
                    connector.write(read(self, name))
        finally:
            self.EndModify(0)
            self._updatingGUIFromParameterNode = False

    def gui_to_parameter(self: Any, name: str, connector: GuiConnector) -> Callable:
        def callback() -> None:
            self.StartModify()
            try:
                if not self._updatingGUIFromParameterNode:
                    write(self, name, connector.read())
            finally:
                self.EndModify(0)
        return callback

    def connectParametersToGui(self: Any, mapping: Dict[str, Any]) -> int:
        for name in mapping:
            if name not in hints:
                raise ValueError(f"Cannot find a param with the given name: {name}")
        connectors = {name: create_gui_connector(widget, hints[name]) for name, widget in mapping.items()}
        tag = self._nextParameterGUIsTag
        self._nextParameterGUIsTag += 1
        self._parameterGUIs[tag] = connectors
        for name, connector in connectors.items():
            connector.write(read(self, name))
            connector.onChanged(gui_to_parameter(self, name, connector))
        # Never removed by disconnectGui before 5.12: a dead binding's observer stays on the node.
        self.AddObserver(MODIFIED_EVENT, lambda caller, event: update_gui(self))
        return tag

    def connectGui(self: Any, gui: Any) -> Optional[int]:
        widgets = gui.findChildren() if getattr(gui, "isWidgetType", lambda: False)() else vars(gui).values()
        mapping = {w.property(PARAMETER_NAME_PROPERTY): w for w in widgets if w.property(PARAMETER_NAME_PROPERTY)}
        tag = connectParametersToGui(self, mapping)
        return None if SLICER_VERSION["value"].startswith("5.8") else tag  # 5.8.x: `_connectGui` has no return

    def disconnectGui(self: Any, tag: Any) -> None:
        if tag in self._parameterGUIs:
            for connector in self._parameterGUIs[tag].values():
                connector.onChanged(None)
            del self._parameterGUIs[tag]

    namespace = {
        "__init__": __init__, "connectGui": connectGui, "connectParametersToGui": connectParametersToGui,
        "disconnectGui": disconnectGui, "allParameters": dict(hints),
        "getValue": lambda self, name: read(self, name), "setValue": lambda self, name, value: write(self, name, value),
        "StartModify": lambda self: self.parameterNode.StartModify(),
        "EndModify": lambda self, was: self.parameterNode.EndModify(was),
        "AddObserver": lambda self, event, cb, priority=0.0: self.parameterNode.AddObserver(event, cb, priority),
        "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
        "Modified": lambda self: self.parameterNode.Modified(),
    }
    for key, value in namespace.items():
        setattr(cls, key, value)
    for name in hints:
        setattr(cls, name, make_property(name))
    return cls
