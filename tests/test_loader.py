"""The JIT loader: lazy, cached by content, one warning on failure, strict mode."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root

from ddetr_tutorial import cli
from ddetr_tutorial.ops import (
    BuildError,
    custom_op,
    functions,
    loader,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)
from msda_inputs import SHAPES, make_inputs


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """An empty extension cache and no remembered modules, failures or warnings."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv("DDETR_BACKEND", raising=False)
    monkeypatch.delenv("DDETR_STRICT", raising=False)
    monkeypatch.setattr(loader, "_modules", {})
    monkeypatch.setattr(loader, "_failures", {})
    monkeypatch.setattr(functions, "_warned", set())
    return tmp_path


@pytest.fixture
def broken_sources(fresh_loader, monkeypatch):
    """A copy of the C++ sources that cannot compile."""
    csrc = fresh_loader / "csrc"
    shutil.copytree(loader.CSRC, csrc)
    for name in loader.SOURCES["cpu"]:
        path = csrc / name
        # A missing header is a fatal error: the compiler stops at once.
        path.write_text('#include "deliberately_missing_for_a_test.h"\n' + path.read_text())
    monkeypatch.setattr(loader, "CSRC", csrc)
    return csrc


def test_import_builds_nothing(tmp_path):
    code = (
        "import sys\n"
        "import ddetr_tutorial, ddetr_tutorial.cli, ddetr_tutorial.ops\n"
        "from ddetr_tutorial.attention import MSDeformAttn\n"
        "from ddetr_tutorial.ops import loader\n"
        "MSDeformAttn()\n"
        "assert not loader._modules, loader._modules\n"
        "assert not any(m.startswith('ddetr_msda') for m in sys.modules)\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir())


def test_failed_build_falls_back_with_one_warning(broken_sources):
    args = make_inputs(SHAPES["four_levels"], dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(*args)
        second = ms_deform_attn(*args)
    ours = [w for w in caught if "did not build" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "deliberately_missing_for_a_test.h" in message
    assert "Falling back to the pytorch reference" in message
    log = loader._failures["cpu"].log_path
    assert log.exists() and str(log) in message
    assert log.parent.parent == broken_sources.parent / "extensions"  # TORCH_EXTENSIONS_DIR
    assert "deliberately_missing_for_a_test.h" in log.read_text()
    expected = ms_deform_attn_pytorch(*args)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_strict_mode_raises(broken_sources, monkeypatch):
    monkeypatch.setenv("DDETR_STRICT", "1")
    args = make_inputs(SHAPES["four_levels"], dtype=torch.float32)
    with pytest.raises(BuildError, match="the cpu kernel of ms_deform_attn did not build"):
        ms_deform_attn(*args)


def test_explicit_backend_raises_on_failed_build(broken_sources):
    args = make_inputs(SHAPES["four_levels"], dtype=torch.float32)
    with pytest.raises(BuildError, match="full log: .*build.log"):
        ms_deform_attn(*args, backend="cpu")


def test_build_ops_reports_failure(broken_sources, capsys):
    assert cli.main(["build-ops", "--backend", "cpu"]) == 1
    assert "cpu: FAILED" in capsys.readouterr().err


def test_build_ops_reports_the_registered_kernels(capsys):
    assert cli.main(["build-ops", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cpu: ready in" in out and str(loader.build_directory("cpu")) in out
    assert ("CPU kernels of ddetr_tutorial::ms_deform_attn, "
            "ddetr_tutorial::ms_deform_attn_backward") in out


def test_an_extension_without_its_kernels_is_a_build_error(monkeypatch):
    loader.load_extension("cpu")  # built and cached: the reload below compiles nothing
    monkeypatch.setattr(loader, "_modules", {})
    monkeypatch.setattr(loader, "_failures", {})
    monkeypatch.setattr(custom_op, "registered_kernels", lambda backend: [custom_op.FORWARD])
    with pytest.raises(BuildError, match="registered no cpu kernel for "
                                         "ddetr_tutorial::ms_deform_attn_backward"):
        loader.load_extension("cpu")


def test_build_is_reused_by_a_new_process():
    """A second process finds the build and compiles nothing (no file is touched)."""
    module = loader.load_extension("cpu")
    folder = loader.build_directory("cpu")
    assert Path(module.__file__).parent == folder
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    subprocess.run([sys.executable, "-m", "ddetr_tutorial", "build-ops", "--backend", "cpu"],
                   check=True, timeout=600)
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_torch_extensions_dir_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert loader.build_directory("cpu").parent == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert loader.build_directory("cpu").parent == Path(get_default_build_root())


def test_key_changes_with_source_place_and_torch_version(tmp_path, monkeypatch):
    key = loader.build_key("cpu")
    assert loader.build_key("cpu") == key  # stable
    csrc = tmp_path / "csrc"
    shutil.copytree(loader.CSRC, csrc)
    monkeypatch.setattr(loader, "CSRC", csrc)
    # Same bytes in another checkout: its own folder (the build file holds absolute
    # source paths, so a shared folder would be rebuilt at each switch).
    copied = loader.build_key("cpu")
    assert copied != key
    (csrc / "ms_deform_attn_cpu.cpp").write_text((csrc / "ms_deform_attn_cpu.cpp").read_text()
                                                 + "\n// edited\n")
    edited = loader.build_key("cpu")
    assert edited not in (key, copied)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert loader.build_key("cpu") not in (key, copied, edited)


def test_backend_environment_variable(monkeypatch):
    value = torch.zeros(1, 4, 1, 2)
    monkeypatch.setenv("DDETR_BACKEND", "pytorch")
    assert functions.resolve_backend("auto", value) == "pytorch"
    assert functions.resolve_backend("cpu", value) == "cpu"  # explicit wins over the variable
    monkeypatch.setenv("DDETR_BACKEND", "cpu")
    assert functions.resolve_backend("auto", value) == "cpu"
    monkeypatch.setenv("DDETR_BACKEND", "fast")
    with pytest.raises(ValueError, match="DDETR_BACKEND must be one of .* got 'fast'"):
        functions.resolve_backend("auto", value)


def test_auto_uses_the_reference_for_half_on_cpu_and_says_so_once(monkeypatch):
    monkeypatch.delenv("DDETR_BACKEND", raising=False)
    monkeypatch.setattr(functions, "_warned", set())
    half = torch.zeros(1, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="the cpu kernel takes torch.float32, torch.float64, "
                                            "not torch.float16; using the pytorch reference"):
        assert functions.resolve_backend("auto", half) == "pytorch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (device, dtype)
        assert functions.resolve_backend("auto", half) == "pytorch"
        assert functions.resolve_backend("auto", torch.zeros(1)) == "cpu"
    with pytest.warns(RuntimeWarning, match="not torch.bfloat16"):
        assert functions.resolve_backend("auto", half.bfloat16()) == "pytorch"


# What a killed or failed build leaves behind (issue 14, section 2, items 1, 8, 9).

LOAD_AND_RUN = (
    "import torch\n"
    "from ddetr_tutorial.ops import loader, ms_deform_attn, ms_deform_attn_pytorch\n"
    "from msda_inputs import SHAPES, make_inputs\n"
    "loader.load_extension('cpu')\n"
    "args = make_inputs(SHAPES['four_levels'], dtype=torch.float64)\n"
    "torch.testing.assert_close(ms_deform_attn(*args, backend='cpu'),\n"
    "                           ms_deform_attn_pytorch(*args))\n"
)


@pytest.fixture(scope="module")
def built_cpu_folder():
    """The cpu build of this checkout (built once, in the default extension root)."""
    loader.load_extension("cpu")
    return loader.build_directory("cpu")


@pytest.fixture
def copied_build(built_cpu_folder, tmp_path):
    """A private copy of the finished build (mtimes kept, so nothing recompiles) under
    a fresh TORCH_EXTENSIONS_DIR; returns that root and the copied build folder."""
    root = tmp_path / "extensions"
    folder = root / built_cpu_folder.name
    shutil.copytree(built_cpu_folder, folder, ignore=shutil.ignore_patterns("lock"))
    return root, folder


def run_in_subprocess(code, extensions_root, timeout):
    """Run `code` in a new process on `extensions_root`; a hang fails by the timeout."""
    tests = str(Path(__file__).parent)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_root),
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    env.pop("DDETR_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=timeout,
                          capture_output=True, text=True)


def test_a_stale_torch_lock_is_removed_not_waited_on(copied_build):
    """A build killed mid-compile leaves torch's `lock`; torch's load() would wait on
    it forever. The next load removes it, says so in one line, and loads."""
    root, folder = copied_build
    (folder / "lock").touch()
    done = run_in_subprocess(LOAD_AND_RUN, root, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"removed the stale build lock {folder / 'lock'}" in done.stderr
    assert not (folder / "lock").exists()


def test_a_live_builder_is_waited_for_a_bounded_time(fresh_loader, monkeypatch):
    """Another live builder holds build.flock: wait DDETR_BUILD_WAIT seconds, then a
    BuildError naming the folder and the lock (no silent endless wait)."""
    monkeypatch.setenv("DDETR_BUILD_WAIT", "0.5")
    folder = loader.build_directory("cpu")
    folder.mkdir(parents=True)
    with open(folder / loader.FLOCK_NAME, "w") as other_builder:
        fcntl.flock(other_builder, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(BuildError, match=f"another process has been building in "
                                             f"{folder} for over 0 s"):
            loader.load_extension("cpu")
        assert time.monotonic() - start < 30
    monkeypatch.setenv("DDETR_BUILD_WAIT", "soon")
    monkeypatch.setattr(loader, "_failures", {})
    with pytest.raises(ValueError, match="DDETR_BUILD_WAIT must be a positive number .*'soon'"):
        loader.load_extension("cpu")


def test_a_truncated_library_is_relinked_not_mapped(copied_build):
    """A truncated cached .so (killed link, full disk) would die of SIGBUS when mapped:
    it fails its stamp, is deleted and relinked, and the kernel runs."""
    root, folder = copied_build
    library = folder / f"{folder.name}.so"
    size = library.stat().st_size
    with open(library, "r+b") as f:
        f.truncate(size // 2)
    done = run_in_subprocess(LOAD_AND_RUN, root, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr)  # -7 would be SIGBUS
    stamp = json.loads((folder / loader.STAMP_NAME).read_text())
    assert stamp == loader._library_record(library) and stamp["size"] == size


@pytest.mark.parametrize("how", ["a file in the path", "permission denied"])
def test_an_unwritable_extensions_dir_falls_back_or_names_the_folder(fresh_loader, monkeypatch,
                                                                     how):
    """`auto` falls back to the reference with its one warning; an explicit backend
    raises a BuildError naming the folder (not an OSError from mkdir or the log)."""
    if how == "a file in the path":
        (fresh_loader / "a_file").write_text("")
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(fresh_loader / "a_file" / "extensions"))
    else:  # what a read-only folder gives a non-root user (the tests may run as root)
        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "mkdir", refuse)
    folder = loader.build_directory("cpu")
    args = make_inputs(SHAPES["four_levels"], dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ms_deform_attn(*args)
        ms_deform_attn(*args)
    ours = [str(w.message) for w in caught if "did not build" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert f"cannot write the build folder {folder}" in ours[0]
    assert "Falling back to the pytorch reference" in ours[0]
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*args), rtol=0, atol=0)
    monkeypatch.setattr(loader, "_failures", {})
    with pytest.raises(BuildError, match=f"cannot write the build folder {folder}"):
        ms_deform_attn(*args, backend="cpu")
