"""Where an output may go: the files an input reads, collisions, fresh data names, the report's path.

The rule: no file onnxfold writes may be a file the input reads or another output (real paths, after
symlinks). A user's own choice that would break that (``--data-name`` naming the input's data file, or
the output's own name; ``--report`` naming a model or data file) is refused before any work. The default
data name never is: when ``OUT.data`` is a file the input or the model now at ``OUT`` still reads, the
new data goes under a fresh name (``OUT.1.data``), so the commit can swap the model in one rename.
``OUT`` and the report are a new path or a regular file (or a link to one): never a device, a FIFO or a
socket (:func:`check_target`). Which old data files the commit removes is decided after the model's
rename, under the output's lock (:meth:`OutputPlan.stale_now`): none that the model now at ``OUT``, the
input or another model beside them reads.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import stat
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper

from .commit import folder_of, own_name, umask
from .errors import InputError
from .protobuf import parse_in_place
from .tensors import every_tensor, is_utf8, utf8_name

log = logging.getLogger("onnxfold")


def real(path) -> Path:
    """The path with every symlink resolved (also of a file that does not exist yet)."""
    return Path(os.path.realpath(path))


def data_files(model: onnx.ModelProto, model_path) -> set[Path]:
    """Real paths of the external data files ``model`` (at ``model_path``) reads."""
    base = Path(model_path).parent
    locations = set()
    for tensor in every_tensor(model):
        if external_data_helper.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return {real(base / location) for location in locations}  # each resolved once: every tensor names one


def files_of(path) -> set[Path]:
    """What the model at ``path`` reads (itself and its data files); empty when it is not a readable model.
    Read without parsing its weights (:func:`onnxfold.protobuf.parse_in_place`): every rerun onto an
    existing OUT asks, and ResNet-50's 103 MB took 0.1 s to parse, 0.04 s to scan for a location."""
    path = Path(path)
    if not path.is_file():
        return set()
    try:
        if is_utf8(path.name):
            with open(path, "rb") as fh:
                model, _ = parse_in_place(fh.fileno(), 0, path.name)  # its weights: itself
        else:  # a location names it in UTF-8 only: parsed whole
            model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model: nothing of it to keep consistent
        return {real(path)}
    return {real(path)} | data_files(model, path)


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def check_target(path, what: str = "") -> None:
    """``path`` may be written by a rename: it is absent or a regular file (or a link to one). A device,
    a FIFO, a socket (``/dev/null``, ``/dev/stdout``) would be replaced by a file: refused, one line."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # absent (or a dangling link, which the rename replaces)
    except OSError:
        return  # the checks that follow say what is wrong with it
    if stat.S_ISREG(mode) and _descriptor_link(path):  # /dev/stdout with the output redirected to a file
        raise InputError(f"{what + ' ' if what else ''}{path}: is a link to one of this process's open files (as "
                         f"/dev/stdout is); onnxfold writes only a new path or a regular file"
                         f"{' (--report - writes it to standard output)' if what == '--report' else ''}")
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # a directory: the checks that follow say so
        return
    kind = next((text for test, text in _KINDS if test(mode)), "not a regular file")
    link = f"a link to {kind} ({real(path)})" if os.path.islink(path) else kind
    hint = " (--report - writes it to standard output)" if what == "--report" else ""
    raise InputError(f"{what + ' ' if what else ''}{path}: is {link}; onnxfold writes only a new path or a regular "
                     f"file{hint}")


def _descriptor_link(path) -> bool:
    """Whether ``path`` is, or leads by links through, /proc or /dev/fd (``/dev/stdout`` and the like)."""
    p = os.path.abspath(path)
    for _ in range(40):
        if p.startswith(("/proc/", "/dev/fd/")):
            return True
        if not os.path.islink(p):
            return False
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return False


def read_by_others(folder: Path, exclude: AbstractSet[Path], files: AbstractSet[Path]) -> dict[Path, Path]:
    """Which of ``files`` the models (``*.onnx``) in ``folder`` other than ``exclude`` read: each with the
    first model that reads it. A model whose bytes do not name one of them is not parsed."""
    out: dict[Path, Path] = {}
    names = [os.fsencode(f.name) for f in files]
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return out
    for entry in entries:
        if not entry.name.endswith(".onnx") or not entry.is_file() or real(entry.path) in exclude \
                or not _mentions(entry.path, names):
            continue
        for f in (files_of(entry.path) - {real(entry.path)}) & files:
            out.setdefault(f, Path(entry.path))
    return out


def _mentions(path: str, names: list[bytes]) -> bool:
    """Whether the file's bytes contain one of ``names`` (a data file's location is stored as it is)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return False
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return any(m.find(n) != -1 for n in names)
    except (OSError, ValueError):
        return True  # cannot tell: parse it


@dataclass
class OutputPlan:
    """Where one model's output goes. ``data_name`` is the data file's name beside ``OUT`` (used when the
    output has external data); ``mode`` the permission bits of every file written; ``stale`` the old data
    files of the model now at ``OUT`` that the commit may remove once the new model is in place
    (:meth:`stale_now` decides); ``family`` the default data names (``OUT.data``, ``OUT.<n>.data``),
    which are removed too once no model reads them; ``keep`` what must survive (the input's files, the
    other models of a folder run)."""

    dst: Path
    data_name: str
    mode: int
    stale: set[Path] = field(default_factory=set)
    family: re.Pattern | None = None
    keep: frozenset[Path] = frozenset()

    def stale_now(self) -> set[Path]:
        """The old data files to remove now, with the new model at ``OUT`` (called under the output's
        lock, after the rename): the planned ones and unused ``OUT.<n>.data``, less every file that the
        model now at ``OUT``, the input, or another model beside ``OUT`` reads (that one is kept, and a
        warning says so)."""
        folder = real(folder_of(self.dst))
        candidates = set(self.stale)
        if self.family is not None:
            try:
                candidates |= {real(e.path) for e in os.scandir(folder)
                               if self.family.match(e.name) and e.is_file(follow_symlinks=False)}
            except OSError:
                pass
        candidates -= self.keep | {real(folder / self.data_name)}  # never the data file just written
        if candidates:  # what the model now at OUT reads, read again under the lock
            candidates -= files_of(self.dst)
        if not candidates:
            return set()
        others = read_by_others(folder, {real(self.dst)}, candidates)
        for f in sorted(candidates & others.keys()):
            log.warning("kept %s: %s reads it too", f.name, others[f])
        return candidates - others.keys()


