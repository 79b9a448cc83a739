"""Imports pretrained weights from local files:
``python -m region_medclip.convert --format=hf_clip --src=DIR --out=DIR``,
``--format=open_clip --src=FILE.pt --model_config=ViT-B-16 --out=DIR`` (BiomedCLIP:
``--model_config=open_clip_config.json --hf_text_dir=BiomedBERT_DIR``), or
``--format=hf_bert --src=DIR --out=DIR [--pool=cls|mean]``.

The output is a checkpoint directory of this project (params + the config that builds the model).
A CLIP conversion holds a whole model: ``config.model.init_from``, ``config.teacher.init_from``
and ``region_medclip.load`` accept it. A BERT conversion holds a text tower only (and its
tokenizer): ``config.model.init_from`` takes it, the other towers keeping their random init
(``region_medclip.config.init_text_from`` sets the text tower and tokenizer to match). Nothing is
downloaded: ``--src`` is a directory with ``config.json`` and ``model.safetensors`` (or
``pytorch_model.bin``), e.g. what ``save_pretrained`` writes.
"""

from absl import app, flags

from region_medclip.weights.convert import FORMATS


def _define_flags() -> None:
    # Defined only when run as a program: tests import this module beside other CLIs.
    flags.DEFINE_enum("format", None, list(FORMATS), "Checkpoint format of --src.")
    flags.DEFINE_string("src", None, "Checkpoint directory or file.")
    flags.DEFINE_string("out", None, "Output directory (a checkpoint of this project).")
    flags.DEFINE_string(
        "model_config", None, "open_clip: its model-config JSON, or a model name (e.g. ViT-B-16)."
    )
    flags.DEFINE_string(
        "hf_text_dir", None, "open_clip with an HF text tower: its config.json + tokenizer dir."
    )
    flags.DEFINE_enum("pool", "cls", ["cls", "mean"], "hf_bert: how the text tower pools tokens.")


def main(argv):
    del argv
    from region_medclip.weights import convert

    args = flags.FLAGS
    if args.format == "hf_clip":
        convert.convert_hf_clip(args.src, args.out)
    elif args.format == "hf_bert":
        convert.convert_hf_bert(args.src, args.out, args.pool)
    else:
        if not args.model_config:
            raise app.UsageError("--format=open_clip needs --model_config (JSON path or name)")
        convert.convert_open_clip(args.src, args.out, args.model_config, args.hf_text_dir)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["format", "src", "out"])
    app.run(main)
