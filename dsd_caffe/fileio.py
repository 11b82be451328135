"""Crash-safe file I/O: atomic writes, guarded outputs, one writer per output, prototxt/caffemodel reading with
clear errors, and the JSON provenance file written beside every model. (One module past 400 lines: every rule about
what may be written where lives here, so every tool follows the same ones.)

Rules every tool follows through this module:

- Every writer writes to a temporary name in the destination folder and renames at the end
  (:func:`atomic_path`), so a crash, a refusal or a full disk never leaves a truncated output under the real
  name, and a refused input leaves no folder made for the output (:func:`check_output` makes none). A tool that
  writes several files stages them in one temporary folder renamed into place (``atomic_path(...,
  directory=True)``): afterwards the folder holds the old output or the new one, whole.
- Only regular files and folders are ever replaced: a device, FIFO or socket at an output path is refused, also
  with ``--force`` (:func:`check_output`), and so is an output that is, holds or lies inside an input
  (:func:`check_apart`). ``--force`` replaces a folder only when it holds nothing but what the tool itself writes,
  as the tool declares once (its owned names: :func:`check_replaceable`; :func:`clear_owned` for a run's folder).
- Inputs are regular files (:func:`require_file`): a device, FIFO or socket given as an input (``/dev/zero``
  never ends) is refused.
- One writer per output (:func:`output_lock`): a second process writing the same output, or anything inside it,
  is refused with one line naming the live pid; the lock goes with the process, however it ends.
- Every refusal is a UserError (:mod:`dsd_caffe.errors`); a write the disk or the file system refuses (full, over
  quota, read-only, not permitted) is one too, naming the output (:func:`write_errors`). Any other OSError is a
  bug and keeps its traceback.
"""
import contextlib
import csv
import errno
import fcntl
import fnmatch
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time

from .caffeproto import caffe_pb2
from .errors import AccessDenied, DiskFull, InputMissing, OutputExists, UserError

log = logging.getLogger(__name__)


def _check_kind(path):
    """Refuse a path that exists and is neither a regular file nor a folder (devices, FIFOs, sockets)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there, a dangling link, or a file where a folder should be (check_output says so)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError(f"output {path} is {_kind(mode)}; only regular files and folders are written or replaced, "
                        "also with --force")


def _kind(mode):
    return ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")


def check_output(path, force=False):
    """Refuse to overwrite ``path`` unless ``force``, and refuse anything but a regular file or folder even then;
    check its folder is writable, or can be made (nothing is made here: a check leaves no folder behind).
    Returns ``path``."""
    path = os.fspath(path)
    _check_kind(path)
    if os.path.lexists(path) and not force:
        raise OutputExists(f"{path} already exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    missing = _missing_folders(folder)
    existing = os.path.dirname(missing[-1]) if missing else folder
    # A real write probe: root ignores permission bits, and a read-only file system or a file in the way
    # only shows when writing.
    try:
        if not os.path.isdir(existing):
            _check_kind(existing)  # a device or FIFO in the way is named as such
            what = (f"a symbolic link to {os.readlink(existing)}, which does not exist" if os.path.islink(existing)
                    else "a file, not a folder")
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is {what}")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-test-"))
    except OSError as e:
        raise AccessDenied(f"output folder {folder} is not writable ({e.strerror or e})") from e
    return path


#: the errno of a write that the disk or the file system refuses: no space, no quota, read-only, not permitted
_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)


def refused_write(e, path):
    """The UserError for OSError ``e`` met writing ``path`` when the disk or the file system refused the write
    (:class:`DiskFull`, :class:`AccessDenied`, naming the file, or ``path`` when the error names none); None for
    any other OSError, a bug."""
    where = _as_output(os.fspath(e.filename), os.fspath(path)) if e.filename else os.fspath(path)
    if e.errno in _FULL:
        return DiskFull(e.errno, e.strerror, where)
    if e.errno in _DENIED:
        return AccessDenied(f"{where} is not writable ({e.strerror})")
    return None


def _as_output(name, path):
    """``name`` as the user knows it: a file inside :func:`atomic_path`'s staging temporary of ``path`` is named
    where it will land (``out/x``, not ``.out.tmp-123-ab/x``)."""
    staging = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp-")
    if not name.startswith(staging):
        return name
    inside = name[len(staging):].partition(os.sep)[2]
    return os.path.join(path, inside) if inside else path


@contextlib.contextmanager
def write_errors(path):
    """Turn an OSError of the block that :func:`refused_write` calls the disk's or the file system's into its
    UserError naming ``path`` (the original is its cause); any other exception passes unchanged."""
    try:
        yield
    except OSError as e:
        if isinstance(e, UserError):
            raise
        refusal = refused_write(e, path)
        if refusal is None:
            raise
        raise refusal from e


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


@contextlib.contextmanager
def atomic_path(path, force=True, directory=False):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it.

    With ``directory=True`` the temporary path is an empty folder (for LMDBs and run folders).
    """
    path = os.path.abspath(os.fspath(path))
    check_output(path, force=force)
    with write_errors(path):
        yield from _staged(path, directory)


