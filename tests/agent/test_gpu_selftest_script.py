"""``bin/gpu-selftest`` from a bare checkout, on a Python that has only what a lent GPU host
has for it: nvidia-ml-py, psutil and protobuf (``-S``: no site-packages; the packages are
this environment's own, laid out as a host's). The one run a lent host allows must end in a
result or one line saying what is missing, never a traceback."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NO_GPU = "no GPU to test: no CUDA driver"
pytestmark = pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None, reason="this host has an NVIDIA driver"
)


def checkout(into: Path) -> Path:
    for folder in ("bin", "common", "agent", "proto"):
        shutil.copytree(ROOT / folder, into / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def installed_files(name: str, *, without: str = "") -> list[tuple[Path, str]]:
    """(file, path in site-packages) of a distribution installed here."""
    dist = importlib.metadata.distribution(name)
    out = []
    for f in dist.files or []:
        if ".." in f.parts or "__pycache__" in f.parts or (without and str(f).startswith(without)):
            continue
        out.append((Path(str(dist.locate_file(f))), str(f)))
    return out


def host_site(into: Path, *names: str) -> Path:
    """A site-packages holding only these distributions."""
    for name in names:
        for source, relative in installed_files(name):
            (into / relative).parent.mkdir(parents=True, exist_ok=True)
            (into / relative).symlink_to(source)
    return into


def wheel(into: Path, name: str, *, without: str = "") -> Path:
    """This environment's ``name`` as a wheel file, ``without`` the files under a prefix."""
    into.mkdir(parents=True, exist_ok=True)
    version = importlib.metadata.version(name)
    path = into / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for source, relative in installed_files(name, without=without):
            z.write(source, relative)
    return path


def gpu_selftest(tree: Path, site: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-S", str(tree / "bin" / "gpu-selftest"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(site),
            "OUT": str(out),
            "LD_LIBRARY_PATH": str(out),  # no libcuda.so.1 there
        },
    )


def lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.splitlines()


def test_a_bare_checkout_needs_only_nvml_psutil_and_protobuf(tmp_path: Path) -> None:
    site = host_site(tmp_path / "site", "protobuf", "nvidia-ml-py", "psutil")
    done = gpu_selftest(checkout(tmp_path / "tree"), site, tmp_path / "out")
    said, no_gpu = lines(done)
    assert done.returncode == 3
    assert NO_GPU in no_gpu
    protobuf = importlib.metadata.version("protobuf")
    assert f"; protobuf {protobuf} (upb); nvidia-ml-py " in said
    assert (tmp_path / "out" / "environment.txt").read_text() == said.split(": ", 1)[1] + "\n"


def test_a_protobuf_older_than_the_generated_code_is_named_in_one_line(tmp_path: Path) -> None:
    tree = checkout(tmp_path / "tree")
    for pb2 in (tree / "proto" / "creditmeter" / "v1").glob("*_pb2.py"):
        text = re.sub(r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,", r"\g<1>99, 0, 0,", pb2.read_text())
        pb2.write_text(re.sub(r"Python Version: \S+", "Python Version: 99.0.0", text))
    site = host_site(tmp_path / "site", "protobuf", "nvidia-ml-py", "psutil")
    done = gpu_selftest(tree, site, tmp_path / "out")
    [line] = lines(done)
    assert done.returncode == 2
    have = importlib.metadata.version("protobuf")
    assert f"protobuf {have} cannot load the generated code (made by protobuf 99.0.0)" in line
    assert "carry protobuf==99.0.0" in line and "--wheels DIR" in line


def test_carried_wheels_stand_in_for_a_package_the_host_lacks(tmp_path: Path) -> None:
    tree = checkout(tmp_path / "tree")
    site = host_site(tmp_path / "site", "nvidia-ml-py", "psutil")
    [missing] = lines(lacking := gpu_selftest(tree, site, tmp_path / "out"))
    assert lacking.returncode == 2
    assert missing.startswith("gpu-selftest: protobuf: No module named 'google'")
    wheel(tmp_path / "wheels", "protobuf")
    done = gpu_selftest(tree, site, tmp_path / "out", "--wheels", str(tmp_path / "wheels"))
    said, no_gpu = lines(done)
    assert done.returncode == 3 and NO_GPU in no_gpu
    assert f"protobuf {importlib.metadata.version('protobuf')} (carried, upb)" in said


def test_a_carried_pure_python_protobuf_never_runs_on_the_hosts_compiled_part(
    tmp_path: Path,
) -> None:
    """The pure-Python wheel beside a host protobuf of another version: the host's
    google._upb would be found, and run under the carried Python code."""
    site = host_site(tmp_path / "site", "protobuf", "nvidia-ml-py", "psutil")
    wheel(tmp_path / "wheels", "protobuf", without="google/_upb")
    wheel(tmp_path / "wheels", "nvidia-ml-py")
    args = ("--wheels", str(tmp_path / "wheels"))
    done = gpu_selftest(checkout(tmp_path / "tree"), site, tmp_path / "out", *args)
    said, no_gpu = lines(done)
    assert done.returncode == 3 and NO_GPU in no_gpu
    assert "(carried, python); nvidia-ml-py" in said
    assert re.search(r"nvidia-ml-py \S+ \(carried\); psutil", said)


def test_wheels_that_cannot_be_carried_are_named_in_one_line(tmp_path: Path) -> None:
    tree = checkout(tmp_path / "tree")
    site = host_site(tmp_path / "site", "protobuf", "nvidia-ml-py", "psutil")
    empty, bad, escaping = (tmp_path / name for name in ("empty", "bad", "escaping"))
    for folder in (empty, bad, escaping):
        folder.mkdir()
    (bad / "protobuf-1-py3-none-any.whl").write_text("not a zip")
    with zipfile.ZipFile(escaping / "x-1-py3-none-any.whl", "w") as z:
        z.writestr("../outside.py", "")
    expected = {
        empty: "no wheels (*.whl) there",
        bad: "not a wheel",
        escaping: "member '../outside.py' would land outside the folder",
    }
    for folder, problem in expected.items():
        done = gpu_selftest(tree, site, tmp_path / "out", "--wheels", str(folder))
        [line] = lines(done)
        assert done.returncode == 2 and problem in line, line
    assert not (tmp_path / "outside.py").exists()