def plan_output(src: Path, reads: set[Path], dst: Path, data_name: str | None, *,
                protect: AbstractSet[Path] = frozenset(), shared_folder: bool = False) -> OutputPlan:
    """Check ``dst`` and choose its data file's name, before any work.

    ``reads``: real paths of the input and its data files. ``protect``: other files that must survive
    (folder mode: every other model). ``shared_folder``: the output folder is also an input folder, so an
    existing file there may belong to another model: it is never overwritten nor removed.
    """
    folder = folder_of(dst)
    check_target(dst)
    if own_name(dst.name) or (data_name and own_name(data_name)):
        raise InputError(f"{dst}: names like {dst.name if own_name(dst.name) else data_name!r} are onnxfold's own "
                         "lock and temporary files: choose another name")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{dst}: the folder {folder} does not exist (that path is a file)")
    if dst.is_dir():
        raise InputError(f"{dst}: is a directory")
    if len(os.fsencode(dst.name)) > 240:
        raise InputError(f"{dst}: the file name is too long (at most 240 bytes: the data file and temporary names "
                         "add to it)")
    out = real(dst)
    if out in reads - {real(src)}:
        raise InputError(f"{dst}: the input reads that file (its external data): choose another output")
    if out in protect:
        raise InputError(f"{dst}: another model in this run reads that file: choose another output")
    # the model now at OUT, which must stay whole until the new one replaces it (in place: the input)
    old = reads if out == real(src) else files_of(dst)
    busy = reads | old | set(protect)
    if data_name:
        chosen = folder / data_name
        where = real(chosen)
        if where == out:
            raise InputError(f"--data-name {data_name!r} is the output's own file name")
        if where in reads:
            raise InputError(f"--data-name {data_name!r}: the input reads that file, so writing it would destroy the "
                             "input; choose another name")
        if where in protect:
            raise InputError(f"--data-name {data_name!r}: another model in this run reads that file")
    else:
        chosen = folder / (utf8_name(dst.name) + ".data")  # the model names it: valid UTF-8
    if chosen.is_dir():
        raise InputError(f"{chosen}: the data file name is an existing directory")
    special = chosen.exists() and not chosen.is_file()  # a device, a FIFO, a socket: never replaced
    if special and data_name:
        check_target(chosen, "--data-name")
    name = chosen.name
    taken = real(chosen) in busy or special or (shared_folder and chosen.exists())
    if not taken and chosen.exists():  # a file another model beside OUT reads is never overwritten
        readers = read_by_others(real(folder), {out, real(src)}, {real(chosen)})
        if readers and data_name:
            raise InputError(f"--data-name {data_name!r}: {next(iter(readers.values()))} reads that file")
        taken = bool(readers)
    if taken:
        name = fresh_name(folder, chosen.name, busy)
        log.debug("data file %s: %s is in use", folder / name, chosen.name)
    if dst.exists():
        mode = dst.stat().st_mode & 0o7777  # in place: a private model stays private
    else:
        mode = 0o666 & ~umask()
    stale = set()
    family = None
    keep = frozenset((reads if real(src) != out else set()) | set(protect))
    if not shared_folder and not dst.is_symlink():  # a link is replaced, its target (not ours) stays
        pattern = _family(chosen.name)
        stale = {p for p in old - {out} - keep if pattern.match(p.name) and p.parent == real(folder)}
        stale.discard(real(folder / name))
        if not data_name:
            family = pattern
    return OutputPlan(dst, name, mode, stale, family, keep)


def _family(name: str) -> re.Pattern:
    """``m.onnx.data`` and its fresh variants ``m.onnx.1.data``, ``m.onnx.2.data``, ..."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        return re.compile(re.escape(name) + r"(\.\d+)?$")
    return re.compile(re.escape(stem) + r"(\.\d+)?" + re.escape("." + suffix) + "$")


def fresh_name(folder: Path, name: str, busy: set[Path]) -> str:
    stem, dot, suffix = name.rpartition(".")
    for n in range(1, 10_000):
        candidate = f"{stem}.{n}.{suffix}" if dot and stem else f"{name}.{n}"
        path = folder / candidate
        if not path.exists() and not path.is_symlink() and real(path) not in busy:
            return candidate
    raise InputError(f"{folder / name}: no free name for the data file beside it")


def check_report(report, reads_and_writes: set[Path]) -> None:
    """``--report``: not a model or data file, and writable; checked before any work."""
    path = Path(report)
    check_target(path, "--report")
    if own_name(path.name):
        raise InputError(f"--report {report}: names like that are onnxfold's own lock and temporary files")
    where = real(path)
    if where in reads_and_writes:
        raise InputError(f"--report {report}: that file is an input or output of this run; choose another name")
    folder = folder_of(path)
    if not folder.is_dir():
        raise InputError(f"--report {report}: the folder {folder} does not exist")
    if path.is_dir():
        raise InputError(f"--report {report}: is a directory")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--report {report}: not writable")
