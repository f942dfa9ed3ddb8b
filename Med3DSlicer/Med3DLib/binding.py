"""Binding the panel's widgets to the parameter node, in a way that can be undone in every Slicer version.

``connectGui(ui)`` returns the binding's tag only from Slicer 5.10; in 5.8.0/5.8.1 it returns None, so
``disconnectGui`` cannot undo a binding and every re-binding leaves the old one connected (its combo-box link
then writes stale values). ``connectParametersToGui(mapping)`` returns the tag in all versions; the mapping is
what ``connectGui`` builds: each widget whose ``SlicerParameterName`` property names a parameter.
"""
from __future__ import annotations

from typing import Any, Dict

PARAMETER_NAME_PROPERTY = "SlicerParameterName"


def parameter_widgets(ui: Any) -> Dict[str, Any]:
    """Parameter name -> widget, for the widgets of ``ui`` (``slicer.util.childWidgetVariables``) that name one."""
    found = {}
    for widget in vars(ui).values():
        name = widget.property(PARAMETER_NAME_PROPERTY) if hasattr(widget, "property") else None
        if name:
            found[str(name)] = widget
    return found


def bind(parameterNode: Any, ui: Any) -> Any:
    """Bind and return the tag that ``disconnectGui`` needs."""
    return parameterNode.connectParametersToGui(parameter_widgets(ui))