def _staged(path, directory):
    """The body of :func:`atomic_path`, which delegates to it (``yield from``: the block's exception too)."""
    folder = os.path.dirname(path)
    made = _missing_folders(folder)
    os.makedirs(folder, exist_ok=True)
    prefix = "." + os.path.basename(path) + ".tmp-"
    _remove_stale(folder, prefix)
    tmp = tempfile.mkdtemp(dir=folder, prefix=f"{prefix}{os.getpid()}-")
    if directory:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a finished folder gets the usual mode
    else:
        os.rmdir(tmp)
    try:
        yield tmp
        _check_kind(path)  # something may have appeared there while the temporary was written
        aside = None
        if directory and os.path.isdir(path) and not os.path.islink(path):
            aside = tempfile.mkdtemp(dir=folder, prefix=f"{prefix}{os.getpid()}-old-")
            os.replace(path, aside)  # the old folder leaves only when the new one is complete
        os.replace(tmp, path)
        _fsync_dir(folder)
        if aside:
            _remove(aside)
    except BaseException:
        _remove(tmp)
        _rmdirs(made)  # the folders made for it, when empty
        raise


def check_apart(output, inputs):
    """Refuse an ``output`` that is one of the ``inputs`` (None entries are skipped), a folder holding one, or a
    path inside one (an image folder): writing or replacing it would destroy or change that input, also with
    ``--force``. Symbolic links are followed."""
    out = os.path.realpath(os.fspath(output))
    for given in inputs:
        if given is None:
            continue
        real = os.path.realpath(os.fspath(given))
        if real == out or real.startswith(out + os.sep) or out.startswith(real + os.sep):
            how = "is" if real == out else "holds" if real.startswith(out + os.sep) else "is inside"
            raise UserError(f"output {os.fspath(output)} {how} the input {os.fspath(given)}; writing it would "
                            "destroy or change that input, also with --force: use another --output")


def check_replaceable(folder, owned, force, tool):
    """Refuse to replace ``folder`` unless it is absent, empty, or (with ``force``) holds nothing but entries
    matching the ``owned`` names or patterns, the files ``tool`` itself writes. Returns the folder's path."""
    folder = os.path.abspath(os.fspath(folder))
    _check_kind(folder)
    if not os.path.lexists(folder):
        return folder
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise OutputExists(f"output {folder} exists and is not a folder")
    entries = sorted(os.listdir(folder))
    if not entries:
        return folder
    foreign = [e for e in entries if not owns(owned, e)]
    if foreign:
        raise OutputExists(f"output folder {folder} holds {foreign[0]!r}, which {tool} did not write; "
                           "refusing to replace it, also with --force (use another --output)")
    if not force:
        raise OutputExists(f"output folder {folder} already holds output of {tool}; pass --force to replace it")
    return folder


