"""Builds ``synth_cxr`` and/or writes a contact sheet of its films.

python -m region_medclip.data.synth --out=DIR --num=N --size=PX --seed=S [--sheet=PNG]
"""

from absl import app, flags

from region_medclip.data.synth import builder
from region_medclip.data.synth.records import contact_sheet, render_record

flags.DEFINE_string("out", None, "TFDS data_dir to build synth_cxr into.")
flags.DEFINE_integer("num", builder.DEFAULT_NUM, "Number of films (all splits).")
flags.DEFINE_integer("size", 96, "Image size in pixels (the default config's).")
flags.DEFINE_integer("seed", 0, "Generator seed.")
flags.DEFINE_string("sheet", None, "Write a PNG contact sheet of 16 films here.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    """CLI: build the dataset into ``--out`` and/or write a contact sheet."""
    del argv
    if FLAGS.sheet:
        records = [render_record(i, size=FLAGS.size, seed=FLAGS.seed) for i in range(16)]
        contact_sheet(records, FLAGS.sheet)
        print(f"wrote {FLAGS.sheet}")
    if FLAGS.out:
        b = builder.ensure_built(FLAGS.out, size=FLAGS.size, num=FLAGS.num, seed=FLAGS.seed)
        print(f"built {b.info.full_name} in {FLAGS.out}: {dict(b.info.splits)}")


if __name__ == "__main__":
    app.run(main)
