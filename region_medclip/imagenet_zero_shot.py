"""CLIP's ImageNet zero-shot protocol, to check an imported CLIP against its published numbers.

    python -m region_medclip.imagenet_zero_shot --model=DIR --images=DIR [--out=JSON]
    python -m region_medclip.imagenet_zero_shot --model=DIR --tfds=DATASET_DIR [--split=test]

``--model`` is a ``convert`` output (or a workdir). Each class's weight is the renormalised mean of
its name in every prompt template (CLIP's prompt ensembling; by default open_clip's copy of
CLIP's 1000 ImageNet class names and 80 templates, read from the installed ``open_clip_torch``
package, or ``--classnames=FILE`` / ``--templates=FILE`` with one entry a line and ``{}`` for the
name). Images get CLIP's evaluation transform: bicubic resize of the short side, centre crop, RGB,
CLIP normalisation. Reported: top-1 and top-5 accuracy in percent.

Images come from a folder with one subfolder a class (ImageNetV2's layout: subfolders ``0`` to
``999`` are class indices; otherwise sorted subfolder names, e.g. WordNet ids, give the indices)
or from a prepared TFDS dataset in array_record format with ``image`` and ``label`` features
(``--tfds`` is its version directory, read without TensorFlow). Nothing is downloaded. A file that
is not a readable image is skipped, counted and listed in the output.
"""

import json

from absl import app, flags


def _define_flags() -> None:
    # Defined only when run as a program: tests import this module beside other CLIs.
    flags.DEFINE_string("model", None, "A convert output or workdir.")
    flags.DEFINE_string("images", None, "Image folder: one subfolder a class.")
    flags.DEFINE_string("tfds", None, "A prepared TFDS dataset directory (array_record).")
    flags.DEFINE_string("split", "test", "TFDS split.")
    flags.DEFINE_string("classnames", None, "File with one class name a line (default: CLIP's).")
    flags.DEFINE_string("templates", None, "File with one template a line, {} for the name.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
    flags.DEFINE_integer("max_images", 0, "Evaluate at most this many images (0: all).")
    flags.DEFINE_string("out", None, "Write the result JSON here too.")


def main(argv):
    del argv
    import region_medclip
    from region_medclip.evaluators import imagenet

    args = flags.FLAGS
    result = imagenet.run(
        region_medclip.load(args.model),
        images=args.images,
        tfds_dir=args.tfds,
        split=args.split,
        classnames=args.classnames,
        templates=args.templates,
        batch_size=args.batch_size,
        max_images=args.max_images,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["model"])
    app.run(main)
