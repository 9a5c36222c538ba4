"""merge() and run_method() against the `tensormerge` CLI binary."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest

import tensormerge as tm
from conftest import read_safetensors, run_cli, write_model


def config_text(models, method="task_arithmetic", dtype="float32", extra=""):
    sparse = method not in ("task_arithmetic", "linear")
    d1, d2 = (", density: 0.5", ", density: 0.7") if sparse else ("", "")
    return (
        f"merge_method: {method}\n"
        f"base_model: {models['base']}\n"
        "models:\n"
        f"  - model: {models['legal']}\n"
        f"    parameters: {{weight: 1.0{d1}}}\n"
        f"  - model: {models['recipe']}\n"
        f"    parameters: {{weight: 0.5{d2}}}\n"
        f"dtype: {dtype}\n"
        f"{extra}"
    )


def same_files(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    assert names_a == names_b
    compared = 0
    for name in names_a:
        if name.endswith((".safetensors", ".json")):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
            compared += 1
    assert compared >= 2


@pytest.mark.parametrize(
    "method,dtype,seed",
    [("task_arithmetic", "float32", None), ("ties", "bfloat16", 3), ("dare_ties", "float16", 11)],
)
def test_merge_equals_cli_bytes(models, tmp_path: Path, cli, method, dtype, seed):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(config_text(models, method, dtype, "parameters: {lambda: 1.0}\n"))
    cli_out = tmp_path / "cli"
    args = ["merge", str(cfg), "-o", str(cli_out)]
    if seed is not None:
        args += ["--seed", str(seed)]
    r = run_cli(cli, *args)
    assert r.returncode == 0, r.stderr
    py_out = tmp_path / "py"
    summary = tm.merge(cfg, py_out, seed=seed, progress=False)
    same_files(cli_out, py_out)
    # the summary
    layout_tensors = len(read_safetensors(py_out / "model.safetensors"))
    assert summary.tensors == layout_tensors == 5
    assert summary.tensors_copied == 1 and summary.tensors_merged == 4
    assert summary.out == str(py_out) and not summary.dry_run
    assert summary.bytes_written > 0 and summary.bytes_read > 0 and summary.seconds >= 0
    assert summary.seed == (seed if seed is not None else summary.seed)
    assert isinstance(summary.warnings, list)


def test_config_as_text_dict_and_path_agree(models, tmp_path: Path):
    text = config_text(models, "ties", "bfloat16", "seed: 5\n")
    tm.merge(text, tmp_path / "text", progress=False)
    as_dict = {
        "merge_method": "ties",
        "base_model": models["base"],
        "models": [
            {"model": models["legal"], "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": models["recipe"], "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "dtype": "bfloat16",
        "seed": 5,
    }
    tm.merge(as_dict, str(tmp_path / "dict"), progress=False, threads=1)
    (tmp_path / "c.yml").write_text(text)
    tm.merge(str(tmp_path / "c.yml"), tmp_path / "path", progress=True, threads=2)
    same_files(tmp_path / "text", tmp_path / "dict")
    same_files(tmp_path / "text", tmp_path / "path")


def test_dry_run_prints_the_cli_plan(models, tmp_path: Path, cli):
    cfg = tmp_path / "m.yml"
    cfg.write_text(config_text(models))
    s = tm.merge(cfg, dry_run=True)
    r = run_cli(cli, "merge", str(cfg), "-o", str(tmp_path / "x"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert s.dry_run and s.out is None and s.plan is not None
    assert s.plan.strip() == r.stdout.strip()
    assert s.tensors == 5 and s.bytes_written > 0
    assert not (tmp_path / "x").exists()


def test_progress_callback_sees_every_byte(models, tmp_path: Path):
    events = []
    tm.merge(config_text(models), tmp_path / "o", progress=lambda *e: events.append(e))
    starts = [e for e in events if e[0] == "start"]
    assert starts and starts[0][1] == "merging"
    total = starts[-1][3]
    advanced = sum(e[2] for e in events if e[0] == "advance" and e[1] == "merging")
    assert advanced == total > 0
    assert events[-1][0] == "finish"


def test_run_method_equals_cli_merge(models, tmp_path: Path, cli):
    cfg = tmp_path / "m.yml"
    cfg.write_text(config_text(models, "dare_ties", "float32", "parameters: {lambda: 0.8}\n"))
    r = run_cli(cli, "merge", str(cfg), "-o", str(tmp_path / "cli"), "--seed", "9")
    assert r.returncode == 0, r.stderr
    mapper = tm.ModelTensorMapper.open(models["base"])
    base, legal, recipe = (mapper.load(models[m]) for m in ("base", "legal", "recipe"))
    out = tm.run_method(
        "dare_ties",
        base,
        [legal, recipe],
        {"weight": [1.0, 0.5], "density": [0.5, 0.7], "lambda": 0.8},
        seed=9,
    )
    assert isinstance(out, tm.ParamVector)
    merged = read_safetensors(tmp_path / "cli" / "model.safetensors")
    for name in out.names:
        np.testing.assert_array_equal(out[name].view(np.uint32), merged[name][1].view(np.uint32))


def test_run_method_on_arrays(tmp_path: Path, cli):
    rng = np.random.default_rng(1)
    base, a, b = (rng.standard_normal((6, 5)).astype(np.float32) for _ in range(3))
    got = tm.run_method("task_arithmetic", base, [a, b], {"weight": 0.5})
    assert isinstance(got, np.ndarray) and got.shape == (6, 5) and got.dtype == np.float32
    # task arithmetic: base + sum of weighted task vectors, accumulated in float32 here
    np.testing.assert_allclose(got, base + 0.5 * (a - base) + 0.5 * (b - base), rtol=1e-5, atol=1e-6)
    lin = tm.run_method("linear", None, [a, b], {"weight": [1.0, 3.0]})
    np.testing.assert_allclose(lin, (a + 3 * b) / 4, rtol=1e-5, atol=1e-6)
    # the same tensor through the CLI (random method: the tensor name seeds it)
    dirs = {}
    for which, arr in (("base", base), ("a", a), ("b", b)):
        dirs[which] = write_model(tmp_path / which, [("layer.w", arr, "F32")])
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        f"merge_method: dare_linear\nbase_model: {dirs['base']}\nmodels:\n"
        f"  - model: {dirs['a']}\n  - model: {dirs['b']}\n"
        "parameters: {density: 0.4}\ndtype: float32\nseed: 4\n"
    )
    r = run_cli(cli, "merge", str(cfg), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    cli_w = read_safetensors(tmp_path / "out" / "model.safetensors")["layer.w"][1]
    py_w = tm.run_method("dare_linear", base, [a, b], {"density": 0.4}, seed=4, tensor="layer.w")
    np.testing.assert_array_equal(py_w.view(np.uint32), cli_w.view(np.uint32))
    with pytest.raises(tm.InvalidInputError, match="layouts differ at tensor `tensor`"):
        tm.run_method("linear", None, [a, b[:3]])


def test_methods_lists_the_registry(cli):
    ms = tm.methods()
    names = [m["name"] for m in ms]
    r = run_cli(cli, "methods", "list")
    listed = [line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip()]
    assert names == listed
    ties = next(m for m in ms if m["name"] == "ties")
    assert ties["base"] == "required" and "arXiv" in ties["paper"]
    assert {p["name"] for p in ties["params"]} >= {"weight", "density", "lambda"}


def error_of(cli, args, cwd):
    r = run_cli(cli, *args, cwd=cwd)
    assert r.stderr.startswith("error: "), r.stderr
    return r.returncode, r.stderr[len("error: ") :].rstrip("\n")


def test_errors_carry_the_cli_messages_and_hints(models, tmp_path: Path, cli):
    cases = {
        "unknown_key.yml": config_text(models) + "modles: []\n",
        "unknown_method.yml": config_text(models).replace("task_arithmetic", "tie"),
        "unknown_param.yml": config_text(models) + "parameters: {lamda: 1}\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        code, message = error_of(cli, ["merge", name, "-o", "out"], tmp_path)
        assert code == 1
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            with pytest.raises(tm.InvalidInputError) as e:
                tm.merge(name, "out", progress=False)
        finally:
            os.chdir(cwd)
        assert str(e.value) == message, name
        assert e.value.exit_code == code and isinstance(e.value, ValueError)
        assert e.value.hint and message.endswith("hint: " + e.value.hint)
    # output exists: exit code 2, an OSError
    (tmp_path / "taken").mkdir()
    (tmp_path / "ok.yml").write_text(config_text(models))
    code, message = error_of(cli, ["merge", "ok.yml", "-o", "taken"], tmp_path)
    os.chdir(tmp_path)
    try:
        with pytest.raises(tm.TensormergeOSError) as e:
            tm.merge("ok.yml", "taken", progress=False)
    finally:
        os.chdir(cwd)
    assert code == 2 and str(e.value) == message and isinstance(e.value, OSError)
    # incompatible models name the tensor
    odd = write_model(tmp_path / "odd", [("model.layers.0.w", np.zeros((3, 3), np.float32), "F32")])
    text = config_text(models).replace(models["recipe"], odd)
    with pytest.raises(tm.InvalidInputError, match="model.layers.0.w"):
        tm.merge(text, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    # run_method: unknown method with suggestions and the CLI's hint
    with pytest.raises(tm.InvalidInputError, match="tie") as e:
        tm.run_method("tie", np.zeros(2), [np.zeros(2)])
    assert e.value.hint == "`tensormerge methods list` shows the available methods"
    with pytest.raises(tm.InvalidInputError, match="lamda"):
        tm.run_method("ties", np.zeros(2), [np.zeros(2)], {"lamda": 1.0})
    with pytest.raises(TypeError):
        tm.merge(42, tmp_path / "z")


def leftovers(directory: Path, keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.parametrize("how", ["sigint", "callback"])
def test_keyboard_interrupt_removes_the_temporary_output(models, tmp_path: Path, how):
    before = set(p.name for p in tmp_path.iterdir())
    during = []

    def progress(event, phase, amount, total):
        if event == "start":
            during.extend(leftovers(tmp_path, before))  # the temporary output exists now
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # Python's handler raises at the next check
            else:
                raise KeyboardInterrupt

    # A process started in the background by a shell without job control
    # (`cmd &` in a script) inherits SIGINT ignored, and Python then installs
    # no handler: install Python's own for this test, whoever launched it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            tm.merge(config_text(models), tmp_path / "merged", progress=progress)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert during and not (tmp_path / "merged").exists()
    assert leftovers(tmp_path, before) == []  # no temporary sibling left behind
    # the next merge works
    tm.merge(config_text(models), tmp_path / "merged", progress=False)
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_eval_equals_cli_eval_and_vector_arithmetic(models, tmp_path: Path, cli):
    expr = "base + 0.5 * ((legal - base) + (recipe - base))"
    args = ["eval", expr, "-o", str(tmp_path / "cli"), "--dtype", "float32"]
    for name in ("base", "legal", "recipe"):
        args += ["--model", f"{name}={models[name]}"]
    r = run_cli(cli, *args)
    assert r.returncode == 0, r.stderr
    s = tm.eval(expr, models, tmp_path / "py", dtype="float32", progress=False, threads=2)
    same_files(tmp_path / "cli", tmp_path / "py")
    assert s.tensors == 5 and s.tensors_merged == 4 and s.tensors_copied == 1 and s.shards == 1
    # the in-memory arithmetic gives the same float32 values
    mapper = tm.ModelTensorMapper.open(models["base"])
    base, legal, recipe = (mapper.load(models[m]) for m in ("base", "legal", "recipe"))
    merged = base + 0.5 * ((legal - base) + (recipe - base))
    written = read_safetensors(tmp_path / "py" / "model.safetensors")
    for name in merged.names:
        np.testing.assert_array_equal(written[name][1], merged[name])
    with pytest.raises(tm.InvalidInputError) as e:
        tm.eval("base + nobody", models, tmp_path / "bad", progress=False)
    assert "nobody" in str(e.value)
    assert not (tmp_path / "bad").exists()
