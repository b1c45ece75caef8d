"""onnxfold.heap: the check's and verification's children keep freed memory for reuse and make the
pages of the parse to come while they wait (issue 20: onnx.checker on the written ResNet-50 took
0.16 s, 0.13 s of it page faults; 0.035 s with the pages made ahead). Each case runs in a fresh
interpreter: glibc's settings are per process, and pytest's must stay as they are."""

import os
import subprocess
import sys
import textwrap

import pytest

from onnxfold import heap

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
pytestmark = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")


def faults_of(setup: str) -> int:
    """Page faults of filling 64 MiB of bytes the second time (made, freed, made again) after
    ``setup``, in a fresh interpreter (bytes, as a parse makes them: numpy asks for huge pages)."""
    code = textwrap.dedent(f"""
        import resource
        from onnxfold import heap
        {setup}
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = b"\\1" * (64 << 20); del a  # 64 MiB, freed
        before = faults()
        b = b"\\2" * (64 << 20)
        print(faults() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_memory_is_reused_without_faults():
    pages = (64 << 20) // 4096
    assert faults_of("") > pages * 0.9  # glibc gives a 64 MiB block back on free: the next one faults again
    assert faults_of("assert heap.keep_freed()") < pages * 0.05


def test_prefault_makes_the_pages_ahead():
    pages = (64 << 20) // 4096
    code = textwrap.dedent("""
        import resource
        from onnxfold import heap
        assert heap.prefault(80 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = b"\\1" * (64 << 20)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) < pages * 0.05


def test_budget_is_twice_and_a_fifth_the_model_within_a_quarter_of_what_is_available():
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    assert heap.budget(100 << 20) == int((100 << 20) * 2.2) or heap.budget(100 << 20) <= available // 4
    assert heap.budget(1 << 50) <= available // 4 + (1 << 20)
    assert not heap.prefault(heap.budget(100))  # under 1 MiB: nothing to make


def test_elsewhere_nothing_is_done(monkeypatch):
    def no_glibc(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "confstr", no_glibc)
    assert heap.keep_freed() is False and heap.prefault(64 << 20) is False


@pytest.mark.parametrize("entry, kept", [("cli", True), ("library", False)])
def test_the_command_lines_process_keeps_freed_memory_a_library_users_does_not(tmp_path, entry, kept):
    """``python -m onnxfold`` (cli.console) owns its process: its folds' float64 temporaries reuse freed pages
    (repvgg_a0's fold 0.19 -> 0.14 s). fold_file in a user's process leaves glibc's settings as they were
    (and so does cli.main, which the tests call in pytest's own process)."""
    from checks import ROOT

    model, out = ROOT / "models" / "resnet_block.onnx", tmp_path / "o.onnx"
    run = (f"import sys; from onnxfold import cli; cli.leave = lambda code: None; "
           f"sys.argv = ['onnxfold', {str(model)!r}, {str(out)!r}, '--no-verify', '-q']; cli.console()"
           if entry == "cli" else
           f"from onnxfold import fold_file; assert fold_file({str(model)!r}, {str(out)!r}, verify=False)")
    faults = faults_of(run)
    assert out.exists()
    pages = (64 << 20) // 4096
    assert (faults < pages * 0.05) if kept else (faults > pages * 0.9)
