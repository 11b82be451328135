"""Bad input is a UserError naming it; a bug in our own code keeps its type and traceback (never turned into a
UserError ``from None``)."""
import errno
import os
import pickle
import re

import pytest

from dsd_caffe import deepcompression, fileio, netgen
from dsd_caffe.errors import AccessDenied, DiskFull, InputMissing, OutputExists, UserError


def _trainval_without_crop(tmp_path):
    net = netgen.small_squeezenet()
    for layer in net.layer:
        if layer.type == "Data":
            layer.transform_param.ClearField("crop_size")
    path = tmp_path / "trainval.prototxt"
    fileio.atomic_write(path, str(net))
    return path


def test_a_net_without_a_deploy_form_is_a_user_error_with_its_cause(tmp_path):
    with pytest.raises(UserError, match="its deploy form cannot be made .*no crop_size") as e:
        deepcompression.layer_specs(_trainval_without_crop(tmp_path))
    assert isinstance(e.value.__cause__, UserError)


def test_a_bug_while_making_the_deploy_form_keeps_its_type(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise TypeError("a bug in our own code")

    monkeypatch.setattr(netgen, "deploy", broken)
    with pytest.raises(TypeError, match="a bug in our own code"):
        deepcompression.layer_specs(_trainval_without_crop(tmp_path))


# ------------------------------------------------------------------------------------------------ the types
@pytest.mark.parametrize("cls, oserror", [(OutputExists, FileExistsError), (InputMissing, FileNotFoundError),
                                          (AccessDenied, PermissionError)])
def test_a_refusal_about_a_path_is_a_user_error_and_its_oserror(cls, oserror):
    e = cls("output x already exists; pass --force")
    assert isinstance(e, UserError) and isinstance(e, ValueError) and isinstance(e, oserror)
    assert str(e) == "output x already exists; pass --force" and e.args == (str(e),) and e.fields == ()
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_a_full_disk_keeps_errno_and_path():
    e = DiskFull(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/model.caffemodel")
    assert isinstance(e, UserError) and isinstance(e, OSError)
    assert (e.errno, e.strerror, e.filename) == (errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/model.caffemodel")
    assert str(e) == ("No space left on device: /out/model.caffemodel; free some space and run the same command "
                      "again")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is DiskFull and str(back) == str(e)


def test_a_user_error_lists_the_fields_it_names():
    e = UserError("seed must be an integer >= 0, got -1", fields=["seed"])
    assert str(e) == "seed must be an integer >= 0, got -1" and e.fields == ("seed",)


# ------------------------------------------------------------------------------------------------ at the source
@pytest.mark.parametrize("code, cls", [(errno.ENOSPC, DiskFull), (errno.EDQUOT, DiskFull),
                                       (errno.EROFS, AccessDenied), (errno.EACCES, AccessDenied)])
def test_a_write_the_disk_or_the_mode_refuses_names_the_output(tmp_path, code, cls):
    target = tmp_path / "model.caffemodel"
    with pytest.raises(cls, match=re.escape(str(target))) as e:
        with fileio.atomic_path(target):
            raise OSError(code, os.strerror(code))
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == code
    assert not target.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_refused_write_inside_a_staged_folder_names_where_the_file_lands(tmp_path, code):
    """The user named out/, not the staging temporary .out.tmp-<pid>-<x>/ the tool writes into first."""
    target = tmp_path / "out"
    with pytest.raises(UserError) as e:
        with fileio.atomic_path(target, directory=True) as tmp:
            inner = os.path.join(tmp, "pruned.caffemodel")
            raise OSError(code, os.strerror(code), inner)
    assert str(target / "pruned.caffemodel") in str(e.value) and ".tmp-" not in str(e.value), str(e.value)


def test_a_lock_whose_pid_the_full_disk_refuses_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """output_lock writes its pid into the lock file: ENOSPC there is a DiskFull naming the lock file, and the
    lock file and the folders made for it go."""
    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, "open", lambda *a, **k: FullFile(real_open(*a, **k)), raising=False)
    out = tmp_path / "made" / "out"
    with pytest.raises(DiskFull) as e:
        with fileio.output_lock(out):
            pass
    assert e.value.filename == fileio.lock_path(out) and e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_another_oserror_while_writing_stays_a_bug(tmp_path):
    with pytest.raises(OSError) as e:
        with fileio.atomic_path(tmp_path / "out"):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    assert not isinstance(e.value, UserError)


def test_refusals_about_paths_are_user_errors(tmp_path):
    (tmp_path / "there").write_text("x")
    with pytest.raises(OutputExists, match="already exists"):
        fileio.check_output(tmp_path / "there")
    with pytest.raises(InputMissing, match="does not exist"):
        fileio.require_file(tmp_path / "nowhere", "prototxt")
    with pytest.raises(UserError, match="is a folder"):
        fileio.require_file(tmp_path, "prototxt")
    with pytest.raises(AccessDenied, match="not writable"):
        fileio.check_output(tmp_path / "there" / "below" / "out")


# ------------------------------------------------------------------------------------------------ bugs
def test_a_bug_in_our_own_python_layer_module_keeps_its_type(tmp_path, monkeypatch):
    from dsd_caffe import netcheck

    def broken(name, *a, **k):
        raise TypeError("a bug in our own code")

    monkeypatch.setattr(netcheck.importlib, "import_module", broken)
    net = netcheck.caffe_pb2().NetParameter()
    layer = net.layer.add(name="mask", type="Python")
    layer.python_param.module, layer.python_param.layer = "dsd_caffe.masklayer", "MaskLayer"
    with pytest.raises(TypeError, match="a bug in our own code"):
        netcheck._check_python_layer(layer, "net")
    layer.python_param.module = "users_layer"  # the user's own module failing: one line, its cause kept
    with pytest.raises(UserError, match="users_layer.*fails to import.*TypeError") as e:
        netcheck._check_python_layer(layer, "net")
    assert isinstance(e.value.__cause__, TypeError)


# ------------------------------------------------------------------------------------------------ field names
def test_configs_name_their_fields_not_flags():
    from dsd_caffe import phases, pipeline
    from dsd_caffe.solvers import Schedule

    with pytest.raises(UserError, match=r"^seed must be an integer >= 0, got -1$") as e:
        pipeline.RunConfig("m", "w", phases.PruneConfig(ratio="3x"), seed=-1)
    assert e.value.fields == ("seed",)
    with pytest.raises(UserError, match=r"^sparse\.base_lr must be a positive") as e:
        Schedule(base_lr=-1.0, flag="sparse")
    assert e.value.fields == ("sparse.base_lr",)
    with pytest.raises(UserError, match=r"^sparse\.snapshot must be") as e:
        Schedule(snapshot=0, flag="sparse")
    assert e.value.fields == ("sparse.snapshot",)


@pytest.mark.parametrize("error, sent", [(UserError("bad input"), ("error", "seed 3: bad input")),
                                         (OSError(errno.EIO, "EIO"), None)])
def test_a_seed_worker_reports_user_errors_and_lets_bugs_through(monkeypatch, error, sent):
    """A seed's worker sends a UserError to the parent as one line; an OSError that is no refusal is a bug: it
    leaves the worker with its traceback (the parent reports the worker ended with no result)."""
    from types import SimpleNamespace

    from dsd_caffe import seedpool

    def run_dsd(*a, **k):
        raise error

    got = []
    monkeypatch.setattr(seedpool, "_follow_parent", lambda parent: None)
    monkeypatch.setattr(seedpool.logging, "basicConfig", lambda **k: None)
    monkeypatch.setattr(seedpool, "run_dsd", run_dsd)
    conn = SimpleNamespace(send=got.append, close=lambda: None)
    args = (conn, None, SimpleNamespace(seed=3), "out", "binary", None, False, False)
    if sent is None:
        with pytest.raises(OSError):
            seedpool._seed_worker(*args)
        assert got == []
    else:
        seedpool._seed_worker(*args)
        assert got == [sent]


def test_a_bug_in_our_own_python_layer_while_caffe_sets_it_up_keeps_its_type(monkeypatch):
    """caffe_env.make_net names a Python layer that fails in setup() in one UserError; our own MaskLayer failing
    there is a bug and keeps its type and traceback."""
    from dsd_caffe import caffe_env, caffeproto, masklayer

    def broken(text):
        raise TypeError("a bug in our own code")

    monkeypatch.setattr(masklayer, "parse_param_str", broken)
    net = caffeproto.caffe_pb2().NetParameter()
    layer = net.layer.add(name="mask", type="Python", top=["mask"])
    layer.python_param.module, layer.python_param.layer = "dsd_caffe.masklayer", "MaskLayer"
    with pytest.raises(TypeError, match="a bug in our own code"):
        caffe_env.make_net(net)


def test_a_module_of_ours_that_does_not_exist_is_the_users_typo():
    from dsd_caffe import netcheck

    net = netcheck.caffe_pb2().NetParameter()
    layer = net.layer.add(name="mask", type="Python")
    layer.python_param.module, layer.python_param.layer = "dsd_caffe.no_such_masklayer", "MaskLayer"
    with pytest.raises(UserError, match="'dsd_caffe.no_such_masklayer' cannot be imported") as e:
        netcheck._check_python_layer(layer, "net")
    assert isinstance(e.value.__cause__, ModuleNotFoundError)
