"""``med3d inspect FILE [--json]``: what a checkpoint holds (MedicalNet release, Med3D model or bare state dict)."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List

from . import dump_json, printable


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
    from ..medicalnet import describe_architecture

    kinds = {"medicalnet": "MedicalNet backbone", "med3d-bundle": "Med3D model", "state_dict": "bare state dict",
             "training-checkpoint": "a fine-tuning or pretraining run's checkpoint"}
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
        lines.append(f"checksum:    {info.get('checksum') or '?'}")
        lines += _provenance_lines(info.get("provenance") or {})
        if "nodule_input" in info:
            lines.append(f"nodule input: {_nodule_input(info['nodule_input'])}")
        if info.get("also_holds"):
            lines.append("also holds:  " + "; ".join(info["also_holds"]))
    elif info["format"] == "training-checkpoint":
        which = "best validation so far (best.pt)" if info.get("best") else "latest (last.pt)"
        lines.append(f"step:        {info.get('step')} of {info.get('total_steps') or '?'}, {which}")
        lines.append(f"metrics:     {_metrics(info.get('metrics'))}")
        lines.append("use:         --resume continues the run; the finished model is the run's OUT/NAME.pt")
    else:
        lines.append(f"use:         a backbone, not a model ready for inference: med3d finetune --init {info['path']}")
    return "\n".join(printable(line) for line in lines)  # the file's strings must not drive the terminal


def _nodule_input(params: Any) -> str:
    """A classifier's cube and the context it shows around a mask, which is the margin to draw an ROI with (the
    bundle's checks have bounded it)."""
    from ..nodules import NoduleInputSpec

    spec = NoduleInputSpec.from_dict(params)
    low, high = spec.window
    return (f"{spec.cube}^3 voxels at {spec.spacing_mm:g} mm, {low:g}..{high:g} HU; context around a mask "
            f"{spec.context_text()} (draw an ROI with this margin around the nodule)")


def _metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict) or not metrics:
        return "none recorded"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _provenance_lines(prov: Dict[str, Any]) -> List[str]:
    """What a bundle says about how it was made: start, steps, data, validation metrics."""
    data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
    lines = [f"trained:     from {prov.get('init', '?')}, {prov.get('steps', '?')} steps"]
    counts = []
    for key in ("train_cases", "validation_cases"):
        value = data.get(key)
        if value is not None:
            counts.append(f"{len(value) if isinstance(value, list) else value} {key.split('_')[0]}")
    if counts:
        lines.append(f"data:        {', '.join(counts)} cases" + (" (synthetic only)" if data.get("synthetic") else ""))
    lines.append(f"metrics:     {_metrics(prov.get('metrics'))}")
    return lines


def run(args: argparse.Namespace) -> int:
    from ..bundles import inspect_file

    info = inspect_file(args.file)
    print(dump_json(info, indent=2) if args.json else format_info(info))
    return 0
