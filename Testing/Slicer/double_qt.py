"""The Qt part of the Slicer double (see ``slicer_double.py`` for what each piece models and from which source).

Widgets are plain Python objects built from the real ``Med3D.ui`` by :func:`load_ui`; signals call their slots
in connection order with as many arguments as a slot accepts (as PythonQt does); ``QTimer`` objects are driven
by :func:`process_events`, the double's ``slicer.app.processEvents``.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Dict, List, Optional


# ------------------------------------------------------------------------------------------------ signals

class Signal:
    """A Qt signal: ``connect``/``disconnect``; ``emit`` calls slots in connection order, each with as many of
    the arguments as it accepts (PythonQt drops the rest)."""

    def __init__(self, owner: Any = None) -> None:
        self.owner = owner
        self.slots: List[Callable] = []

    def connect(self, slot: Callable) -> None:
        self.slots.append(slot)

    def disconnect(self, slot: Callable) -> None:
        if slot not in self.slots:
            raise RuntimeError("disconnect: the slot is not connected to this signal")  # as PythonQt
        self.slots.remove(slot)

    def emit(self, *args: Any) -> None:
        if self.owner is not None and getattr(self.owner, "_signalsBlocked", False):
            return
        for slot in list(self.slots):
            slot(*args[:_accepted(slot, len(args))])


def _accepted(slot: Callable, available: int) -> int:
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)))


# -------------------------------------------------------------------------------------------- event loop

class EventLoop:
    """The main thread's event loop: active timers fire when their interval has passed."""

    def __init__(self) -> None:
        self.timers: List["QTimer"] = []
        self.single_shots: List[tuple] = []  # (due time, callable)

    def process_events(self) -> None:
        now = time.monotonic()
        for timer in list(self.timers):
            if timer.isActive() and now >= timer._due:
                timer._due = now + timer.interval / 1000.0
                if timer._singleShot:
                    timer.stop()
                timer.timeout.emit()
        due = [item for item in self.single_shots if item[0] <= now]
        self.single_shots = [item for item in self.single_shots if item[0] > now]
        for _, callback in due:
            callback()


LOOP = EventLoop()


def process_events() -> None:
    LOOP.process_events()


class QTimer:
    """``qt.QTimer``: ``timeout`` fires from :func:`process_events` once ``interval`` ms have passed."""

    def __init__(self, parent: Any = None) -> None:
        self.timeout = Signal()
        self.interval = 0
        self._singleShot = False
        self._active = False
        self._due = 0.0

    def setInterval(self, msec: int) -> None:
        self.interval = int(msec)

    def setSingleShot(self, single: bool) -> None:
        self._singleShot = bool(single)

    def start(self, msec: Optional[int] = None) -> None:
        if msec is not None:
            self.interval = int(msec)
        self._active = True
        self._due = time.monotonic() + self.interval / 1000.0
        if self not in LOOP.timers:
            LOOP.timers.append(self)

    def stop(self) -> None:
        self._active = False

    def isActive(self) -> bool:
        return self._active

    @property
    def active(self) -> bool:
        return self._active

    @staticmethod
    def singleShot(msec: int, callback: Callable) -> None:
        """``QTimer.singleShot(msec, callable)``: runs once from the event loop after ``msec``."""
        LOOP.single_shots.append((time.monotonic() + msec / 1000.0, callback))


# ------------------------------------------------------------------------------------------------ widgets

