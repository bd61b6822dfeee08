"""`benchmarks.gpu_bundle` and `benchmarks.import_guard` on small fake inputs: no download, a few seconds."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_bundle as gb
from benchmarks.import_guard import GuardConfig

MIB = gb.MIB


# ---------------------------------------------------------------- the size split

def test_split_balances_the_two_runs_under_the_limit() -> None:
    gguf, tree, extra = 98_362_432, 2 * MIB, 18 * MIB  # the real GGUF, a tree and wheels + data like today's
    s = gb.plan_split(gguf, tree, extra)
    assert s.run1 == tree + s.part1 and s.run2 == tree + (gguf - s.part1) + extra
    assert abs(s.run1 - s.run2) <= 1
    assert max(s.run1, s.run2) <= gb.LIMIT - 2 * MIB
    # halves would not have fitted: run 2 would carry half the GGUF plus every wheel
    assert tree + gguf // 2 + extra + 2 * MIB > gb.LIMIT - 2 * MIB or s.part1 > gguf // 2


def test_split_refuses_a_payload_that_cannot_fit() -> None:
    with pytest.raises(gb.BundleError, match=r"run 1 .* MiB .* run 2 .* MiB"):
        gb.plan_split(98_362_432, 2 * MIB, 30 * MIB)  # 94 + 30 + 2 x 2 MiB > 2 x 62 MiB
    with pytest.raises(gb.BundleError):
        gb.plan_split(20 * MIB, 55 * MIB, 0)  # a tree of 55 MiB leaves too little for either part


# ---------------------------------------------------------------- which wheels, which tags

def test_a_requirement_travels_only_when_the_image_cannot_serve_it() -> None:
    assert gb.needs_carrying("annotated-types", ">=0.6.0", "0.8.0") == "not in the H200 image"
    assert gb.needs_carrying("numpy", ">=1.17", "2.4.6") is None  # image 2.5.2 recorded
    assert "image has 5.17.0" in gb.needs_carrying("transformers", ">=5.20", "5.24.0")
    # the image's version is not recorded: carried only when nothing older than ours would do
    assert "not recorded" in gb.needs_carrying("typing_extensions", ">=4.16.0", "4.16.0")
    assert gb.needs_carrying("pyyaml", ">=5.1", "6.0.4") is None


@pytest.mark.parametrize("name, ok", [
    ("duckdb-2.0.1-cp312-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", True),
    ("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("gguf-0.19.0-py3-none-any.whl", True),
    ("x-1.0-cp38-abi3-manylinux_2_17_x86_64.whl", True),
    ("pydantic_core-2.50.5-cp311-cp311-manylinux2014_x86_64.whl", False),
    ("pydantic_core-2.50.5-cp312-cp312-manylinux2014_aarch64.whl", False),
    ("pydantic_core-2.50.5-cp312-cp312-win_amd64.whl", False),
])
def test_wheel_tags_for_cpython_312_linux_x86_64(name: str, ok: bool) -> None:
    assert gb.wheel_ok_for_image(name) is ok


def test_a_wheel_of_another_version_than_the_venvs_is_reported() -> None:
    import pytest as installed

    good = {"dist": "pytest", "version": installed.__version__, "file": "pytest-1-py3-none-any.whl"}
    stale = dict(good, version="0.0.1")
    assert gb.check_wheels({"wheels": [good]}) == []
    assert any("0.0.1" in p for p in gb.check_wheels({"wheels": [stale]}))
    assert any("two wheels" in p for p in gb.check_wheels({"wheels": [good, good]}))


# ---------------------------------------------------------------- build, then run 2's unpacking

def _fake_wheel(folder: Path) -> Path:
    path = folder / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("fakepkg/__init__.py", "X = 1\n" * 5000)  # compressible: its xz form is kept
        z.writestr("fakepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    return path


def test_build_then_unpack_restores_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("/.gpu/\n")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(bytes(range(256)) * 12_000)  # 3 MB
    source = tmp_path / "ml"
    source.mkdir()
    (source / "MovieLens100k_data.parquet.brotli").write_bytes(b"parquet")
    wheel = _fake_wheel(tmp_path)
    monkeypatch.setattr(gb, "resolve_wheels", lambda roots, cache: [
        gb.Wheel("fakepkg", "1.0", wheel, [], ["fakepkg"], "test")])

    plan = gb.build(root / ".gpu", gguf, source, margin=2 * MIB, root=root)
    assert [r["carry"] for r in plan["runs"]] == [[".gpu/run1"], [".gpu/run2"]]
    assert all(len(r["command"]) <= gb.COMMAND_CHARS for r in plan["runs"])
    assert plan["sizes_bytes"]["run1"] < gb.LIMIT and json.loads((root / ".gpu" / "runs.json").read_text()) == plan
    carried = list((root / ".gpu" / "run2" / "wheels").iterdir())
    assert [p.name for p in carried] == [wheel.name + ".xz"]

    stage = tmp_path / "stage"
    run2 = root / ".gpu" / "run2"
    assert gb.unpack(run2, stage) == 3  # run 1's part is not there yet
    stage.mkdir(exist_ok=True)
    for f in (root / ".gpu" / "run1").iterdir():
        (stage / f.name).write_bytes(f.read_bytes())
    assert gb.unpack(run2, stage) == 0
    assert (stage / "model.gguf").read_bytes() == gguf.read_bytes()
    with zipfile.ZipFile(stage / "wheels" / wheel.name) as z, zipfile.ZipFile(wheel) as original:
        assert {i.filename: z.read(i) for i in z.infolist()} == {i.filename: original.read(i)
                                                                  for i in original.infolist()}
    part2 = run2 / "model.gguf.part2"
    part2.write_bytes(part2.read_bytes()[:-1] + b"?")  # a broken transfer
    assert gb.unpack(run2, stage) == 3


def test_build_refuses_a_bundle_folder_git_would_send(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    with pytest.raises(gb.BundleError, match="not git-ignored"):
        gb.build(root / ".gpu", tmp_path / "none.gguf", tmp_path, margin=0, root=root)


# ---------------------------------------------------------------- the import guard

def _package(root: Path, name: str, body: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(body))


def _guarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> tuple[str, list[dict]]:
    lib = tmp_path / "lib"
    _package(lib, "fakeproj", "")
    (lib / "fakeproj" / "bad.py").write_text("import fakeextra\n")
    (lib / "fakeproj" / "probe.py").write_text("import importlib.util\nFOUND = importlib.util.find_spec('fakeextra')\n")
    (lib / "fakeproj" / "old.py").write_text("import asynchat\n")  # stdlib in 3.11, gone in 3.12
    _package(lib, "fakecarried", "import json\n")
    (lib / "fakecarried" / "deps.py").write_text("import fakeextra\n")
    _package(lib, "fakeimage", "import fakeimagehelper\n")
    _package(lib, "fakeimagehelper", "")
    _package(lib, "fakeextra", "")
    log = tmp_path / "imports.jsonl"
    config = GuardConfig(project=frozenset({"fakeproj"}), carried=frozenset({"fakecarried"}),
                         image=frozenset({"fakeimage"}), log=str(log))
    monkeypatch.setenv("PYTHONPATH", str(lib))
    env = gb.guard_env(config.to_json(), tmp_path / "guard")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_the_guard_refuses_what_the_gpu_machine_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, log = _guarded(tmp_path, monkeypatch, """
        import fakeimage, fakecarried, fakeproj, json  # image, carried, project, stdlib: allowed
        for mod in ("fakeproj.bad", "fakecarried.deps", "fakeproj.old"):
            try:
                __import__(mod)
                print("LET THROUGH", mod)
            except ModuleNotFoundError as e:
                print("REFUSED", mod, e.name)
        import fakeproj.probe
        print("PROBE", fakeproj.probe.FOUND)
        try:
            import fakeextra  # the script is __main__: judged too
            print("LET THROUGH main")
        except ModuleNotFoundError:
            print("REFUSED main")
    """)
    assert "LET THROUGH" not in out
    assert "REFUSED fakeproj.bad fakeextra" in out and "REFUSED fakecarried.deps fakeextra" in out
    assert "REFUSED fakeproj.old asynchat" in out and "REFUSED main" in out
    assert "PROBE None" in out
    verdicts = {(r["module"], r["importer"]): r["verdict"] for r in log}
    assert verdicts[("fakeimagehelper", "fakeimage")] == "image-internal"  # an image package's own import
    assert verdicts[("fakeextra", "fakeproj.bad")] == "refused"
    assert verdicts[("fakecarried", "__main__")] == "carried"


def test_without_the_guard_the_same_imports_succeed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusals above come from the guard, not from a broken fake tree."""
    lib = tmp_path / "lib"
    _package(lib, "fakeproj", "")
    (lib / "fakeproj" / "bad.py").write_text("import fakeextra\n")
    _package(lib, "fakeextra", "")
    done = subprocess.run([sys.executable, "-c", "import fakeproj.bad; print('OK')"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.stdout.strip() == "OK", done.stderr
