"""``detkit data synth``, ``synth-cls``, ``synth-video``, ``tile``, ``check`` and ``convert``: making datasets
(synthetic detection images, classification crops, a video), cutting a dataset of large images into tiles,
summarising a dataset before training on it, and writing it in another layout (COCO, VOC, YOLO)."""
from __future__ import annotations

import os
import sys

from detkit.cli.common import _add_no_progress, _add_output, _add_set, _data_spec, _registries, dims, number


def cmd_synth(args) -> int:
    from detkit.config import ConfigError
    from detkit.data.synth import synthesize

    variant = args.variant
    if args.scene:  # a size-dependent layout of its own (detkit.data.synth.scene_variant)
        if args.variant != "default":
            raise ConfigError(f"--scene draws its own layout (objects of 24-64 px); it does not combine with "
                              f"--variant {args.variant}")
        h, w = args.scene
        variant = "scene"
    else:
        h, w = args.size
    try:
        synthesize(args.output, args.format, args.num_images, args.seed, image_size=(h, w), variant=variant,
                   overwrite=args.overwrite)
    except ValueError as exc:  # the arguments, named in the message
        raise ConfigError(str(exc)) from None
    print(f"wrote {args.num_images} images ({args.format}, variant {variant}) to {args.output}")
    return 0


