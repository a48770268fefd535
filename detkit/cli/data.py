"""``detkit data synth``, ``synth-cls``, ``synth-video`` and ``tile``: making datasets (synthetic detection
images, classification crops, a video) and cutting a dataset of large images into tiles."""
from __future__ import annotations

import argparse
import os
import sys

from detkit.cli.common import _data_spec, _registries, number


def cmd_synth(args) -> int:
    from detkit.config import ConfigError
    from detkit.data.synth import synthesize

    variant = args.variant
    if args.scene:  # a size-dependent layout of its own (detkit.data.synth.scene_variant)
        if args.variant != "default":
            raise ConfigError(f"--scene draws its own layout (objects of 24-64 px); it does not combine with "
                              f"--variant {args.variant}")
        try:
            h, w = _size(args.scene)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"--scene {args.scene!r}: expected HEIGHTxWIDTH, e.g. 4000x4000") from None
        variant = "scene"
    else:
        h, w = _size(args.size)
    try:
        synthesize(args.out, args.format, args.num_images, args.seed, image_size=(h, w), variant=variant,
                   overwrite=args.overwrite)
    except ValueError as exc:  # the arguments, named in the message
        raise ConfigError(str(exc)) from None
    print(f"wrote {args.num_images} images ({args.format}, variant {variant}) to {args.out}")
    return 0


