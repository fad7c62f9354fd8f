"""`python -m beton_builders SOURCE [SRC] OUT_DIR`: write train/val betons and a manifest.

    python -m beton_builders digits data/digits
    python -m beton_builders cifar10 ~/cifar-10-batches-py data/cifar10
    python -m beton_builders cifar100 ~/cifar-100-python data/cifar100
    python -m beton_builders imagefolder ~/imagenet data/imagenet --max-resolution 512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from beton_builders import BUILDER_VERSION
from beton_builders.cifar import build_cifar
from beton_builders.digits import build_digits
from beton_builders.imagefolder import PhotoOptions, build_imagefolder, default_workers
from beton_builders.writing import finish_manifest, print_summary, staged_output
from fasttt.betons import MANIFEST, PHOTO_OPTIONS, read_manifest
from fasttt.errors import OneLineParser, UserError, exit_on_user_error

SOURCES = ("digits", "cifar10", "cifar100", "imagefolder")
USAGE = "python -m beton_builders {digits OUT_DIR | cifar10|cifar100|imagefolder SRC OUT_DIR}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; the source decides whether SRC is expected."""
    parser = OneLineParser(prog="python -m beton_builders", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           usage_line=USAGE)
    parser.add_argument("source", help=f"one of {', '.join(SOURCES)}")
    parser.add_argument("paths", nargs="+", metavar="[SRC] OUT_DIR")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR is built")
    parser.add_argument("--num-workers", type=int, default=default_workers(),
                        help="imagefolder only; fixed-size sources use one writer so "
                        "their bytes are reproducible")
    defaults = PhotoOptions()
    photo = parser.add_argument_group("imagefolder only")
    photo.add_argument("--max-resolution", type=int, help=f"default {defaults.max_resolution}")
    photo.add_argument("--jpeg-quality", type=int, help=f"default {defaults.jpeg_quality}")
    photo.add_argument("--write-mode", choices=("raw", "jpg", "proportion"),
                       help=f"default {defaults.write_mode}")
    photo.add_argument("--compress-probability", type=float,
                       help=f"default {defaults.compress_probability}")
    args = parser.parse_args(argv)
    given = [f"--{f.replace('_', '-')}" for f in PHOTO_OPTIONS if getattr(args, f) is not None]
    if given and args.source != "imagefolder":
        raise UserError(f"{', '.join(given)} only apply to imagefolder, not {args.source}")
    for name in PHOTO_OPTIONS:
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))
    if args.source not in SOURCES:
        raise UserError(f"unknown source {args.source!r}: choose one of {', '.join(SOURCES)}")
    wanted = 1 if args.source == "digits" else 2
    if len(args.paths) != wanted:
        raise UserError(f"{args.source} takes {'OUT_DIR' if wanted == 1 else 'SRC OUT_DIR'}, "
                        f"got {len(args.paths)} path(s) (usage: {USAGE})")
    if not 1 <= args.jpeg_quality <= 100 or args.max_resolution < 8 or args.num_workers < 1:
        raise UserError("--jpeg-quality must be 1..100, --max-resolution >= 8, --num-workers >= 1")
    if not 0.0 <= args.compress_probability <= 1.0:
        raise UserError("--compress-probability must be within 0..1")
    return args


def build(args: argparse.Namespace, staging: Path) -> tuple[dict, dict]:
    """Run the builder of `args.source` into `staging`."""
    if args.source == "digits":
        return build_digits(staging)
    src = Path(args.paths[0]).expanduser()
    if args.source == "imagefolder":
        options = PhotoOptions(args.max_resolution, args.jpeg_quality, args.write_mode,
                               args.compress_probability)
        return build_imagefolder(staging, src, options, args.num_workers)
    return build_cifar(staging, src, args.source)


def existing_build(args: argparse.Namespace, out_dir: Path) -> dict | None:
    """The manifest of a finished build of the same request in `out_dir`, else None.

    A finished build of something else there is an error rather than a silent success.
    """
    if args.force or not (out_dir / MANIFEST).is_file():
        return None
    manifest = read_manifest(out_dir)
    source = manifest["source"]
    same = (source["name"] == args.source
            and manifest.get("builder_version") == BUILDER_VERSION
            and (args.source == "digits"
                 or source.get("path") == str(Path(args.paths[0]).expanduser().resolve())))
    if args.source == "imagefolder" and same:
        wanted = PhotoOptions(args.max_resolution, args.jpeg_quality, args.write_mode,
                              args.compress_probability)
        same = all(manifest["image_policy"].get(k) == v for k, v in vars(wanted).items())
    if not same:
        raise UserError(f"{out_dir} holds another build ({source['name']} "
                        f"{source.get('path', '')}, builder v{manifest.get('builder_version')}):"
                        " choose another OUT_DIR or pass --force to replace it")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Build (or, when already built, just summarise) one beton directory."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = Path(args.paths[-1]).expanduser()
    manifest = existing_build(args, out_dir)
    if manifest is None:
        with staged_output(out_dir) as staging:
            manifest = finish_manifest(staging, *build(args, staging))
    else:
        print(f"{out_dir} is already built (use --force to rebuild)", file=sys.stderr)
    print_summary(out_dir, manifest)


if __name__ == "__main__":
    exit_on_user_error(main)