def owns(owned, entry):
    """True when ``entry`` (a name in an output folder) matches one of the ``owned`` names or patterns, or is the
    lock file (:func:`lock_path`) or a staging leftover (:func:`atomic_path`) of one: what a tool declares it writes
    is all that ``--force`` may replace."""
    aside = re.fullmatch(r"\.(.+?)(\.lock|\.tmp-.*)", entry)
    return any(fnmatch.fnmatchcase(entry, pat) or aside and fnmatch.fnmatchcase(aside.group(1), pat)
               for pat in owned)


def clear_owned(folder, owned, tool, keep=()):
    """``--force`` on a resumable output (a run, the demo): refuse ``folder`` when it holds anything ``tool`` did
    not write (:func:`check_replaceable`'s rule and message), then remove what it owns but ``keep``. Nothing is
    removed before the whole folder is checked."""
    folder = check_replaceable(folder, owned, True, tool)
    if not os.path.isdir(folder):
        return folder
    for name in sorted(os.listdir(folder)):
        if not any(fnmatch.fnmatchcase(name, pat) for pat in keep):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    return folder


# ------------------------------------------------------------------------------------------------ locks
_held = {}  # lock path -> [open file, depth]: a process may take its own lock again (nested phases)
_held_guard = threading.Lock()


def lock_path(output):
    """The lock file of an output: ``.<name>.lock`` beside it, so it exists before the output does and
    survives the output's replacement."""
    output = os.path.abspath(os.fspath(output))
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.lock")


@contextlib.contextmanager
def output_lock(output):
    """Hold the exclusive lock of ``output`` (a file or folder) while the block runs. A second process is refused
    with a UserError naming the pid that holds it, and so is an ``output`` inside the output another live process
    holds (a run holds its whole tree). The lock is an ``flock``: it goes with the process, also on SIGKILL (then
    the small lock file stays until the next holder leaves). On leaving, the lock file goes, and when the lock had
    to make the folders it sits in and the output never appeared (a refused input), those folders go too, so a
    refusal leaves no folder behind. A device, FIFO or socket at ``output`` is refused before a lock file is made
    beside it."""
    _check_kind(output)
    path = lock_path(output)
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            entry = _held[path]
        else:
            entry = None
    if entry is None:
        folder = os.path.dirname(path)
        made = _missing_folders(folder)
        while True:
            try:
                os.makedirs(folder, exist_ok=True)
                f = open(path, "a+")
            except OSError as e:
                raise AccessDenied(f"output folder {folder} is not writable ({e.strerror or e})") from e
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = _holder(f)
                f.close()
                # from None: the flock's EWOULDBLOCK says no more than the message
                raise UserError(f"{os.path.abspath(os.fspath(output))} is in use by another dsd-caffe process "
                                f"(pid {pid}); wait for it to end, or use another --output") from None
            if _same_file(f, path):
                break
            f.close()  # its holder removed it on leaving (see below): lock the lock file there now
        try:
            with write_errors(path):
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()}\n")
                f.flush()
        except OSError:  # a full disk (now a DiskFull): the lock file goes as on leaving
            _unmake(path, made)
            with contextlib.suppress(OSError):
                f.close()  # its buffered pid cannot be written either
            raise
        with _held_guard:
            entry = _held[path] = [f, 1]
        try:
            _check_enclosing(output)
        except BaseException:
            _release(path, entry, made, output)
            raise
    else:
        made = []
    try:
        yield path
    finally:
        _release(path, entry, made, output)


def _release(path, entry, made, output):
    """Leave one level of a held lock; the last one removes the lock file (still holding the lock: a process
    waiting on the old file sees it gone and locks a new one) and the folders made for it when the output never
    appeared."""
    with _held_guard:
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            if _same_file(entry[0], path):
                _unmake(path, made if not os.path.lexists(output) else [])
            entry[0].close()


