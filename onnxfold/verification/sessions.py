"""Running the two models in onnxruntime: the providers, one session per model (graph optimizations
off), the fold tensors as extra outputs, and the fallback to onnx.reference where the CPU provider has
no kernel. Runs in the verification child (:mod:`onnxfold.isolation`); onnxruntime is imported only
there, and in the provider check's child."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from .. import isolation
from ..errors import ChildFailed, ExposureRefused, VerifyError, first_line
from ..protobuf import PROTOBUF_LIMIT
from ..tensors import is_utf8, utf8_folder
from .reference import run_reference

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def check_providers(providers, *, available: bool = True) -> list[str]:
    """The providers named ("cpu,cuda" or a list), checked before any work: each known and, with
    ``available``, each one other than the CPU available in this onnxruntime build. onnxruntime is
    asked in a child process unless it is already imported (verification forks from a parent that
    has not imported it: :mod:`onnxfold.isolation`)."""
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    providers = list(providers)
    if not providers:
        raise VerifyError("--providers names no provider; choose from " + ", ".join(PROVIDERS))
    for p in providers:
        if p not in PROVIDERS:
            raise VerifyError(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    wanted = [PROVIDERS[p] for p in providers if p != "cpu"]
    if wanted and available:
        try:
            found = available_providers() if "onnxruntime" in sys.modules else isolation.call(_available_in_child)
        except ChildFailed as e:
            raise VerifyError(f"cannot list onnxruntime's providers: {e}") from None
        for name in wanted:
            if name not in found:
                raise VerifyError(f"{name} is not available in this onnxruntime build (available: "
                                  f"{', '.join(found)})")
    return providers


def available_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError as e:
        raise VerifyError(f"cannot import onnxruntime: {first_line(e)}") from None
    return list(onnxruntime.get_available_providers())


def _available_in_child(send) -> list[str]:
    """The provider check's child (this process has not imported onnxruntime: verification forks)."""
    send(("stage", "onnxruntime", "listing its providers"))
    return available_providers()


@dataclass(frozen=True)
class Joined:
    """A model file with bytes appended (extra outputs, forced branches: :func:`ort_source`)."""

    path: str
    extra: bytes


# Linux: a model file with bytes appended is handed to onnxruntime as a path, a memory file (memfd) the
# file is copied into by the kernel: onnxruntime reads a path about twice as fast as the same model as
# bytes, which Python reads, joins and hands over in copies (ResNet-50, 103 MB: 0.35 s -> 0.2 s a model).
MEMORY_FILES = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextmanager
def _memory_file(joined: Joined) -> Iterator[str]:
    """``joined`` as a path onnxruntime can open, for as long as the block runs."""
    fd = os.memfd_create("onnxfold-model", os.MFD_CLOEXEC)
    try:
        with open(joined.path, "rb") as src:
            size, done = os.fstat(src.fileno()).st_size, 0
            while done < size:
                sent = os.sendfile(fd, src.fileno(), done, size - done)
                if not sent:
                    raise OSError(f"{joined.path}: changed while it was read")
                done += sent
        view = memoryview(joined.extra)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def session(source, data_dir: str | None = None, *, provider: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    # one run per session, beside the parent's onnx.checker: idle threads sleep instead of spinning on a core
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(source, str) and not is_utf8(source):  # onnxruntime takes a path in UTF-8 only
        source, data_dir = Path(source).read_bytes(), os.path.dirname(os.path.abspath(source))
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    with ExitStack() as stack:
        if isinstance(source, Joined):  # its external data, from the model file's own folder (as bytes did)
            data_dir = str(Path(source.path).resolve().parent)
            source = stack.enter_context(_memory_file(source))
        if data_dir is not None:  # a model given as bytes reads its external data from its own folder
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        stack.enter_context(utf8_folder(data_dir)))
        sess = ort.InferenceSession(source, so, providers=providers)
    active = sess.get_providers()
    if not active or active[0] != PROVIDERS[provider]:
        raise VerifyError(f"onnxruntime did not activate {PROVIDERS[provider]} (active: {', '.join(active)})")
    return sess


def extra_outputs(expose) -> bytes:
    """Graph outputs to append to a serialized model: concatenated protobuf messages merge, and a
    repeated field appends, so ``model bytes + these bytes`` is the model with the extra outputs.
    ``expose``: [(name, elem type, or None: onnxruntime infers it)]."""
    if not expose:
        return b""
    return onnx.ModelProto(graph=onnx.GraphProto(
        output=[helper.make_tensor_value_info(name, elem, None) if elem is not None
                else helper.make_empty_tensor_value_info(name) for name, elem in expose])).SerializeToString()


def ort_source(model, expose=(), nodes: bytes = b""):
    """(what onnxruntime loads: a path, bytes or a :class:`Joined`; the folder of its external data when
    that is given as bytes).
    ``nodes``: a serialized ``ModelProto(graph=...)`` to append (the forced If copies of planning)."""
    extra = extra_outputs(expose) + nodes
    if isinstance(model, (str, os.PathLike)):
        if not extra:
            return str(model), None
        if MEMORY_FILES:
            return Joined(os.fspath(model), extra), None
        return Path(model).read_bytes() + extra, str(Path(model).resolve().parent)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    if len(data) + len(extra) > PROTOBUF_LIMIT:
        raise VerifyError("the model is over 2 GiB: save it with external data and verify the file")
    return data + extra, None