def cmd_data_tile(args) -> int:
    from detkit.config import ConfigError
    from detkit.data.loading import build_dataset, check_image_files, dataset_from_path, path_forms
    from detkit.data.tile import DEFAULT_MIN_VISIBILITY, TileSpec, tile_dataset

    visibility = DEFAULT_MIN_VISIBILITY if args.min_visibility is None else args.min_visibility
    tiling = TileSpec(args.size, args.overlap, visibility, args.keep_empty)  # the options first, before any reading
    registry = _registries().datasets
    expected = f"{path_forms(registry)} or a mapping '{{name: coco, images: DIR, annotations: FILE}}'"
    if not args.input.lstrip().startswith("{"):
        if not os.path.exists(args.input):
            raise ConfigError(f"--in {args.input}: no such file or folder; expected {expected}")
        if os.path.isdir(args.input) and dataset_from_path(args.input, registry, {}) is None:
            raise ConfigError(f"--in {args.input}: a folder no dataset format recognises; expected {expected}")
    spec = _data_spec(args.input, args)
    dataset = build_dataset(spec, _registries(), "--in")
    check_image_files(dataset, "--in")
    fmt = args.format or ("voc" if spec.get("name") == "voc" else "coco")
    done = tile_dataset(dataset, args.out, tiling, fmt=fmt, split=args.split, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print(f"wrote {done['tiles']} tiles of {args.size} px ({fmt}) from {done['images']} images to {args.out}: "
          f"{done['boxes']} boxes of {done['objects']} objects; {done['skipped_empty']} of {done['empty_tiles']} "
          f"tiles without objects left out (--keep-empty {args.keep_empty:g})")
    if done["lost"]:
        print(f"warning: {done['lost']} of the {done['objects']} objects are in no tile (less than "
              f"--min-visibility {visibility:g} of each inside any tile: larger than the tiles, or cut everywhere; "
              f"a larger --size or --overlap keeps them)", file=sys.stderr)
    return 0


def cmd_synth_cls(args) -> int:
    from detkit.config import ConfigError
    from detkit.data.synth_cls import synthesize_classification

    try:
        summary = synthesize_classification(args.out, args.per_class, args.val_per_class, args.seed, args.size)
    except ValueError as exc:
        raise ConfigError(f"--out {args.out}: {exc}" if args.out in str(exc) else str(exc)) from None
    print(f"wrote {summary['images']['train']} training and {summary['images']['val']} validation crops of "
          f"{len(summary['classes'])} classes ({args.size}x{args.size}) to {args.out}/train and {args.out}/val")
    return 0


def cmd_synth_video(args) -> int:
    from detkit.data.synth import synthesize_video

    h, w = _size(args.size)
    synthesize_video(args.out, args.frames, args.seed, fps=args.fps, size=(h, w))
    print(f"wrote {args.frames} frames to {args.out}")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 240x320") from None
    return h, w


def add_data_parser(sub) -> None:
    """``detkit data synth``, ``tile``, ``synth-cls`` and ``synth-video``."""
    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    ps = dsub.add_parser("synth", help="generate the built-in synthetic dataset")
    ps.add_argument("--out", required=True)
    ps.add_argument("--format", choices=["coco", "voc"], default="coco")
    ps.add_argument("--num-images", type=number(int, ge=1), default=200)
    ps.add_argument("--seed", type=number(int, ge=0), default=0)
    size = ps.add_mutually_exclusive_group()
    size.add_argument("--size", default="240x320", help="HEIGHTxWIDTH")
    size.add_argument("--scene", metavar="HEIGHTxWIDTH",
                      help="large scenes of this size (e.g. 4000x4000; at least 64x64) for tiled inference: objects "
                           "of 24-64 px, as many per area as the default images have (about 700 in 4000x4000), on "
                           "the same background; use a few (--num-images 3): each 4000x4000 takes about 2 s and "
                           "33 MB of PNG")
    # The names of detkit.data.synth.VARIANTS, listed here because importing it would import torch (detkit.data)
    # for every command; tests/data/test_synth.py checks that the two agree.
    ps.add_argument("--variant", choices=["default", "small"], default="default",
                    help="small: 15-40 objects per image, nearly all COCO-small (for FPN vs single-map detectors)")
    ps.add_argument("--overwrite", action="store_true",
                    help="replace the dataset an earlier call wrote in --out (default: --out must be new or empty)")
    ps.set_defaults(func=cmd_synth)
    ps = dsub.add_parser("tile", help="cut a dataset of large images into a dataset of overlapping tiles at native "
                                      "resolution, to train (or evaluate) on them")
    ps.add_argument("--in", dest="input", required=True, metavar="DATASET",
                    help="COCO json (images in images/ beside it, or --images), VOC directory (with Annotations/; "
                         "--split, --classes) or a mapping '{name: coco, images: DIR, annotations: FILE}'")
    ps.add_argument("--images", help="images directory for a COCO json given with --in")
    ps.add_argument("--split", default="trainval", help="VOC split to read, and to write for a VOC output")
    ps.add_argument("--classes", help="comma-separated class list for a VOC directory (default: the 20 VOC classes)")
    ps.add_argument("--out", required=True, help="output dataset folder (new or empty; see --overwrite)")
    ps.add_argument("--size", type=number(int, ge=32), default=512, help="tile side in pixels, at least 32 (default: 512)")
    ps.add_argument("--overlap", type=number(ge=0, lt=1), default=0.2,
                    help="fraction of a tile that neighbouring tiles share, in [0, 1) (default: 0.2)")
    ps.add_argument("--min-visibility", type=number(gt=0, le=1),
                    help="a tile keeps a box when at least this fraction of its area is inside it, in (0, 1] "
                         "(default: 0.5: half an object is still recognisable; a smaller piece lies whole in a "
                         "neighbour when the overlap is at least its size)")
    ps.add_argument("--keep-empty", type=number(ge=0, le=1), nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                    help="keep this fraction of the tiles without objects (alone: all of them; default: none, as "
                         "training skips images without objects and every kept tile has background around its "
                         "objects; keep them to evaluate on tiles)")
    ps.add_argument("--format", choices=["coco", "voc"], help="output format (default: the input's)")
    ps.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ps.add_argument("--no-progress", action="store_true")
    ps.set_defaults(func=cmd_data_tile)
    ps = dsub.add_parser("synth-cls", help="generate the built-in classification crops (class folders train/, val/)")
    ps.add_argument("--out", required=True)
    ps.add_argument("--per-class", type=number(int, ge=1), default=2000, help="training images per class")
    ps.add_argument("--val-per-class", type=number(int, ge=0), default=100, help="validation images per class (0: no val/)")
    ps.add_argument("--seed", type=number(int, ge=0), default=0)
    ps.add_argument("--size", type=number(int, ge=16), default=64, help="side of the square crops in pixels")
    ps.set_defaults(func=cmd_synth_cls)
    ps = dsub.add_parser("synth-video", help="generate a synthetic video of the built-in classes")
    ps.add_argument("--out", required=True)
    ps.add_argument("--frames", type=number(int, ge=1), default=48)
    ps.add_argument("--fps", type=number(int, ge=1), default=12)
    ps.add_argument("--seed", type=number(int, ge=0), default=0)
    ps.add_argument("--size", default="240x320", help="HEIGHTxWIDTH")
    ps.set_defaults(func=cmd_synth_video)
