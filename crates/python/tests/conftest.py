"""Shared helpers: an independent safetensors writer/reader (numpy only, so
that the tests do not check tensormerge's files with tensormerge), tiny
models, and the `tensormerge` CLI binary the merge tests compare against."""

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[3]

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest, ties to even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def encode(a: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        return to_bf16_bits(a).tobytes()
    return np.ascontiguousarray(a, dtype=DTYPES[dtype]).tobytes()


def write_safetensors(path: Path, tensors: List[Tuple[str, np.ndarray, str]]) -> None:
    """Writes `(name, values, dtype)` tensors in the given order."""
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, values, dtype in tensors:
        data = encode(values, dtype)
        header[name] = {
            "dtype": dtype,
            "shape": list(values.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def read_safetensors(path: Path) -> Dict[str, Tuple[str, np.ndarray]]:
    """`name -> (dtype, values as float32 or int64, shaped)`."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        chunk = body[start:end]
        dtype = info["dtype"]
        if dtype == "BF16":
            values = from_bf16_bits(np.frombuffer(chunk, dtype=np.uint16))
        else:
            values = np.frombuffer(chunk, dtype=DTYPES[dtype])
        out[name] = (dtype, values.reshape(info["shape"]))
    return out


def write_model(directory: Path, tensors: List[Tuple[str, np.ndarray, str]]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(
        json.dumps({"architectures": ["TinyForTests"], "torch_dtype": "float32"}, indent=2)
    )
    return str(directory)


# Values that are exact in bfloat16 and float16 (small multiples of 1/64),
# so that every dtype stores exactly what the test computes.
def exact_values(rng: np.random.Generator, shape) -> np.ndarray:
    return (rng.integers(-256, 256, size=shape) / 64.0).astype(np.float32)


LAYOUT = [
    ("model.embed.weight", (8, 4), "BF16"),
    ("model.layers.0.w", (4, 4), "F32"),
    ("model.layers.1.w", (4, 4), "F16"),
    ("model.norm.bias", (4,), "F32"),
]


@pytest.fixture
def models(tmp_path: Path) -> Dict[str, str]:
    """A base and two fine-tunes with mixed dtypes and integer position ids."""
    rng = np.random.default_rng(7)
    base = {name: exact_values(rng, shape) for name, shape, _ in LAYOUT}
    out = {}
    for which in ("base", "legal", "recipe"):
        values = base if which == "base" else {
            k: v + exact_values(rng, v.shape) / 4 for k, v in base.items()
        }
        tensors = [(name, values[name], dt) for name, _, dt in LAYOUT]
        tensors.append(("position_ids", np.arange(6, dtype=np.int64), "I64"))
        out[which] = write_model(tmp_path / which, tensors)
    return out


def _find_cli() -> str:
    env = os.environ.get("TENSORMERGE_BIN")
    if env:
        return env
    roots = [os.environ.get("CARGO_TARGET_DIR"), str(REPO / "target")]
    for root in filter(None, roots):
        for profile in ("debug", "release"):
            p = Path(root) / profile / "tensormerge"
            if p.is_file():
                return str(p)
    found = shutil.which("tensormerge")
    if found:
        return found
    pytest.fail(
        "the tensormerge CLI binary was not found: build it (cargo build -p tensormerge-cli) "
        "or set TENSORMERGE_BIN"
    )


@pytest.fixture(scope="session")
def cli() -> str:
    return _find_cli()


def run_cli(cli: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1")
    return subprocess.run(
        [cli, "--no-progress", *args], capture_output=True, text=True, cwd=cwd, env=env
    )
