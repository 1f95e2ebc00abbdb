"""Held-out accuracy from predictions (c2srepro.models.evaluate)."""

import pandas as pd
import pytest

from c2srepro.models.evaluate import accuracy


def test_accuracy_is_the_share_of_correct_predictions():
    predictions = pd.DataFrame({"cell_id": list("abcd"), "label": ["B", "B", "NK", "T"], "predicted": ["B", "NK", "NK", "B"]})
    assert accuracy(predictions) == 0.5
    assert accuracy(predictions.iloc[:1]) == 1.0


def test_accuracy_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"lack columns \['predicted'\]: pass heldout_predictions\(\)'s table"):
        accuracy(pd.DataFrame({"label": ["B"]}))
    with pytest.raises(ValueError, match="accuracy of zero cells is undefined"):
        accuracy(pd.DataFrame({"label": [], "predicted": []}))
