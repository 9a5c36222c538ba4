"""ParamVector: arithmetic against numpy, zero-copy views, errors."""

import numpy as np
import pytest

import tensormerge as tm


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def assert_bitwise(actual, expected) -> None:
    np.testing.assert_array_equal(bits(actual), bits(expected))


@pytest.fixture
def vecs(models):
    mapper = tm.ModelTensorMapper.open(models["base"])
    return mapper, [mapper.load(models[m]) for m in ("base", "legal", "recipe")]


def test_arithmetic_equals_numpy_bit_for_bit(vecs):
    mapper, (base, legal, recipe) = vecs
    b, l, r = (np.array(v) for v in (base, legal, recipe))
    assert_bitwise(legal + recipe, l + r)
    assert_bitwise(legal - base, l - b)
    assert_bitwise(legal * recipe, l * r)
    assert_bitwise(legal / (recipe + 3.0), l / (r + np.float32(3.0)))
    assert_bitwise(-legal, -l)
    # scalars on both sides (float32 arithmetic, as numpy does it for float32 arrays)
    assert_bitwise(0.5 * legal, np.float32(0.5) * l)
    assert_bitwise(legal * 0.5, l * np.float32(0.5))
    assert_bitwise(legal + 2, l + np.float32(2))
    assert_bitwise(2 + legal, np.float32(2) + l)
    assert_bitwise(1.0 - legal, np.float32(1.0) - l)
    assert_bitwise(legal - 1.0, l - np.float32(1.0))
    assert_bitwise(legal / 4.0, l / np.float32(4.0))
    assert_bitwise(3.0 / (legal + 9.0), np.float32(3.0) / (l + np.float32(9.0)))
    assert_bitwise(legal * np.float32(0.25), l * np.float32(0.25))
    # the seed's task arithmetic
    merged = base + 0.5 * ((legal - base) + (recipe - base))
    assert_bitwise(merged, b + np.float32(0.5) * ((l - b) + (r - b)))


def test_reductions_match_numpy(vecs):
    _, (base, legal, recipe) = vecs
    l = np.asarray(legal, dtype=np.float64)
    r = np.asarray(recipe, dtype=np.float64)
    assert len(legal) == l.size
    assert legal.dot(recipe) == pytest.approx(float(np.dot(l, r)), rel=1e-12)
    assert legal.norm() == pytest.approx(float(np.linalg.norm(l)), rel=1e-12)
    assert legal.norm(2) == pytest.approx(float(np.sqrt(np.sum(l * l))), rel=1e-12)
    assert legal.norm(ord=1) == pytest.approx(float(np.sum(np.abs(l))), rel=1e-12)
    cos = float(np.dot(l, r) / (np.linalg.norm(l) * np.linalg.norm(r)))
    assert legal.cosine(recipe) == pytest.approx(cos, rel=1e-12)
    assert (legal - legal).cosine(recipe) == 0.0
    with pytest.raises(ValueError, match="ord must be 1 or 2"):
        legal.norm(3)


def test_len_and_names(vecs, models):
    mapper, (base, _, _) = vecs
    float_tensors = [(n, s) for n, s, d in mapper.tensors if d in ("F32", "F16", "BF16")]
    assert len(base) == len(mapper) == sum(int(np.prod(s)) for _, s in float_tensors)
    assert base.names == [n for n, _ in float_tensors]
    assert "model.layers.0.w" in base and "position_ids" not in base