def cmd_data_tile(args) -> int:
    from detkit.data.loading import build_dataset, check_image_files
    from detkit.data.tile import DEFAULT_MIN_VISIBILITY, TileSpec, tile_dataset

    visibility = DEFAULT_MIN_VISIBILITY if args.min_visibility is None else args.min_visibility
    tiling = TileSpec(args.size, args.overlap, visibility, args.keep_empty)  # the options first, before any reading
    spec = _dataset_argument(args.input, args, "--in")
    dataset = build_dataset(spec, _registries(), "--in")
    check_image_files(dataset, "--in")
    fmt = args.format or ("voc" if spec.get("name") == "voc" else "coco")
    done = tile_dataset(dataset, args.output, tiling, fmt=fmt, split=args.split, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print(f"wrote {done['tiles']} tiles of {args.size} px ({fmt}) from {done['images']} images to {args.output}: "
          f"{done['boxes']} boxes of {done['objects']} objects; {done['skipped_empty']} of {done['empty_tiles']} "
          f"tiles without objects left out (--keep-empty {args.keep_empty:g})")
    if done["lost"]:
        print(f"warning: {done['lost']} of the {done['objects']} objects are in no tile (less than "
              f"--min-visibility {visibility:g} of each inside any tile: larger than the tiles, or cut everywhere; "
              f"a larger --size or --overlap keeps them)", file=sys.stderr)
    return 0


def _dataset_argument(text: str, args, what: str) -> dict:
    """The dataset mapping ``text`` (``what``: the argument's name) stands for: a path a format recognises (its
    ``from_path``) or a mapping; ConfigError naming it and the forms it may take otherwise."""
    from detkit.config import ConfigError
    from detkit.data.loading import dataset_from_path, path_forms

    registry = _registries().datasets
    expected = f"{path_forms(registry)} or a mapping '{{name: coco, images: DIR, annotations: FILE}}'"
    if not text.lstrip().startswith("{"):
        if not os.path.exists(text):
            raise ConfigError(f"{what} {text}: no such file or folder; expected {expected}")
        if os.path.isdir(text) and dataset_from_path(text, registry, {}) is None:
            raise ConfigError(f"{what} {text}: a folder no dataset format recognises; expected {expected}")
    return _data_spec(text, args)


def _anchor_scale(args):
    """The anchors ``data check`` compares boxes with: ``--config``'s proposal generator's (None when it has no
    anchors), or the RPN's defaults; with the resize of that config's (or the default) transform."""
    from detkit.config import TransformConfig, load_config
    from detkit.data.check import AnchorScale
    from detkit.models.rpn import AnchorSettings
    from detkit.models.transform import DetectionTransform

    if args.config:
        cfg = load_config(args.config, args.overrides, _registries())
        part = getattr(cfg.model, "proposal_generator", None)
        anchors = getattr(getattr(part, "settings", None), "anchors", None)
        if anchors is None:
            print(f"note: {args.config}: model.proposal_generator ({getattr(part, 'name', None)}) has no anchors; "
                  f"box sizes are not compared with any", file=sys.stderr)
            return None
        sizes, transform = anchors.sizes, cfg.model.transform
        source = f"model.proposal_generator.anchors.sizes of {args.config}"
    else:
        sizes, transform = AnchorSettings().sizes, TransformConfig()
        source = "the rpn's default anchors.sizes; --config CONFIG compares with a config's"
    min_sizes = sorted([transform.min_size] if isinstance(transform.min_size, int) else transform.min_size)
    side = min_sizes[len(min_sizes) // 2]  # multi-scale training: the middle of the shorter sides drawn
    resize = DetectionTransform(side, transform.max_size, [0.0] * 3, [1.0] * 3, 1)
    words = ("the image's own size" if side <= 0 else
             f"shorter side {side}{' (the middle of ' + str(min_sizes) + ')' if len(min_sizes) > 1 else ''}, "
             f"longer at most {transform.max_size}")
    return AnchorScale(tuple(float(a) for a in sizes), source, lambda h, w: resize.scale_for(h, w, side), words)


def cmd_data_check(args) -> int:
    from detkit.data.check import format_summary, read_reporting, summarize
    from detkit.data.loading import build_dataset
    from detkit.data.media import check_output_dir
    from detkit.engine.files import write_json_atomic

    if args.json:
        check_output_dir(os.path.dirname(os.path.abspath(args.json)), "--json")
    anchors = _anchor_scale(args)  # a bad config is refused before the dataset is read
    spec = _dataset_argument(args.dataset, args, "DATASET")
    registries = _registries()
    dataset, warnings = read_reporting(lambda: build_dataset(spec, registries, "DATASET"))
    summary = {"format": spec.get("name"), **summarize(dataset, anchors, warnings)}
    print(format_summary(summary))
    if args.json:
        write_json_atomic(args.json, summary, indent=2)
        print(f"summary written to {args.json}")
    return 0


def cmd_data_convert(args) -> int:
    from detkit.data.convert import convert_dataset
    from detkit.data.loading import build_dataset, check_image_files

    spec = _dataset_argument(args.source, args, "SRC")
    dataset = build_dataset(spec, _registries(), "SRC")
    check_image_files(dataset, "SRC")
    inputs = [spec[key] for key in ("annotations", "data") if isinstance(spec.get(key), str)]
    done = convert_dataset(dataset, args.output, args.to, args.split, overwrite=args.overwrite, copy=args.copy,
                           inputs=inputs, comment=f"written by detkit data convert from {args.source}")
    how = ", ".join(f"{done[k]} {k}" for k in ("linked", "copied") if done[k])
    print(f"wrote {done['images']} images ({how}) and {done['boxes']} boxes to {args.output} as {args.to}"
          + (f" (split {done['split']})" if done["split"] else ""))
    if done["left_out"]:
        print(f"note: {done['left_out']} crowd regions or difficult objects left out: YOLO has no flag for them",
              file=sys.stderr)
    if done["rounded"]:
        print(f"note: {done['rounded']} boxes moved by up to half a pixel: VOC stores whole pixels", file=sys.stderr)
    if done["dropped"]:
        print(f"note: {done['dropped']} boxes without area once rounded to whole pixels or clipped to the image "
              f"left out", file=sys.stderr)
    if done["resized"]:
        print(f"note: {done['resized']} images are not the size their annotations give: their boxes are clipped to "
              f"the real size and normalised by it", file=sys.stderr)
    if args.to == "voc":
        print(f"read it with classes: [{', '.join(done['classes'])}] in the config, or --classes "
              f"{','.join(done['classes'])} (the VOC reader's default is the 20 VOC classes)")
    return 0


def cmd_synth_cls(args) -> int:
    from detkit.config import ConfigError
    from detkit.data.synth_cls import synthesize_classification

    try:
        summary = synthesize_classification(args.output, args.per_class, args.val_per_class, args.seed, args.size)
    except ValueError as exc:
        raise ConfigError(f"--output {args.output}: {exc}" if args.output in str(exc) else str(exc)) from None
    print(f"wrote {summary['images']['train']} training and {summary['images']['val']} validation crops of "
          f"{len(summary['classes'])} classes ({args.size}x{args.size}) to {args.output}/train and {args.output}/val")
    return 0


def cmd_synth_video(args) -> int:
    from detkit.data.synth import synthesize_video

    synthesize_video(args.output, args.frames, args.seed, fps=args.fps, size=args.size)
    print(f"wrote {args.frames} frames to {args.output}")
    return 0


def add_data_parser(sub) -> None:
    """``detkit data synth``, ``tile``, ``check``, ``convert``, ``synth-cls`` and ``synth-video``."""
    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND",
                            help="synth, tile, check, convert, synth-cls or synth-video")
    seed_help = "random seed: the same seed writes the same files (default 0)"
    ps = dsub.add_parser("synth", help="generate the built-in synthetic dataset")
    _add_output(ps, "output dataset folder (new or empty; see --overwrite)", required=True, old="--out")
    ps.add_argument("--format", choices=["coco", "voc"], default="coco", help="dataset layout to write (default coco)")
    ps.add_argument("--num-images", type=number(int, ge=1), default=200, help="how many images (default 200)")
    ps.add_argument("--seed", type=number(int, ge=0), default=0, help=seed_help)
    size = ps.add_mutually_exclusive_group()
    size.add_argument("--size", type=dims(2, "x", ge=32, example="240x320"), default="240x320", metavar="HEIGHTxWIDTH",
                      help="image size, each side at least 32 (default 240x320)")
    size.add_argument("--scene", type=dims(2, "x", ge=64, example="4000x4000"), metavar="HEIGHTxWIDTH",
                      help="large scenes of this size (e.g. 4000x4000; at least 64x64) for tiled inference: objects "
                           "of 24-64 px, as many per area as the default images have (about 700 in 4000x4000), on "
                           "the same background; use a few (--num-images 3): each 4000x4000 takes about 2 s and "
                           "33 MB of PNG")
    # The names of detkit.data.synth.VARIANTS, listed here because importing it would import torch (detkit.data)
    # for every command; tests/data/test_synth.py checks that the two agree.
    ps.add_argument("--variant", choices=["default", "small"], default="default",
                    help="small: 15-40 objects per image, nearly all COCO-small (for FPN vs single-map detectors)")
    ps.add_argument("--overwrite", action="store_true",
                    help="replace the dataset an earlier call wrote in --output (default: --output must be new or empty)")
    ps.set_defaults(func=cmd_synth)
    ps = dsub.add_parser("tile", help="cut a dataset of large images into a dataset of overlapping tiles at native "
                                      "resolution, to train (or evaluate) on them")
    ps.add_argument("--in", dest="input", required=True, metavar="DATASET",
                    help="COCO json (images in images/ beside it, or --images), VOC directory (with Annotations/; "
                         "--split, --classes) or a mapping '{name: coco, images: DIR, annotations: FILE}'")
    ps.add_argument("--images", help="images directory for a COCO json given with --in")
    ps.add_argument("--split", default="trainval", help="VOC split to read, and to write for a VOC output")
    ps.add_argument("--classes", help="comma-separated class list for a VOC directory (default: the 20 VOC classes)")
    _add_output(ps, "output dataset folder (new or empty; see --overwrite)", required=True, old="--out")
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
    ps.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    _add_no_progress(ps)
    ps.set_defaults(func=cmd_data_tile)
    dataset_forms = ("a COCO json (images in images/ beside it, or --images), a VOC directory (with Annotations/; "
                     "--split, --classes), a YOLO data.yaml (--split) or a mapping '{name: coco, images: DIR, "
                     "annotations: FILE}'")
    ps = dsub.add_parser("check", help="summarise a dataset before training on it: images, boxes per class, box "
                                       "sizes against the anchors, and the problems found (exit 2 when it cannot "
                                       "be read)")
    ps.add_argument("dataset", metavar="DATASET", help=dataset_forms)
    ps.add_argument("--images", help="images directory for a COCO json")
    ps.add_argument("--split", help="split to read: a VOC split file (default trainval) or a YOLO data.yaml key "
                                    "(default train)")
    ps.add_argument("--classes", help="comma-separated class list for a VOC directory (default: the 20 VOC classes)")
    ps.add_argument("--config", help="compare box sizes with this config's anchors and input size (default: the "
                                     "RPN's default anchors, 128, 256, 512 px, at a 600 px shorter side)")
    _add_set(ps)
    ps.add_argument("--json", metavar="FILE", help="also write the summary to FILE as JSON")
    ps.set_defaults(func=cmd_data_check)
    ps = dsub.add_parser("convert", help="write a dataset in another layout (COCO, VOC or YOLO); images are "
                                         "hard-linked where possible, else copied")
    ps.add_argument("source", metavar="SRC", help=dataset_forms)
    ps.add_argument("--to", required=True, choices=["coco", "voc", "yolo"], help="layout to write")
    _add_output(ps, "output dataset folder (new or empty; see --overwrite)", required=True, old="--out")
    ps.add_argument("--split", help="split to read (a VOC split file, default trainval; a YOLO data.yaml key, "
                                    "default train) and to write (VOC's ImageSets/Main/NAME.txt, YOLO's "
                                    "images/NAME/; default trainval for VOC, train for YOLO)")
    ps.add_argument("--images", help="images directory for a COCO json given as SRC")
    ps.add_argument("--classes", help="comma-separated class list for a VOC directory (default: the 20 VOC classes)")
    ps.add_argument("--copy", action="store_true", help="copy the images (default: hard links where the file "
                                                        "system allows, which take no space)")
    ps.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    ps.set_defaults(func=cmd_data_convert)
    ps = dsub.add_parser("synth-cls", help="generate the built-in classification crops (class folders train/, val/)")
    _add_output(ps, "output folder (train/ and val/ class folders are written in it)", required=True, old="--out")
    ps.add_argument("--per-class", type=number(int, ge=1), default=2000, help="training images per class")
    ps.add_argument("--val-per-class", type=number(int, ge=0), default=100, help="validation images per class (0: no val/)")
    ps.add_argument("--seed", type=number(int, ge=0), default=0, help=seed_help)
    ps.add_argument("--size", type=number(int, ge=16), default=64, help="side of the square crops in pixels")
    ps.set_defaults(func=cmd_synth_cls)
    ps = dsub.add_parser("synth-video", help="generate a synthetic video of the built-in classes")
    _add_output(ps, "the video file to write (.mp4)", required=True, old="--out")
    ps.add_argument("--frames", type=number(int, ge=1), default=48, help="how many frames (default 48)")
    ps.add_argument("--fps", type=number(int, ge=1), default=12, help="frames per second (default 12)")
    ps.add_argument("--seed", type=number(int, ge=0), default=0, help=seed_help)
    ps.add_argument("--size", type=dims(2, "x", ge=32, example="240x320"), default="240x320", metavar="HEIGHTxWIDTH",
                    help="frame size, each side at least 32 (default 240x320)")
    ps.set_defaults(func=cmd_synth_video)
