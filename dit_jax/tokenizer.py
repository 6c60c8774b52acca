"""T5's tokenizer for text prompts, from a checkpoint's tokenizer directory.

    tokenizer = Tokenizer.from_dir("PixArt-XL-2-1024-MS/tokenizer")
    input_ids, attention_mask = tokenizer(["a cat on a sofa"], max_length=120)   # int32 (1, 120) each

Gives the ids transformers' T5 tokenizer gives with padding="max_length", truncation=True: the
prompt's pieces, then EOS (</s>, id 1), then padding (<pad>, id 0). Two back ends, chosen by the
files present: `tokenizer.json` through the `tokenizers` package, else `spiece.model` through
`sentencepiece` (T5's own model file, with the special tokens transformers adds: <pad>, </s>,
<unk> and the <extra_id_N> sentinels, split out of the text). Both are optional dependencies:
pip install 'dit-jax[text]'.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "spiece.model"
_INSTALL = "pip install 'dit-jax[text]'"


class Tokenizer:
    """Prompts -> padded, truncated T5 token ids and attention masks. Build with `from_dir`."""

    def __init__(self, encode, *, pad_id: int, eos_id: int, backend: str, source: str):
        self._encode = encode  # str -> (pieces without EOS: list[int])
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.backend = backend  # "tokenizers" or "sentencepiece"
        self.source = source

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint's tokenizer directory: tokenizer.json if present, else spiece.model."""
        path = Path(path)
        if (path / TOKENIZER_JSON).is_file():
            return cls._from_tokenizer_json(path / TOKENIZER_JSON)
        if (path / SENTENCEPIECE_MODEL).is_file():
            return cls._from_sentencepiece(path / SENTENCEPIECE_MODEL)
        where = f"{path} is not a directory" if not path.is_dir() else f"{path} has neither"
        raise FileNotFoundError(f"no tokenizer: {where} (looked for {TOKENIZER_JSON} and {SENTENCEPIECE_MODEL})")

    @classmethod
    def _from_tokenizer_json(cls, file: Path) -> Tokenizer:
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f"reading {file} needs the `tokenizers` package: {_INSTALL}") from e
        tok = tokenizers.Tokenizer.from_file(str(file))
        tok.no_truncation()  # truncation and padding are done here, the way transformers does them
        tok.no_padding()
        eos_id = _token_id(tok.token_to_id, "</s>", 1)

        def encode(text: str) -> list[int]:
            # The post-processor is what appends </s>; keep it only to check that it does.
            ids = tok.encode(text, add_special_tokens=True).ids
            if not ids or ids[-1] != eos_id:
                raise ValueError(f"{file}: this tokenizer does not end sequences with </s> (id {eos_id}): not T5's")
            return ids[:-1]

        return cls(encode, pad_id=_token_id(tok.token_to_id, "<pad>", 0), eos_id=eos_id,
                   backend="tokenizers", source=str(file))

    @classmethod
    def _from_sentencepiece(cls, file: Path) -> Tokenizer:
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"reading {file} needs the `sentencepiece` package: {_INSTALL}") from e
        sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        special = _special_tokens(sp, file.parent)
        # Longest first, so that <extra_id_10> is not read as <extra_id_1> followed by "0>".
        splitter = re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")

        def encode(text: str) -> list[int]:
            ids: list[int] = []
            for i, chunk in enumerate(splitter.split(text)):
                ids += [special[chunk]] if i % 2 else sp.encode(chunk)  # odd chunks are the separators
            return ids

        return cls(encode, pad_id=special["<pad>"], eos_id=special["</s>"], backend="sentencepiece", source=str(file))

    def encode(self, prompt: str) -> list[int]:
        """All of a prompt's ids, EOS included, untruncated."""
        return self._encode(prompt) + [self.eos_id]

    def __call__(self, prompts: str | Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """prompts (B,) -> (input_ids, attention_mask), both int32 (B, max_length).

        A prompt longer than max_length tokens keeps its first max_length - 1 pieces and its EOS
        (transformers' truncation=True), with a warning naming it.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for </s>), got {max_length}")
        input_ids = np.full((len(prompts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), max_length), np.int32)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {prompt!r} ({type(prompt).__name__})")
            ids = self.encode(prompt)
            if len(ids) > max_length:
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(
                    f"prompt {short!r} is {len(ids)} tokens long, more than max_length {max_length}: "
                    f"its last {len(ids) - max_length} tokens were dropped",
                    stacklevel=2,
                )
                ids = ids[: max_length - 1] + [self.eos_id]
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return input_ids, mask

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, backend={self.backend!r})"


def _token_id(lookup, token: str, default: int) -> int:
    found = lookup(token)
    return default if found is None else int(found)


def _special_tokens(sp, directory: Path) -> dict[str, int]:
    """The ids transformers' T5 tokenizer gives its special tokens on top of spiece.model: <pad>,
    </s>, <unk> from the model, then `extra_ids` sentinels after its pieces, <extra_id_0> last."""
    config: dict = {}
    if (directory / "tokenizer_config.json").is_file():
        config = json.loads((directory / "tokenizer_config.json").read_text())
    extra_ids = int(config.get("extra_ids", 100))
    size = sp.get_piece_size()
    special = {f"<extra_id_{n}>": size + extra_ids - 1 - n for n in range(extra_ids)}
    for name, piece_id in (("<pad>", sp.pad_id()), ("</s>", sp.eos_id()), ("<unk>", sp.unk_id())):
        if piece_id < 0:
            raise ValueError(f"{directory / SENTENCEPIECE_MODEL} defines no {name}: not a T5 sentencepiece model")
        special[name] = piece_id
    if (directory / "added_tokens.json").is_file():  # older checkpoints list the sentinels' ids here
        special.update({k: int(v) for k, v in json.loads((directory / "added_tokens.json").read_text()).items()})
    return special