def test_views_are_zero_copy_and_read_only(vecs):
    _, (base, legal, _) = vecs
    whole = np.asarray(legal)
    assert whole.dtype == np.float32 and whole.shape == (len(legal),)
    assert whole.base is legal  # the vector owns the buffer; no copy was made
    again = np.asarray(legal)
    assert np.shares_memory(whole, again)
    w = legal["model.layers.1.w"]
    assert w.shape == (4, 4) and w.base is legal
    assert np.shares_memory(w, whole)
    # the view is exactly the tensor's slice of the flat vector
    names = legal.names
    start = sum(legal[n].size for n in names[: names.index("model.layers.1.w")])
    assert_bitwise(w.ravel(), whole[start : start + 16])
    # mutation is forbidden, and cannot be switched back on
    with pytest.raises(ValueError):
        whole[0] = 1.0
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    with pytest.raises(ValueError):
        whole.flags.writeable = True
    # copies are explicit, writeable and independent
    c = np.array(legal)
    assert c.flags.writeable and not np.shares_memory(c, whole)
    c2 = legal.__array__(copy=True)
    assert c2.flags.writeable and not np.shares_memory(c2, whole)
    f64 = np.asarray(legal, dtype=np.float64)
    assert f64.dtype == np.float64 and not np.shares_memory(f64, whole)
    with pytest.raises(ValueError):
        legal.__array__(dtype=np.float64, copy=False)


def test_from_numpy_round_trip(vecs):
    mapper, (base, _, _) = vecs
    edited = np.array(base)
    edited[:5] = 42.0
    v = tm.ParamVector.from_numpy(edited, mapper)
    assert_bitwise(v, edited)
    assert not np.shares_memory(np.asarray(v), edited)  # copied into Rust memory
    # other real dtypes are converted
    assert_bitwise(tm.ParamVector.from_numpy(edited.astype(np.float64), mapper), edited)
    assert_bitwise(v - base, edited - np.asarray(base))
    with pytest.raises(ValueError, match=f"expected {len(mapper)} elements, got 3"):
        tm.ParamVector.from_numpy(np.zeros(3, np.float32), mapper)
    with pytest.raises(ValueError, match="1-D"):
        tm.ParamVector.from_numpy(np.zeros((2, len(mapper)), np.float32), mapper)


def test_layout_mismatch_names_the_first_differing_tensor():
    a = tm.ModelTensorMapper([("x", [2], "F32"), ("w", [3], "F32"), ("z", [1], "F32")])
    b = tm.ModelTensorMapper([("x", [2], "F32"), ("w", [4], "F32"), ("z", [1], "F32")])
    va, vb = a.zeros() + 1, b.zeros()
    for op in (
        lambda: va + vb,
        lambda: va - vb,
        lambda: va * vb,
        lambda: va / vb,
        lambda: va.dot(vb),
        lambda: va.cosine(vb),
    ):
        with pytest.raises(tm.InvalidInputError, match="layouts differ at tensor `w`") as e:
            op()
        assert isinstance(e.value, ValueError) and isinstance(e.value, tm.TensormergeError)


def test_unknown_and_non_float_tensors(vecs):
    _, (base, _, _) = vecs
    with pytest.raises(KeyError) as e:
        base["no.such.tensor"]
    assert isinstance(e.value, tm.UnknownTensorError)
    assert "no tensor named `no.such.tensor`" in str(e.value)
    with pytest.raises(tm.InvalidInputError, match="`position_ids` has dtype I64"):
        base["position_ids"]


def test_unsupported_operands(vecs):
    _, (base, _, _) = vecs
    with pytest.raises(TypeError):
        base + "x"
    with pytest.raises(TypeError, match="not iterable"):
        list(base)
    # a numpy array on the left: numpy takes over and returns an array
    r = np.ones(len(base), np.float32) + base
    assert isinstance(r, np.ndarray)
    assert_bitwise(r, np.float32(1) + np.asarray(base))


def test_mapper_from_layout_and_bad_dtype():
    m = tm.ModelTensorMapper([("a", [2, 3], "bfloat16"), ("ids", [4], "I64")])
    assert len(m) == 6
    assert m.tensors == [("a", [2, 3], "BF16"), ("ids", [4], "I64")]
    with pytest.raises(tm.InvalidInputError, match="unknown dtype `F8`"):
        tm.ModelTensorMapper([("a", [1], "F8")])
    with pytest.raises(tm.InvalidInputError, match="appears more than once"):
        tm.ModelTensorMapper([("a", [1], "F32"), ("a", [1], "F32")])
