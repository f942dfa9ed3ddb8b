"""``med3d inspect FILE [--json]``: what a checkpoint holds (MedicalNet release, Med3D model or bare state dict)."""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

from ..weights import describe_architecture, inspect_file


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect", help="describe a checkpoint: format, network, parameters, task and labels",
        description="Describe a MedicalNet .pth file, a Med3D model or a bare state dict without running it "
                    "(loaded with weights_only: a file that tries to run code is refused).")
    parser.add_argument("file", metavar="FILE", help="checkpoint file (.pth, .pt)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def _millions(count: int) -> str:
    return f"{count:,} ({count / 1e6:.2f} M)"


def format_info(info: Dict[str, Any]) -> str:
    """The human-readable report of :func:`inspect_file`'s dict."""
    kinds = {"medicalnet": "MedicalNet backbone", "med3d-bundle": "Med3D model", "state_dict": "bare state dict"}
    lines: List[str] = [
        f"file:        {info['path']}",
        f"format:      {info['format']} ({kinds.get(info['format'], info['format'])})",
        f"network:     {describe_architecture(info)}",
        f"depth:       {info['depth']}",
        f"shortcut:    {info['shortcut_type']}",
        f"preact:      {'yes' if info['preact'] else 'no'}",
        f"parameters:  backbone {_millions(info['backbone_parameters'])}, "
        f"total {_millions(info['total_parameters'])}",
    ]
    if info["format"] == "med3d-bundle":
        task = info.get("task") or {}
        head = dict(info.get("head") or {})
        head_type = head.pop("type", "?")
        params = ", ".join(f"{k}={v}" for k, v in head.items())
        lines.append(f"head:        {head_type}" + (f" ({params})" if params else ""))
        lines.append(f"task:        {task.get('type', '?')}" + (f" ({task['name']})" if task.get("name") else ""))
        labels = info.get("labels") or []
        lines.append("labels:      " + (", ".join(f"{l.get('value')}={l.get('name')}" for l in labels) or "none"))
        lines.append(f"created:     {info.get('created') or '?'} by med3dcore {info.get('med3dcore') or '?'}")
    else:
        lines.append(f"use:         a backbone, not a model ready for inference: med3d finetune --init {info['path']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = inspect_file(args.file)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