class QWidget:
    """A widget of a .ui file: name, class, dynamic properties, children, enabled/visible."""

    SIGNALS: tuple = ()

    def __init__(self, name: str = "", className: str = "QWidget") -> None:
        self.name = name
        self._className = className
        self._properties: Dict[str, Any] = {}
        self._children: List[QWidget] = []
        self._parent: Optional[QWidget] = None
        self._signalsBlocked = False
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        for signal in self.SIGNALS:
            setattr(self, signal, Signal(self))

    # PythonQt's old-style connection: widget.connect("clicked(bool)", slot)
    def connect(self, signature: str, slot: Callable) -> bool:
        getattr(self, signature.split("(")[0]).connect(slot)
        return True

    def disconnect(self, signature: str, slot: Callable) -> bool:
        getattr(self, signature.split("(")[0]).disconnect(slot)
        return True

    def className(self) -> str:
        return self._className

    def isWidgetType(self) -> bool:
        return True

    def property(self, name: str) -> Any:
        return self._properties.get(name)

    def setProperty(self, name: str, value: Any) -> None:
        self._properties[name] = value

    def children(self) -> List["QWidget"]:
        return list(self._children)

    def parent(self) -> Optional["QWidget"]:
        return self._parent

    def findChildren(self, cls: Any = None) -> List["QWidget"]:
        found = []
        for child in self._children:
            found.append(child)
            found.extend(child.findChildren(cls))
        return found

    def blockSignals(self, block: bool) -> bool:
        previous, self._signalsBlocked = self._signalsBlocked, bool(block)
        return previous

    def hide(self) -> None:
        self.visible = False

    def show(self) -> None:
        self.visible = True

    def setVisible(self, visible: bool) -> None:
        self.visible = bool(visible)

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)


class QLabel(QWidget):
    def __init__(self, name: str = "", className: str = "QLabel") -> None:
        super().__init__(name, className)
        self.text = ""
        self.wordWrap = False


class QPushButton(QWidget):
    SIGNALS = ("clicked", "toggled")

    def __init__(self, name: str = "", className: str = "QPushButton") -> None:
        super().__init__(name, className)
        self.text = ""
        self.checkable = False
        self.checked = False

    def click(self) -> None:
        """A user's click: nothing happens on a disabled button, as in Qt."""
        if self.enabled and self.visible:
            self.clicked.emit(self.checked)


class QProgressBar(QWidget):
    def __init__(self, name: str = "", className: str = "QProgressBar") -> None:
        super().__init__(name, className)
        self.value = 0
        self.minimum = 0
        self.maximum = 100


class QComboBox(QWidget):
    """``currentIndexChanged(int)`` is emitted whenever the current index changes (``clear`` makes it -1 and the
    first ``addItem`` 0), unless signals are blocked."""

    SIGNALS = ("currentIndexChanged", "currentTextChanged")

    def __init__(self, name: str = "", className: str = "QComboBox") -> None:
        super().__init__(name, className)
        self._items: List[list] = []
        self._currentIndex = -1

    @property
    def items(self) -> List[tuple]:
        return [tuple(item) for item in self._items]

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentIndex(self) -> int:
        return self._currentIndex

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    def setCurrentIndex(self, index: int) -> None:
        index = int(index)
        if not -1 <= index < len(self._items):
            index = -1
        if index != self._currentIndex:
            self._currentIndex = index
            self.currentIndexChanged.emit(index)
            self.currentTextChanged.emit(self.currentText)

    @property
    def currentText(self) -> str:
        return self._items[self._currentIndex][0] if self._currentIndex >= 0 else ""

    def clear(self) -> None:
        self._items = []
        self.setCurrentIndex(-1)

    def addItem(self, text: str, userData: Any = None) -> None:
        self._items.append([str(text), userData])
        if self._currentIndex < 0:
            self.setCurrentIndex(0)

    def itemText(self, index: int) -> str:
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def itemData(self, index: int) -> Any:
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def findData(self, data: Any) -> int:
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def findText(self, text: str) -> int:
        return next((i for i, (t, _) in enumerate(self._items) if t == text), -1)


