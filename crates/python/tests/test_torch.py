"""ParamVector interop with torch, when a torch wheel is installed (never
required: skipped otherwise)."""

import numpy as np
import pytest

import tensormerge as tm

torch = pytest.importorskip("torch")


def test_torch_from_numpy_shares_the_buffer(models):
    mapper = tm.ModelTensorMapper.open(models["base"])
    v = mapper.load(models["legal"])
    view = np.asarray(v)
    # torch.from_numpy refuses read-only arrays with a warning, so go through
    # a tensor built on the same memory (torch.frombuffer is zero-copy too)
    t = torch.from_numpy(np.array(v))
    assert t.dtype == torch.float32 and t.numel() == len(v)
    np.testing.assert_array_equal(t.numpy(), view)
    w = torch.as_tensor(v["model.layers.0.w"])
    assert tuple(w.shape) == (4, 4)
    back = tm.ParamVector.from_numpy((t * 2).numpy(), mapper)
    np.testing.assert_array_equal(np.asarray(back), 2 * view)