def _holder(f):
    """The pid written in a lock file whose lock another process holds. It writes its pid just after it takes
    the lock: an empty file is read again for a moment before the pid is called unknown."""
    for _ in range(50):
        f.seek(0)
        pid = f.read().strip()
        if pid:
            return pid
        time.sleep(0.02)
    return "unknown"


def _check_enclosing(output):
    """Refuse ``output`` when it lies inside the output of another live process (a DSD run holds its whole
    tree: a tool writing into one of its phase folders would change the run behind its record). The locks of this
    process and of its parent (a run's seed worker) are its own."""
    output = os.path.abspath(os.fspath(output))
    folders, folder = [], os.path.dirname(output)
    for start in {folder, os.path.realpath(folder)}:
        while os.path.dirname(start) != start:
            folders.append(start)
            start = os.path.dirname(start)
    for folder in dict.fromkeys(folders):
        lock = lock_path(folder)
        with _held_guard:
            if lock in _held:
                continue
        try:
            f = open(lock)
        except OSError:
            continue  # no lock there (or none this process may read)
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue
            except OSError:
                pid = _holder(f)
        if pid != str(os.getppid()):
            raise UserError(f"{output} lies inside {folder}, the output of a live dsd-caffe process (pid {pid}); "
                            "a run holds its whole folder: wait for it to end, or use another --output")


def _missing_folders(folder):
    """The folders of ``folder``'s path that do not exist yet, deepest first (the last one's parent exists, as a
    folder or as something in the way)."""
    missing = []
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _same_file(f, path):
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _unmake(lock, folders):
    """Remove a lock file and the (empty) folders made for it, while the lock is still held."""
    try:
        os.unlink(lock)
    except OSError:
        return
    _rmdirs(folders)


def _rmdirs(folders):
    """Remove ``folders`` (deepest first) while they are empty."""
    try:
        for folder in folders:
            os.rmdir(folder)
    except OSError:
        pass  # something else appeared there meanwhile: it stays


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(folder, prefix):
    """Delete temporaries ``<prefix><pid>-*`` whose writer process is gone (killed mid-write), and the temporaries
    of such a temporary (``.<prefix><pid>-*``: a file written atomically into a staged path)."""
    for name in os.listdir(folder):
        own = next((p for p in (prefix, "." + prefix) if name.startswith(p)), None)
        pid = name[len(own):].split("-", 1)[0] if own else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.info("removing %s, left by the killed process %s", os.path.join(folder, name), pid)
            _remove(os.path.join(folder, name))


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, data, force=True):
    """Write ``data`` (bytes or str) to ``path`` atomically (temporary file, fsync, rename)."""
    mode = "wb" if isinstance(data, (bytes, bytearray)) else "w"
    with atomic_path(path, force=force) as tmp:
        with open(tmp, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return os.fspath(path)


def csv_text(rows):
    """Rows (lists of values) as CSV text with ``\n`` line ends."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_json(path, obj, force=True):
    """Write ``obj`` as strict JSON: a NaN or infinity is a bug here (record ``None`` and a reason instead), so
    it raises ValueError rather than writing a file most JSON readers refuse."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", force=force)


