"""``med3d models list | pull NAME | import FILE | remove NAME``: the model catalog over the models folder."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List

from ..progress import PROGRESS_MODES, make_event, make_reporter
from . import dump_json, printable


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models", help="list, download, import or remove published encoders (MedicalNet) in the models folder",
        description="The model catalog: Tencent's MedicalNet encoders by name, kept in the models folder "
                    "($MED3D_MODELS, else ~/.med3d/models). Nothing is downloaded unless you run 'pull'. Every "
                    "file is checked (size, SHA-256, network) before use; start fine-tuning from one with "
                    "'med3d finetune --init NAME'.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    listing = sub.add_parser("list", help="the catalog and what the models folder holds")
    listing.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    listing.set_defaults(func=run_list)
    pull = sub.add_parser("pull", help="download a catalog model (resumes an interrupted download)")
    pull.add_argument("name", metavar="NAME", help="catalog name, e.g. medicalnet-resnet50 (see 'med3d models list')")
    pull.add_argument("--timeout", type=float, default=60.0,
                      help="seconds without data before giving up (default 60); run again to resume")
    pull.add_argument("--restart", action="store_true", help="discard an unfinished download and start over")
    pull.add_argument("--progress", default="bar", choices=PROGRESS_MODES,
                      help="bar (terminal), jsonl (one JSON object per line on stdout) or none")
    pull.set_defaults(func=run_pull)
    imp = sub.add_parser("import", help="add a catalog model file you obtained by hand (no network)")
    imp.add_argument("file", metavar="FILE", help="the .pth file, e.g. resnet_50_23dataset.pth")
    imp.add_argument("--name", help="its catalog name (default: from the file name)")
    imp.set_defaults(func=run_import)
    rm = sub.add_parser("remove", help="delete a catalog model (and an unfinished download) from the models folder")
    rm.add_argument("name", metavar="NAME", help="catalog name")
    rm.set_defaults(func=run_remove)


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def format_table(rows: List[Dict[str, Any]], folder: str) -> str:
    lines = [f"models folder: {folder}", "",
             f"{'NAME':32s} {'NETWORK':24s} {'SIZE':9s} STATE"]
    for row in rows:
        network = f"ResNet-{row['depth']}, shortcut {row['shortcut_type']}"
        if row["state"] == "downloaded":
            state = "downloaded" + ("" if row.get("sha256") else " (not checked yet)")
        elif row["state"] == "partial":
            state = f"partial: {_mb(row['bytes'])} (pull resumes)"
        else:
            state = "not downloaded"
        lines.append(f"{row['name']:32s} {network:24s} {row['approx_size']:9s} {state}")
    lines += ["", "Tencent MedicalNet encoders (licence MIT), pretrained on the 8 datasets of 3DSeg-8 or, '-23datasets',",
              "on 23 datasets; files from huggingface.co/TencentMedicalNet. Download: med3d models pull NAME;",
              "use: med3d finetune --init NAME."]
    return "\n".join(printable(line) for line in lines)


def run_list(args: argparse.Namespace) -> int:
    from ..catalog import models_dir, status

    rows = status()
    print(dump_json(rows, indent=2) if args.json else format_table(rows, str(models_dir())))
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from ..catalog import known_model, pull

    model = known_model(args.name)
    reporter = make_reporter(args.progress)
    reporter(make_event("download", kind="message", message=f"{model.name}: {model.file} ({model.approx_size}) "
                                                            f"from {model.url}"))
    path = pull(model.name, reporter=reporter, timeout=args.timeout, resume=not args.restart)
    if args.progress == "jsonl":
        reporter(make_event("download", kind="result", name=model.name, path=str(path)))
    else:
        print(f"{model.name}: {path} (checked); fine-tune from it with: med3d finetune --init {model.name} ...")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ..catalog import import_file

    path = import_file(args.file, name=args.name)
    print(f"imported {printable(args.file)} as {printable(path)} (checked)")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from ..catalog import remove

    for path in remove(args.name):
        print(f"removed {printable(path)}")
    return 0
