"""Bad input is a UserError naming it; a bug in our own code keeps its type and traceback (never turned into a
UserError ``from None``)."""
import pytest

from dsd_caffe import deepcompression, fileio, netgen
from dsd_caffe.errors import UserError


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
