"""Hypothesis: arithmetic identities that hold exactly in IEEE float32, on
random layouts and values, each checked against numpy as well."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import tensormerge as tm

names = st.text(alphabet="abcdefghij.0123456789", min_size=1, max_size=12)
shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3)
dtypes = st.sampled_from(["F32", "BF16", "F16", "F64", "I64"])  # I64: not in the vector
layouts = st.lists(st.tuples(names, shapes, dtypes), min_size=1, max_size=6, unique_by=lambda t: t[0])
# finite values whose products and sums stay finite
floats = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_subnormal=False)


@st.composite
def layout_and_vectors(draw):
    layout = draw(layouts)
    mapper = tm.ModelTensorMapper(layout)
    n = len(mapper)
    a, b = (draw(arrays(np.float32, n, elements=floats)) for _ in range(2))
    s = draw(floats)
    return layout, mapper, a, b, s


def equal(x, y) -> bool:
    """Numerically equal (+0.0 == -0.0): the identities hold up to the sign of zero."""
    return np.array_equal(np.asarray(x), np.asarray(y, dtype=np.float32))


def same(x, y) -> bool:
    """Bit for bit."""
    return np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y, dtype=np.float32).view(np.uint32))


@settings(max_examples=60, deadline=None)
@given(layout_and_vectors())
def test_identities(case):
    layout, mapper, a, b, s = case
    va, vb = tm.ParamVector.from_numpy(a, mapper), tm.ParamVector.from_numpy(b, mapper)
    assert len(va) == a.size == sum(int(np.prod(shape)) for _, shape, d in layout if d != "I64")
    assert va.names == [name for name, _, d in layout if d != "I64"]
    # against numpy
    assert same(va + vb, a + b)
    assert same(va - vb, a - b)
    assert same(va * vb, a * b)
    assert same(va * s, a * np.float32(s))
    assert same(s - va, np.float32(s) - a)
    # exact identities of IEEE arithmetic
    assert equal(va + vb, vb + va)
    assert equal(va * vb, vb * va)
    assert equal(va - vb, -(vb - va))
    assert equal(-(-va), va)
    assert equal(va + 0.0, va)
    assert equal(va * 1.0, va)
    assert equal(va / 1.0, va)
    assert equal(2.0 * va, va + va)
    assert equal(va - va, np.zeros_like(a))
    # per-tensor views tile the flat vector in layout order
    pieces = [va[name].ravel() for name in va.names]
    assert same(np.concatenate(pieces) if pieces else np.zeros(0, np.float32), a)
    # reductions
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert np.isclose(va.dot(vb), np.dot(a64, b64), rtol=1e-9, atol=1e-6)
    assert np.isclose(va.norm() ** 2, va.dot(va), rtol=1e-9, atol=1e-6)
    if va.norm() > 0:
        assert np.isclose(va.cosine(va), 1.0, rtol=1e-9)