class QSpinBox(QWidget):
    SIGNALS = ("valueChanged",)
    KIND: type = int

    def __init__(self, name: str = "", className: str = "QSpinBox") -> None:
        super().__init__(name, className)
        self.minimum, self.maximum = self.KIND(0), self.KIND(99)
        self._value = self.KIND(0)
        self.decimals = 2
        self.singleStep = self.KIND(1)

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        value = min(max(self.KIND(value), self.minimum), self.maximum)  # Qt clamps to the range
        if value != self._value:
            self._value = value
            self.valueChanged.emit(value)

    def setRange(self, minimum: Any, maximum: Any) -> None:
        self.minimum, self.maximum = self.KIND(minimum), self.KIND(maximum)
        self.value = self._value

    def setMinimum(self, minimum: Any) -> None:
        self.setRange(minimum, max(self.maximum, minimum))

    def setMaximum(self, maximum: Any) -> None:
        self.setRange(min(self.minimum, maximum), maximum)


class QDoubleSpinBox(QSpinBox):
    KIND = float

    def __init__(self, name: str = "", className: str = "QDoubleSpinBox") -> None:
        super().__init__(name, className)


class QLineEdit(QWidget):
    SIGNALS = ("textChanged",)

    def __init__(self, name: str = "", className: str = "QLineEdit") -> None:
        super().__init__(name, className)
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if str(value) != self._text:
            self._text = str(value)
            self.textChanged.emit(self._text)


class ctkCollapsibleButton(QWidget):
    def __init__(self, name: str = "", className: str = "ctkCollapsibleButton") -> None:
        super().__init__(name, className)
        self.text = ""
        self.collapsed = False


# ctkPathLineEdit::Filter values (CTK Libs/Widgets/ctkPathLineEdit.h, the same as QDir::Filter).
PATH_FILTERS = {"Dirs": 0x001, "Files": 0x002, "Drives": 0x004, "NoSymLinks": 0x008, "Readable": 0x010,
                "Writable": 0x020, "Executable": 0x040, "Modified": 0x080, "Hidden": 0x100, "System": 0x200,
                "AllDirs": 0x400, "CaseSensitive": 0x800, "NoDot": 0x2000, "NoDotDot": 0x4000}
PATH_FILTERS["PermissionMask"] = PATH_FILTERS["Readable"] | PATH_FILTERS["Writable"] | PATH_FILTERS["Executable"]
PATH_FILTERS["AllEntries"] = PATH_FILTERS["Dirs"] | PATH_FILTERS["Files"] | PATH_FILTERS["Drives"]
PATH_FILTERS["NoDotAndDotDot"] = PATH_FILTERS["NoDot"] | PATH_FILTERS["NoDotDot"]


class QFileDialog:
    """Records which dialog was opened; returns ``answer`` (set by a test) as the user's choice."""

    opened: List[str] = []
    answer = ""

    @classmethod
    def getOpenFileName(cls, *args: Any) -> str:
        cls.opened.append("open file")
        return cls.answer

    @classmethod
    def getSaveFileName(cls, *args: Any) -> str:
        cls.opened.append("save file")
        return cls.answer

    @classmethod
    def getExistingDirectory(cls, *args: Any) -> str:
        cls.opened.append("directory")
        return cls.answer


class ctkPathLineEdit(QWidget):
    """``currentPath``; ``browse()`` opens a file dialog when ``filters`` include Files, else a directory dialog
    (CTK ctkPathLineEdit::browse); the default filters are AllEntries | NoDotAndDotDot | Readable."""

    SIGNALS = ("currentPathChanged",)

    def __init__(self, name: str = "", className: str = "ctkPathLineEdit") -> None:
        super().__init__(name, className)
        self._currentPath = ""
        self.filters = PATH_FILTERS["AllEntries"] | PATH_FILTERS["NoDotAndDotDot"] | PATH_FILTERS["Readable"]
        self.nameFilters: List[str] = []

    @property
    def currentPath(self) -> str:
        return self._currentPath

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        if str(path) != self._currentPath:
            self._currentPath = str(path)
            self.currentPathChanged.emit(self._currentPath)

    def browse(self) -> None:
        if self.filters & PATH_FILTERS["Files"]:
            method = QFileDialog.getSaveFileName if self.filters & PATH_FILTERS["Writable"] else \
                QFileDialog.getOpenFileName
            path = method(self, "", self._currentPath, ";;".join(self.nameFilters))
        else:
            path = QFileDialog.getExistingDirectory(self, "", self._currentPath)
        if path:
            self.currentPath = path


