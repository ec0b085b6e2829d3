"""tools/install_detectron2.py: placeholder _C, sdist rewriting, sha256 check, detection."""
import importlib.util
import io
import os
import sys
import tarfile
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", os.path.join(REPO, "tools", "install_detectron2.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


inst = load_installer()


def placeholder_module():
    mod = types.ModuleType("fake_d2_C")
    exec(compile(inst.PLACEHOLDER_C, "_C.py", "exec"), mod.__dict__)
    return mod


def test_placeholder_raises_clear_error_naming_the_op():
    C = placeholder_module()
    assert C.__smca_detr_placeholder__ is True
    with pytest.raises(AttributeError) as e:
        C.deform_conv_forward
    msg = str(e.value)
    assert "deform_conv_forward" in msg and "compiled" in msg and "from source" in msg
    assert not hasattr(C, "COCOevalAccumulate")  # hasattr sees the op as absent
    assert "none" in C.get_compiler_version() and C.has_cuda() is False
    with pytest.raises(AttributeError):
        C.__wrapped__  # dunders are plain misses, so introspection tools are not confused


def make_fake_sdist(path, with_init=True, evil=False):
    root = f"{inst.PYPI_NAME}-{inst.PYPI_VERSION}"
    with tarfile.open(path, "w:gz") as tar:
        files = {f"{root}/setup.py": b"raise SystemExit('the sdist setup.py must not be used')\n",
                 f"{root}/detectron2/model_zoo/configs/a.yaml": b"x: 1\n"}
        if with_init:
            files[f"{root}/detectron2/__init__.py"] = b"__version__ = '0.6'\n"
        if evil:
            files["../escape.txt"] = b"no"
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_build_python_only_tree(tmp_path):
    sdist = tmp_path / "x.tar.gz"
    make_fake_sdist(sdist)
    root = inst.build_python_only_tree(str(sdist), str(tmp_path / "src"))
    setup_py = open(os.path.join(root, "setup.py")).read()
    assert 'name="detectron2"' in setup_py and "numpy<1.24" in setup_py and "Pillow>=7.1,<10" in setup_py
    assert "__smca_detr_placeholder__" in open(os.path.join(root, "detectron2", "_C.py")).read()
    compile(setup_py, "setup.py", "exec")


def test_refuses_bad_sdists(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    make_fake_sdist(evil, evil=True)
    with pytest.raises(RuntimeError, match="suspicious"):
        inst.build_python_only_tree(str(evil), str(tmp_path / "a"))
    empty = tmp_path / "empty.tar.gz"
    make_fake_sdist(empty, with_init=False)
    with pytest.raises(RuntimeError, match="__init__"):
        inst.build_python_only_tree(str(empty), str(tmp_path / "b"))


def test_sha256_mismatch_is_not_installed(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_pip(*args, timeout=None):
        calls.append(args)
        if args[0] == "download":
            make_fake_sdist(os.path.join(args[args.index("-d") + 1], "pb1-detectron2-0.6.tar.gz"))
        return 0

    monkeypatch.setattr(inst, "pip", fake_pip)
    assert inst.install_from_pypi_sdist() is False
    assert [c[0] for c in calls] == ["download"]  # never reached "install"
    assert "sha256 mismatch" in capsys.readouterr().out


def test_probe_reports_this_environment():
    info = inst.probe()
    assert info is not None, "detectron2 must be importable in the test environment"
    version, location, ops = info
    from detectron2 import _C

    assert ops == (not getattr(_C, "__smca_detr_placeholder__", False))
    assert os.path.isdir(location)


def test_summary_line(capsys):
    assert inst.summary(("0.6", "/x", False), "PyPI") == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("detectron2: 0.6 from PyPI") and "NO compiled ops" in out
    assert inst.summary(None, "git") == 1
