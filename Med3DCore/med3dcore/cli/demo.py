"""``med3d demo``: the offline demo on synthetic phantoms (no network, no weights)."""
from __future__ import annotations

import argparse
from typing import Any

from ..devices import DEVICE_CHOICES
from ..progress import PROGRESS_MODES, make_reporter


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="try Med3D offline: pretrain, fine-tune and segment synthetic CT phantoms (~10 min on 2 cores)",
        description="Runs Med3D end to end on synthetic CT phantoms, with no downloads: pretrains a small encoder "
                    "on four phantom domains, fine-tunes lung segmentation and nodule classification from it and "
                    "from scratch, segments and classifies a held-out phantom, and writes the label map, an "
                    "overlay PNG and a report (pretrained vs scratch) to --out. The data are synthetic.")
    p.add_argument("--out", default="med3d-demo", help="output folder (default ./med3d-demo)")
    p.add_argument("--quick", action="store_true",
                   help="a few training steps only: checks that every stage runs (~1.5 min); its numbers are not "
                        "results")
    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms and the training (default 0)")
    p.add_argument("--progress", default="bar", choices=PROGRESS_MODES,
                   help="bar (terminal), jsonl (one JSON object per line on stdout) or none")
    p.add_argument("--overwrite", action="store_true", help="run again into an --out that holds a demo")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the training checkpoints and caches (about 1.2 GB; default: deleted at the end)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    report = run_demo(args.out, quick=args.quick, device=args.device, seed=args.seed,
                      reporter=make_reporter(args.progress), overwrite=args.overwrite,
                      keep_checkpoints=args.keep_checkpoints)
    if args.progress != "jsonl":
        print(f"\n{report['note']}\n")
        if report.get("quick_note"):
            print(f"{report['quick_note']}\n")
        for name, scores in report["results"].items():
            print(f"  {name:10s} lung Dice {scores['lung_dice']:.3f} ({scores['lung_ml']:.0f} mL, truth "
                  f"{scores['truth_ml']:.0f} mL)   nodule accuracy {scores['nodule_accuracy']:.2f}  AUC "
                  f"{scores['nodule_auc']:.2f}")
        o = report["outputs"]
        print(f"\nlabel map {o['labels']}\noverlays {o['overlay']}, {o['agreement']}\ntraining curves "
              f"{o['curves']['lung']}, {o['curves']['nodule']}\nreport {args.out}/report.md "
              f"({report['seconds']['total']:.0f} s; {report['megabytes']:.0f} MB in {args.out})")
    return 0
