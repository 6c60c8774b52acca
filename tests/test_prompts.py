import numpy as np
import pytest

from dit_jax.prompts import class_id, class_ids, class_label, imagenet_class_names


def test_imagenet_names_and_synonyms():
    assert len(imagenet_class_names()) == 1000
    assert class_id("golden retriever") == 207
    assert class_id("Golden Retriever") == 207
    assert class_id("goldfish") == 1 and class_id("Carassius auratus") == 1  # a synonym
    assert class_id("toilet paper") == 999
    assert class_label(207) == "golden retriever"


def test_ids_lists_and_digit_strings():
    np.testing.assert_array_equal(class_ids(["tench", 207, "88"]), [0, 207, 88])
    assert class_ids("tench").shape == (1,)
    with pytest.raises(ValueError, match=r"class id 1000 is out of range: this model has classes 0\.\.999"):
        class_id(1000)
    with pytest.raises(ValueError, match="class id -1 is out of range"):
        class_id("-1")  # a negative id given as text is an id, not a name
    with pytest.raises(ValueError, match="unknown class name '³'"):
        class_id("³")  # str.isdigit() says yes, int() says no


def test_unknown_name_lists_three_closest():
    with pytest.raises(ValueError, match=r"unknown class name 'golden retreiver'; closest valid names: 'golden retriever'"):
        class_id("golden retreiver")
    with pytest.raises(ValueError) as e:
        class_id("zzzz dragon")
    assert e.value.args[0].count("'") == 8  # the prompt and three suggestions, each quoted


def test_ambiguous_name_asks_for_an_id():
    with pytest.raises(ValueError, match=r"'crane' names several classes: 134 .*517 .*Pass the class id"):
        class_id("crane")


def test_checkpoint_class_names():
    names = ("T-shirt/top", "trouser", "sneaker")
    assert class_id("Sneaker", names) == 2
    with pytest.raises(ValueError, match="closest valid names: 'sneaker'"):
        class_id("sneakers", names)
    with pytest.raises(ValueError, match="out of range"):
        class_id(3, names)
