"""dit_jax.tokenizer: both back ends give transformers' T5 ids, truncation warns, errors are clear."""

import shutil
import sys

import numpy as np
import pytest
import transformers
from text_testing import train_spiece

from dit_jax.tokenizer import Tokenizer

PROMPTS = [
    "A photo of a cat",
    "  leading,   inner  and trailing   spaces  ",
    "Café naïve ＡＢＣ ½ über",  # NFKC folds the full-width letters and the fraction
    "",
    "zzzz qqq xyz 123 ~~ ∑",  # pieces never seen in training: <unk>
    "a <extra_id_0> b</s> c<pad><extra_id_12>",  # special tokens written in the text
    "tab\tnew\nline",
    "The quick brown fox jumps over the lazy dog near a wooden cabin in the snow at night",  # truncated
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"spm": a T5-like spiece.model only, "json": transformers' tokenizer.json of the same model}.

    The sentencepiece model is trained with T5's special ids: <pad> 0, </s> 1, <unk> 2, no BOS.
    transformers 5 converts it to a `tokenizers` Unigram (adding 100 <extra_id_N> sentinels) and
    saves that as tokenizer.json.
    """
    root = tmp_path_factory.mktemp("tokenizers")
    train_spiece(root / "spm")
    transformers.T5Tokenizer.from_pretrained(str(root / "spm")).save_pretrained(str(root / "json"))
    assert (root / "json" / "tokenizer.json").is_file() and not (root / "json" / "spiece.model").exists()
    return {"spm": root / "spm", "json": root / "json"}


@pytest.mark.parametrize("kind,backend", [("json", "tokenizers"), ("spm", "sentencepiece")])
def test_ids_and_masks_match_transformers(dirs, kind, backend):
    ours = Tokenizer.from_dir(dirs[kind])
    assert ours.backend == backend and (ours.pad_id, ours.eos_id) == (0, 1)
    theirs = transformers.T5Tokenizer.from_pretrained(str(dirs[kind]))
    for max_length in (12, 40):
        want = theirs(PROMPTS, padding="max_length", truncation=True, max_length=max_length)
        with pytest.warns(UserWarning):  # the long prompt is truncated at both lengths
            ids, mask = ours(PROMPTS, max_length=max_length)
        assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (len(PROMPTS), max_length)
        np.testing.assert_array_equal(ids, np.array(want["input_ids"]))
        np.testing.assert_array_equal(mask, np.array(want["attention_mask"]))
    # the special tokens in the text are single ids; a sentinel's id is counted from the end
    specials = ours.encode("a <extra_id_0> b</s> c<pad><extra_id_12>")
    assert specials[1] == 70 + 99 and specials[-2:] == [70 + 99 - 12, 1] and 0 in specials


def test_both_files_prefer_tokenizer_json(dirs, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(dirs["json"], both)
    shutil.copy(dirs["spm"] / "spiece.model", both)
    assert Tokenizer.from_dir(both).backend == "tokenizers"


def test_truncation_keeps_eos_and_warns(dirs):
    tok = Tokenizer.from_dir(dirs["spm"])
    long = "The quick brown fox jumps over the lazy dog near a wooden cabin in the snow at night"
    full = tok.encode(long)
    assert full[-1] == 1 and len(full) > 10
    with pytest.warns(UserWarning) as caught:
        ids, mask = tok([long, "a cat"], max_length=10)
    assert len(caught) == 1  # only the long prompt
    message = str(caught[0].message)
    assert message == (
        f"prompt 'The quick brown fox jumps over the lazy dog near a wooden...' is {len(full)} tokens long, "
        f"more than max_length 10: its last {len(full) - 10} tokens were dropped"
    )
    assert ids[0].tolist() == full[:9] + [1] and mask[0].tolist() == [1] * 10
    short = tok.encode("a cat")
    assert ids[1].tolist() == short + [0] * (10 - len(short)) and mask[1].sum() == len(short)
    # exactly max_length tokens: nothing dropped, no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, _ = tok(long, max_length=len(full))
    assert ids[0].tolist() == full


def test_missing_files_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has neither \(looked for tokenizer.json and spiece.model\)"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        Tokenizer.from_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("kind,package", [("json", "tokenizers"), ("spm", "sentencepiece")])
def test_missing_package_error(dirs, monkeypatch, kind, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(ImportError, match=rf"needs the `{package}` package: pip install 'dit-jax\[text\]'"):
        Tokenizer.from_dir(dirs[kind])


def test_bad_arguments(dirs):
    tok = Tokenizer.from_dir(dirs["spm"])
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        tok(["a"], max_length=0)
    with pytest.raises(TypeError, match="prompts must be strings, got 3 \\(int\\)"):
        tok(["a", 3], max_length=8)
