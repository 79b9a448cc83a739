"""Text tokenizers with fixed-length output, following the text towers' conventions.

- ``clip_bpe``: OpenAI CLIP's byte-level BPE, built with HF ``tokenizers`` from the merges file
  that open_clip_torch ships (or a local copy): ``<start_of_text> ... <end_of_text>``, zero
  padding; an over-long text is cut and its last token replaced by ``<end_of_text>``, which is the
  highest id, so the CLIP tower pools at ``argmax``.
- ``hf``: any HF tokenizer in a local directory (BERT WordPiece etc.): ``[CLS] ... [SEP]``,
  padded with its pad id; truncation keeps ``[SEP]``.
- ``synth_bpe``: the offline default for ``synth_cxr``: a byte-level BPE trained on the
  synthetic report language; ``<end_of_text>`` is added last so it, too, is the highest id.
"""

import dataclasses
import functools
import gzip
import html
import os
from collections.abc import Callable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# CLIP's pre-tokenisation pattern (contractions, letter runs, single digits, other symbols).
_CLIP_PATTERN = (
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_CLIP_NUM_MERGES = 49152 - 256 - 2


@dataclasses.dataclass
class TextTokenizer:
    """A fixed-length tokenizer.

    Attributes:
      name: registry name.
      tokenizer: the HF ``tokenizers.Tokenizer`` doing the work (no specials added by it).
      vocab_size: number of ids (the text tower's ``vocab_size`` must be at least this).
      pad_id: padding id.
      bos_id, eos_id: ids placed around every text.
      eot: what the CLIP tower pools at: ``"argmax"`` or an id.
      clean_fn: text normalisation applied before encoding.
    """

    name: str
    tokenizer: tokenizers.Tokenizer
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    eot: str | int = "argmax"
    clean_fn: Callable[[str], str] = str  # module-level, so the tokenizer pickles to workers

    def __call__(self, texts: Sequence[str], length: int) -> np.ndarray:
        """Encodes ``texts`` to ``[len(texts), length]`` int32 ids (bos, tokens, eos, padding)."""
        return self.encode(texts, length)[0]

    def encode(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, int]:
        """``[len(texts), length]`` int32 ids as :meth:`__call__`, and how many of the texts
        were cut to fit ``length`` (their closing token kept), so a pipeline can count them."""
        out = np.full((len(texts), length), self.pad_id, np.int32)
        encodings = self.tokenizer.encode_batch([self.clean_fn(t) for t in texts])
        truncated = 0
        for row, encoding in enumerate(encodings):
            ids = [self.bos_id, *encoding.ids]
            truncated += len(ids) + 1 > length
            ids = ids[: length - 1] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out, truncated


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte → printable character table: printable bytes map to themselves, the
    rest to code points from 256 upwards, so byte-level BPE never sees whitespace or controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    # Order matters (it fixes the vocabulary ids): printable bytes first, then the others.
    others = [byte for byte in range(256) if byte not in printable]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + i) for i, byte in enumerate(others)})
    return table


def _clip_clean(text: str) -> str:
    try:  # CLIP repairs mojibake with ftfy; use it when it is installed, as open_clip does.
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def default_clip_bpe_path() -> str:
    """The CLIP merges file shipped inside the installed open_clip_torch package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "clip_bpe needs the CLIP merges file: install open_clip_torch (the [parity] extra) "
            "or set config.data.tokenizer_path to a local bpe_simple_vocab_16e6.txt.gz"
        )
    return os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=4)
def clip_bpe(path: str | None = None) -> TextTokenizer:
    """CLIP's BPE tokenizer from its merges file (``.txt`` or ``.txt.gz``)."""
    path = path or default_clip_bpe_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"CLIP merges file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : _CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<start_of_text>", "<end_of_text>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # As in CLIP, the special tokens' own text maps to their ids (never split into pieces).
    tok.add_special_tokens(["<start_of_text>", "<end_of_text>"])
    return TextTokenizer(
        name="clip_bpe",
        tokenizer=tok,
        vocab_size=len(vocab),
        pad_id=0,
        bos_id=vocab["<start_of_text>"],
        eos_id=vocab["<end_of_text>"],
        eot="argmax",
        clean_fn=_clip_clean,
    )


@functools.lru_cache(maxsize=4)
def hf(path: str) -> TextTokenizer:
    """An HF tokenizer saved in a local directory (``tokenizer.json``, or ``vocab.txt`` for a
    WordPiece/BERT vocabulary); specials come from its own ``[CLS]``/``[SEP]``/``[PAD]``."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"HF tokenizer directory not found: {path!r}")
    json_path, vocab_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "vocab.txt")
    if os.path.exists(json_path):
        tok = tokenizers.Tokenizer.from_file(json_path)
    elif os.path.exists(vocab_path):
        tok = tokenizers.BertWordPieceTokenizer(vocab_path, lowercase=True)._tokenizer
    else:
        raise FileNotFoundError(f"{path}: neither tokenizer.json nor vocab.txt")
    # Specials are added by TextTokenizer so truncation can keep the closing one.
    tok.no_truncation()
    tok.no_padding()
    tok.post_processor = None
    ids = {name: tok.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{path}: tokenizer has no {missing} token(s)")
    return TextTokenizer(
        name="hf",
        tokenizer=tok,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        pad_id=ids["[PAD]"],
        bos_id=ids["[CLS]"],
        eos_id=ids["[SEP]"],
        eot=ids["[SEP]"],
    )


@functools.lru_cache(maxsize=1)
def synth_bpe(vocab_size: int = 2048) -> TextTokenizer:
    """Byte-level BPE trained (deterministically, in about a second) on the synthetic report
    language; needs no files and no network."""
    from region_medclip.data.synth import text as synth_text

    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<start_of_text>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synth_text.corpus(), trainer=trainer)
    tok.add_special_tokens(["<end_of_text>"])  # last, so it is the highest id
    return TextTokenizer(
        name="synth_bpe",
        tokenizer=tok,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        pad_id=tok.token_to_id("<pad>"),
        bos_id=tok.token_to_id("<start_of_text>"),
        eos_id=tok.token_to_id("<end_of_text>"),
        eot="argmax",
    )


TOKENIZERS: dict[str, Callable[..., TextTokenizer]] = {
    "clip_bpe": lambda path: clip_bpe(path or None),
    "hf": hf,
    "synth_bpe": lambda path: synth_bpe(),
}


def from_config(data_config) -> TextTokenizer:
    """The tokenizer named by ``config.data.tokenizer`` (with ``config.data.tokenizer_path``)."""
    name = data_config.tokenizer
    if name not in TOKENIZERS:
        raise ValueError(f"config.data.tokenizer: {name!r} is not one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](data_config.get("tokenizer_path", ""))
