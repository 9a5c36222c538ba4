"""Save -> reload round trips across dtypes, read back with the tests' own
safetensors reader."""

import json
from pathlib import Path

import numpy as np
import pytest

import tensormerge as tm
from conftest import LAYOUT, read_safetensors


def test_save_reload_keeps_dtypes_and_values(models, tmp_path: Path):
    mapper = tm.ModelTensorMapper.open(models["base"])
    base = mapper.load(models["base"])
    doubled = 2.0 * base - 0.25  # exact in BF16/F16 for the test's values
    out = tmp_path / "out"
    assert mapper.save(doubled, str(out)) == str(out)

    original = read_safetensors(Path(models["base"]) / "model.safetensors")
    written = read_safetensors(out / "model.safetensors")
    assert list(written) == list(original)  # template order
    for name, _, dtype in LAYOUT:
        got_dtype, got = written[name]
        assert got_dtype == dtype, name
        expected = 2.0 * original[name][1].astype(np.float32) - 0.25
        np.testing.assert_array_equal(got, expected)
        assert got.shape == original[name][1].shape
    # non-float tensors and config copied from the template
    np.testing.assert_array_equal(written["position_ids"][1], np.arange(6))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["TinyForTests"]
    # and tensormerge reads back exactly the vector it wrote
    again = mapper.load(str(out))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(doubled))


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_round_trip_rounds_like_the_dtype(tmp_path: Path, dtype):
    from conftest import write_model, to_bf16_bits, from_bf16_bits

    rng = np.random.default_rng(3)
    values = rng.standard_normal((5, 7)).astype(np.float32)
    base = write_model(tmp_path / "m", [("w", values, dtype)])
    mapper = tm.ModelTensorMapper.open(base)
    v = mapper.load(base)
    # the stored values, decoded independently
    stored = read_safetensors(Path(base) / "model.safetensors")["w"][1].astype(np.float32)
    np.testing.assert_array_equal(v["w"], stored)
    third = v / 3.0
    out = tmp_path / "third"
    mapper.save(third, str(out))
    got_dtype, got = read_safetensors(out / "model.safetensors")["w"]
    assert got_dtype == dtype
    exact = np.asarray(third).reshape(5, 7)
    if dtype == "F32":
        expected = exact
    elif dtype == "F16":
        expected = exact.astype(np.float16).astype(np.float32)
    else:
        expected = from_bf16_bits(to_bf16_bits(exact))
    np.testing.assert_array_equal(got, expected)


def test_save_errors(models, tmp_path: Path):
    mapper = tm.ModelTensorMapper.open(models["base"])
    v = mapper.load(models["base"])
    out = tmp_path / "o"
    mapper.save(v, str(out))
    with pytest.raises(tm.TensormergeOSError) as e:
        mapper.save(v, str(out))
    assert isinstance(e.value, OSError)
    assert "already exists" in str(e.value)
    assert e.value.hint == "pass --overwrite to replace it" and e.value.exit_code == 2
    mapper.save(v * 0.0, str(out), overwrite=True)
    assert not np.any(np.asarray(mapper.load(str(out))))
    # a vector of another layout
    other = tm.ModelTensorMapper([("w", [3], "F32")]).zeros()
    with pytest.raises(tm.InvalidInputError, match="layouts differ at tensor"):
        mapper.save(other, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    # no template for a mapper built from a layout
    with pytest.raises(ValueError, match="pass `template`"):
        tm.ModelTensorMapper([("w", [3], "F32")]).save(other, str(tmp_path / "y"))


def test_open_errors(tmp_path: Path):
    with pytest.raises(tm.TensormergeError) as e:
        tm.ModelTensorMapper.open(str(tmp_path / "missing"))
    assert "cannot open model" in str(e.value)
    assert isinstance(e.value, ValueError)  # a missing model is bad input (exit code 1)
