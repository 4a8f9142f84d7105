"""bench/gram_from_input.py: the accuracy rows compare only layers that were really derived,
against the float64 reference (the timings and plans themselves are bench output)."""

from bench.gram_from_input import accuracy, candidates
from tests.test_input_gram import _batches, _model


def test_accuracy_reads_the_derived_layers_against_the_reference():
    model = _model(stride=2)
    assert candidates(model) == ["conv"]
    few = accuracy(model, _batches(1, n=1, side=4))  # below break-even: nothing derived
    assert few["derived"] == 0 and few["candidates"] == 1
    result = accuracy(model, _batches(3))
    assert result["derived"] == 1
    assert 0 < result["gram_derived"] < 1e-5 and 0 < result["gram_direct"] < 1e-5
    assert result["corr_derived"] < 1e-4 and result["corr_direct"] < 1e-4