class qMRMLWidget(QWidget):
    SIGNALS = ("mrmlSceneChanged",)

    def __init__(self, name: str = "", className: str = "qMRMLWidget") -> None:
        super().__init__(name, className)
        self._scene = None
        self._layout: Optional[QVBoxLayout] = None

    def setMRMLScene(self, scene: Any) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self) -> Any:
        return self._scene

    def setLayout(self, layout: "QVBoxLayout") -> None:
        self._layout = layout
        layout.owner = self

    def layout(self) -> Optional["QVBoxLayout"]:
        return self._layout


class qMRMLNodeComboBox(qMRMLWidget):
    """Lists the scene's nodes of ``nodeTypes``; with no scene set (the .ui's ``mrmlSceneChanged`` connection
    missing) it holds no node: a node set meanwhile is only requested, and chosen once a scene is set
    (qMRMLNodeComboBox::setCurrentNodeID)."""

    SIGNALS = ("mrmlSceneChanged", "currentNodeChanged", "currentNodeIDChanged")

    def __init__(self, name: str = "", className: str = "qMRMLNodeComboBox") -> None:
        super().__init__(name, className)
        self.nodeTypes: List[str] = []
        self.noneEnabled = False
        self.addEnabled = True
        self.removeEnabled = True
        self._currentID: Optional[str] = None
        self._requestedID: Optional[str] = None

    def setMRMLScene(self, scene: Any) -> None:
        super().setMRMLScene(scene)
        if self._requestedID is not None:
            requested, self._requestedID = scene.GetNodeByID(self._requestedID), None
            self.setCurrentNode(requested)

    def _listed(self, node: Any) -> bool:
        return (node is not None and self._scene is not None and self._scene.GetNodeByID(node.GetID()) is node
                and any(node.IsA(kind) for kind in self.nodeTypes))

    def currentNode(self) -> Any:
        node = self._scene.GetNodeByID(self._currentID) if (self._scene and self._currentID) else None
        return node if self._listed(node) else None

    def setCurrentNode(self, node: Any) -> None:
        if self._scene is None:
            self._requestedID = node.GetID() if node is not None else None
            return
        newID = node.GetID() if self._listed(node) else None
        if newID != self._currentID:
            self._currentID = newID
            self.currentNodeChanged.emit(self.currentNode())
            self.currentNodeIDChanged.emit(newID or "")

    def nodes(self) -> List[Any]:
        if self._scene is None:
            return []
        return [n for n in self._scene.GetNodesByClass("vtkMRMLNode") if self._listed(n)]


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    def __init__(self, name: str = "", className: str = "qMRMLCheckableNodeComboBox") -> None:
        super().__init__(name, className)
        self._checked: List[str] = []

    def setCheckState(self, node: Any, state: int) -> None:
        if not self._listed(node):
            return
        if state and node.GetID() not in self._checked:
            self._checked.append(node.GetID())
        elif not state and node.GetID() in self._checked:
            self._checked.remove(node.GetID())

    def checkedNodes(self) -> List[Any]:
        return [n for n in (self._scene.GetNodeByID(i) for i in self._checked) if self._listed(n)]


class QVBoxLayout:
    def __init__(self) -> None:
        self.owner: Optional[QWidget] = None
        self.widgets: List[QWidget] = []

    def addWidget(self, widget: QWidget) -> None:
        self.widgets.append(widget)
        if self.owner is not None:
            widget._parent = self.owner
            self.owner._children.append(widget)

    def addStretch(self, stretch: int = 0) -> None:
        pass