def read_json(path):
    path = os.fspath(path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        # from None: the message holds all the JSONDecodeError says
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def sidecar_path(model_path):
    """The provenance JSON that sits beside a model: ``X.caffemodel`` -> ``X.caffemodel.json``."""
    return os.fspath(model_path) + ".json"


def write_provenance(model_path, *, source, densities, phase, iteration, seed, force=True, **extra):
    """Write the small self-describing JSON beside ``model_path``.

    ``densities`` maps layer name to the fraction of non-zero weights kept.
    """
    record = {
        "model": os.path.basename(os.fspath(model_path)),
        "source": source,
        "phase": phase,
        "iteration": int(iteration),
        "seed": seed,
        "density": {k: float(v) for k, v in densities.items()},
    }
    record.update(extra)
    return write_json(sidecar_path(model_path), record, force=force)


def file_digest(path, algorithm="sha256", prefix=b""):
    """The hex digest of a file's bytes (after ``prefix``): ``sha256`` for records, git's blob id with
    ``algorithm="sha1", prefix=b"blob <size>\\0"``."""
    h = hashlib.new(algorithm, prefix)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require_file(path, what):
    """``path`` when it is a readable regular file; a missing path, a folder, or a device, FIFO or socket (an
    input that may never end, such as /dev/zero) is refused naming it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputMissing(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} is {_kind(os.stat(path).st_mode)}, not a regular file; inputs are read "
                        "from regular files only")
    if not os.access(path, os.R_OK):
        raise AccessDenied(f"{what} {path} is not readable")
    return path


def parse_prototxt(text, message, name="<string>"):
    """Parse prototxt ``text`` into ``message``; a syntax error becomes ValueError naming line and column."""
    from google.protobuf import text_format  # deferred: fileio imports without protobuf (dsd_caffe.info)

    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        line, col = getattr(e, "GetLine", lambda: None)(), getattr(e, "GetColumn", lambda: None)()
        where = f"{name}:{line}:{col}" if line else name
        msg = str(e).split(" : ", 1)[-1] if line else str(e)
        raise UserError(f"{where}: prototxt syntax error: {msg}") from None  # the ParseError's whole message


def _read_prototxt_text(path, what):
    """The text of the prototxt at ``path``; a binary file (a caffemodel given as a prototxt) is refused by name."""
    path = require_file(path, what)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return path, data.decode("utf-8")
    except UnicodeDecodeError as e:
        # from None: the message names the byte the UnicodeDecodeError names
        raise UserError(f"{what} {path} is not a text prototxt (byte {e.start} is not UTF-8 text; "
                        f"a binary caffemodel or solverstate?)") from None


def read_net_prototxt(path):
    """Read a NetParameter prototxt with a clear error on a missing file or a syntax error."""
    path, text = _read_prototxt_text(path, "prototxt")
    return parse_prototxt(text, caffe_pb2().NetParameter(), path)


def read_solver_prototxt(path):
    path, text = _read_prototxt_text(path, "solver prototxt")
    return parse_prototxt(text, caffe_pb2().SolverParameter(), path)


def write_prototxt(path, message, force=True):
    """Write a protobuf message as prototxt, atomically."""
    from google.protobuf import text_format  # deferred: fileio imports without protobuf (dsd_caffe.info)

    return atomic_write(path, text_format.MessageToString(message), force=force)


def read_caffemodel(path):
    """Read a binary caffemodel into a NetParameter, refusing empty, truncated or corrupted files."""
    from google.protobuf.message import DecodeError  # deferred: fileio imports without protobuf (dsd_caffe.info)

    path = require_file(path, "caffemodel")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise UserError(f"caffemodel {path} is empty")
    net = caffe_pb2().NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as e:
        _refuse_solverstate(path, data)
        raise UserError(f"caffemodel {path} is truncated or corrupted ({e})") from None  # (e) is all it says
    if not any(len(l.blobs) for l in net.layer) and not any(len(l.blobs) for l in net.layers):
        _refuse_solverstate(path, data)
        raise UserError(f"caffemodel {path} holds no weights (is it a caffemodel?)")
    return net


def _refuse_solverstate(path, data):
    """Name a solver state given where a caffemodel belongs (it is neither truncated nor weightless)."""
    from google.protobuf.message import DecodeError  # deferred: fileio imports without protobuf (dsd_caffe.info)

    state = caffe_pb2().SolverState()
    try:
        state.ParseFromString(data)
    except DecodeError:
        return
    if state.learned_net.endswith(".caffemodel") or state.learned_net.endswith(".h5"):
        raise UserError(f"{path} is a Caffe solver state (iteration {state.iter}), not a caffemodel; give the "
                        f"weights saved with it, {state.learned_net}")


def write_caffemodel(path, net_param, force=True):
    """Write a NetParameter as a binary caffemodel, atomically."""
    return atomic_write(path, net_param.SerializeToString(), force=force)
