"""``med3d pretrain``: Med3D multi-domain co-training of a shared encoder (also under torchrun)."""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from ..devices import DEVICE_CHOICES
from ..errors import Med3DError
from ..progress import PROGRESS_MODES, make_reporter


def _override(text: str) -> Dict[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value  # a bare string such as cosine
    return {key.strip(): parsed}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pretrain", help="co-train one encoder on several segmentation domains and export it",
        description="Med3D pretraining: a shared 3D-ResNet encoder and one 1x1x1 branch per domain, trained on the "
                    "domains of a run config (JSON or YAML). Writes checkpoints/last.pt while training, and at the "
                    "end encoder_bundle.pt (Med3D bundle) and medicalnet_resnet<depth>.pth (MedicalNet layout). "
                    "Run the same command under `torchrun --nproc_per_node=N` for several processes.")
    p.add_argument("--config", required=True, help="run config listing the domains (JSON or YAML)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, cache, exported encoder)")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT/encoder_bundle.pt and OUT/medicalnet_resnet<depth>.pth")
    p.add_argument("--device", default=None, help=f"{', '.join(DEVICE_CHOICES)} or cuda:N (default: the config's, "
                                                   "else auto)")
    p.add_argument("--progress", default="bar", choices=PROGRESS_MODES,
                   help="bar (terminal), jsonl (one JSON object per line on stdout) or none")
    p.add_argument("--cache", default=None, help="preprocessing cache folder (default OUT/cache)")
    p.add_argument("--no-cache", action="store_true", help="preprocess every patch's volume afresh (slow)")
    p.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="override a setting of the config's training section, e.g. --set steps=200 (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pretrain import pretrain

    if args.no_cache and args.cache:
        raise Med3DError("give either --cache or --no-cache, not both")
    overrides: Dict[str, Any] = {}
    for item in args.overrides:
        overrides.update(item)
    cache = None if args.no_cache else (args.cache or "default")
    pretrain(args.config, args.out, resume=args.resume, device=args.device, reporter=make_reporter(args.progress),
             cache_dir=cache, overrides=overrides, overwrite=args.overwrite)
    return 0
