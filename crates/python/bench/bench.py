"""Python layer overhead: the same work through tensormerge's Python module,
the `tensormerge` CLI and numpy, timed alternately in one run.

    python crates/python/bench/bench.py --cli target/release/tensormerge

Prints, for each comparison, the best of `--repeat` wall times and their
ratio. Work: `vector + vector` on a synthetic 64M-element model (256 MB per
vector), tensormerge vs numpy on the same buffers; and a whole
`task_arithmetic` merge (1 base + 2 fine-tunes, f32) through `tm.merge` vs
`tensormerge merge` run as a subprocess, vs `tensormerge eval` for the sum
`a + b` of two models vs the same sum in memory (`mapper.load` twice, `+`,
`mapper.save`) and vs streaming through `tm.eval`.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import tensormerge as tm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_model  # noqa: E402


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def alternate(a, b, repeat):
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(best(a, 1))
        tb.append(best(b, 1))
    return min(ta), min(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cli", required=True, help="the tensormerge binary (release build)")
    ap.add_argument("--elements", type=int, default=64 << 20, help="parameters per model")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tm-bench-"))
    try:
        rng = np.random.default_rng(0)
        n_tensors = 16
        per = args.elements // n_tensors
        shape = (per // 1024, 1024)
        dirs = {}
        for name in ("base", "a", "b"):
            tensors = [
                (f"model.layers.{i}.w", rng.standard_normal(shape, dtype=np.float32), "F32")
                for i in range(n_tensors)
            ]
            dirs[name] = write_model(tmp / name, tensors)
        mapper = tm.ModelTensorMapper.open(dirs["base"])
        va, vb = mapper.load(dirs["a"]), mapper.load(dirs["b"])
        na, nb = np.array(va), np.array(vb)
        mb = len(va) * 4 / 1e6
        print(f"model: {n_tensors} F32 tensors, {len(va)} parameters ({mb:.0f} MB per model)")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
        print()

        # vector + vector: tensormerge vs numpy on the same values
        t_tm, t_np = alternate(lambda: va + vb, lambda: na + nb, args.repeat)
        print(f"vector + vector      tensormerge {t_tm * 1e3:8.1f} ms   numpy {t_np * 1e3:8.1f} ms   ratio {t_tm / t_np:.2f}x")
        # a view costs nothing: no copy of the 256 MB buffer
        t_view = best(lambda: np.asarray(va), args.repeat)
        print(f"np.asarray(vector)   {t_view * 1e6:.1f} us (zero-copy view)")

        # merge: Python vs CLI subprocess, same config and output
        cfg = tmp / "ta.yml"
        cfg.write_text(
            f"merge_method: task_arithmetic\nbase_model: {dirs['base']}\nmodels:\n"
            f"  - model: {dirs['a']}\n  - model: {dirs['b']}\n"
            "parameters: {lambda: 0.5}\ndtype: float32\n"
        )

        def py_merge():
            tm.merge(cfg, tmp / "py", progress=False, overwrite=True)

        def cli_merge():
            subprocess.run(
                [args.cli, "--no-progress", "merge", str(cfg), "-o", str(tmp / "cli"), "--overwrite"],
                check=True,
                capture_output=True,
            )

        t_py, t_cli = alternate(py_merge, cli_merge, args.repeat)
        print(f"merge (streaming)    python      {t_py:8.3f} s    cli   {t_cli:8.3f} s    ratio {t_py / t_cli:.2f}x")

        # a + b of two models, load -> add -> save, vs the CLI's streaming eval
        def py_sum():
            m = tm.ModelTensorMapper.open(dirs["a"])
            m.save(m.load(dirs["a"]) + m.load(dirs["b"]), tmp / "py_sum", overwrite=True)

        def cli_sum():
            subprocess.run(
                [args.cli, "--no-progress", "eval", "a + b", "--model", f"a={dirs['a']}",
                 "--model", f"b={dirs['b']}", "-o", str(tmp / "cli_sum"), "--overwrite"],
                check=True,
                capture_output=True,
            )

        def py_eval():
            tm.eval("a + b", {"a": dirs["a"], "b": dirs["b"]}, tmp / "py_eval", progress=False, overwrite=True)

        t_py, t_cli = alternate(py_sum, cli_sum, args.repeat)
        print(f"a + b, in memory     python      {t_py:8.3f} s    cli   {t_cli:8.3f} s    ratio {t_py / t_cli:.2f}x"
              "   (mapper.load x2, +, mapper.save vs streaming eval)")
        t_py, t_cli = alternate(py_eval, cli_sum, args.repeat)
        print(f"a + b, streaming     python      {t_py:8.3f} s    cli   {t_cli:8.3f} s    ratio {t_py / t_cli:.2f}x"
              "   (tm.eval vs tensormerge eval)")
        outputs = [tmp / d / "model.safetensors" for d in ("py_sum", "py_eval", "cli_sum")]
        same = len({p.read_bytes() for p in outputs[1:]}) == 1
        print(f"  tm.eval output bytes equal to the CLI's: {same}")
        print(f"machine: load average {os.getloadavg()[0]:.2f} at end")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