def _run_session(sess, feeds, which: str) -> dict:
    try:
        outs = sess.run(None, feeds)
    except Exception as e:
        raise VerifyError(f"onnxruntime cannot run the {which} model on these inputs: {str(e).splitlines()[0]} "
                          + " ".join(str(e).splitlines()[1:4])) from None
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def no_kernel(err: Exception | str) -> bool:
    """Whether onnxruntime refused a model for want of a kernel (float64 Conv, bfloat16 Conv-22 on the
    CPU): a valid model, which onnx.reference runs. A type error (a float64 weight in a float32 Conv, a
    bfloat16 Conv before opset 22) is not: such a model is invalid (:func:`invalid`)."""
    text = str(err)
    return "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text


def invalid(which: str, err: Exception | str) -> VerifyError:
    """The error for a model onnxruntime refuses for another reason than a missing kernel."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Type Error" in text and which == "original":
        return VerifyError("the input is not a valid ONNX model (onnxruntime: " + text[text.index("Type Error"):] + ")")
    return VerifyError(f"onnxruntime cannot load the {which} model: {text}")


def _check_exposure(model, expose, provider, err, nodes: bytes = b"") -> None:
    if not expose and not nodes:
        return
    try:
        session(*ort_source(model), provider=provider)
    except Exception:
        return  # it fails without them too: the caller reports that
    raise ExposureRefused(str(err).splitlines()[0][:200])


def run_alone(reference, feeds, provider: str, expose, stage, timings: dict[str, float]) -> dict | None:
    """The original alone, with ``expose`` as extra outputs, before the plan is known (the early run of
    :func:`onnxfold.verification.job.early_reference`): its outputs, or None when onnxruntime refuses it
    so (the planned run then says why, or runs it in onnx.reference)."""
    spent = _Stopwatch(timings)
    if provider not in PROVIDERS:
        return None
    stage("loading onnxruntime")
    import onnxruntime as ort

    spent("import_s")
    if PROVIDERS[provider] not in ort.get_available_providers():
        return None
    stage("loading the original model")
    try:
        sess = session(*ort_source(reference, expose), provider=provider)
    except Exception:  # noqa: BLE001 - whatever it is, the planned run meets it again and says it
        return None
    spent("session_original_s")
    stage("running the original model")
    try:
        out = _run_session(sess, feeds, "original")
    except VerifyError:
        return None
    spent("run_original_s")
    return out


def run_pair(reference, candidate, feeds, provider: str, expose=(),
             stage=lambda text: None, nodes: tuple[bytes, bytes] = (b"", b""),
             timings: dict[str, float] | None = None, *,
             reference_outputs: dict | None = None) -> tuple[dict, dict, str, str]:
    """Run both models on one provider, with the tensors ``expose`` ([(name, elem_type)]) as extra
    outputs and ``nodes`` (reference's, candidate's) appended to their graphs. Returns (reference outputs,
    candidate outputs, engine, note). ``stage`` is told what runs next, so that a crash can be named;
    ``timings`` gets the seconds of each part (import_s, session_original_s, run_original_s, wait_s,
    session_folded_s, run_folded_s). The original is loaded and run first, its session freed, and only
    then the folded model read: in the child of ``isolation.call(first=...)`` the folded model is
    written meanwhile (``wait_s``: the wait for it). ``reference_outputs``: the original's outputs, run
    already with this exposure (:func:`run_alone`); it is not run again. Runs onnxruntime in this
    process: :func:`verify` calls it in a child process.
    """
    spent = _Stopwatch(timings)
    if provider not in PROVIDERS:
        raise VerifyError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    stage("loading onnxruntime")
    import onnxruntime as ort

    spent("import_s")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise VerifyError(
            f"{PROVIDERS[provider]} is not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    if reference_outputs is not None:
        ref = reference_outputs
    else:
        stage("loading the original model")
        ref_sess, error = _load(reference, expose, nodes[0], provider)
        if error is not None:
            if provider == "cpu" and no_kernel(error):
                note = "onnxruntime has no CPU kernel for this model: " + str(error).splitlines()[0][:160]
                stage("running the original model in onnx.reference")
                ref = run_reference(reference, feeds, expose, nodes[0])
                _wait_for_candidate(stage)
                stage("running the folded model in onnx.reference")
                return ref, run_reference(candidate, feeds, expose, nodes[1]), "onnx.reference", note
            raise invalid("original", error)
        spent("session_original_s")
        stage("running the original model")
        ref = _run_session(ref_sess, feeds, "original")
        del ref_sess  # one session at a time
        spent("run_original_s")
    _wait_for_candidate(stage)
    spent("wait_s")
    stage("loading the folded model")
    cand_sess, error = _load(candidate, expose, nodes[1], provider)
    if error is not None:
        raise invalid("folded", error)
    spent("session_folded_s")
    stage("running the folded model")
    cand = _run_session(cand_sess, feeds, "folded")
    spent("run_folded_s")
    engine = "onnxruntime " + ",".join(cand_sess.get_providers())
    return ref, cand, engine, ""


def _wait_for_candidate(stage) -> None:
    """The folded model may still be being written when the original runs (:func:`isolation.wait_first`)."""
    stage("waiting for the folded model to be written")
    isolation.wait_first()


def _load(model, expose, nodes: bytes, provider: str):
    """(a session of ``model`` with the extra outputs and nodes, None) or (None, why onnxruntime refused
    it); ExposureRefused when it loads only without them."""
    try:
        return session(*ort_source(model, expose, nodes), provider=provider), None
    except VerifyError:
        raise
    except Exception as e:
        _check_exposure(model, expose, provider, e, nodes)
        return None, e


class _Stopwatch:
    """``spent(name)``: the seconds since the last call (or since it was made) added to ``timings[name]``."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now
