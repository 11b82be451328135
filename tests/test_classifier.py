"""classify(): the preprocessing a net's transform_param says, checked by hand on a tiny net; and the real
Deep Compression SqueezeNet naming scikit-image's bundled photos."""
import json
import os

import numpy as np
import pytest

from helpers import DC_NET, DSD_TRAINVAL, REFERENCE, write_tiny_lmdb
from dsd_caffe import caffe_env, classifier, imagedb, loading, netgen
from dsd_caffe.classifier import Classifier, Preprocess, classify

CLASSES_TXT = os.path.join(REFERENCE, "imagenet", "classes.txt")


def needs(path):
    return pytest.mark.skipif(not os.path.exists(path), reason=f"reference file {path} is absent")


# ------------------------------------------------------------------------------------------ a tiny net, by hand
MEAN = (10.0, 20.0, 30.0)
TINY = """name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ crop_size: 4 scale: 0.5 {mean} }}
  data_param {{ source: "{source}" batch_size: 2 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param {{ num_output: 3 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


@pytest.fixture
def tiny(tmp_path):
    """(trainval path, weights path, W, b) of a 3x4x4 -> 3 classes net; mean values by default."""

    def make(mean="mean_value: 10 mean_value: 20 mean_value: 30", source=None):
        path = tmp_path / "trainval.prototxt"
        path.write_text(TINY.format(mean=mean, source=source or tmp_path / "absent_lmdb"))
        rng = np.random.default_rng(0)
        w, b = rng.normal(0, 0.02, (3, 48)).astype(np.float32), rng.normal(0, 0.1, 3).astype(np.float32)
        from dsd_caffe import fileio

        net = caffe_env.make_net(netgen.deploy(fileio.read_net_prototxt(path), input_shape=(1, 3, 4, 4)))
        net.params["ip"][0].data[...], net.params["ip"][1].data[...] = w, b
        weights = tmp_path / "tiny.caffemodel"
        net.save(str(weights))
        return path, weights, w, b

    return make


def _by_hand(rgb_uint8, w, b, mean):
    """Caffe's TEST transform of a stored 6x8 BGR image, crop 4 at (1, 2), then softmax(W x + b)."""
    bgr = rgb_uint8[:, :, ::-1].astype(np.float32)
    x = (bgr[1:5, 2:6].transpose(2, 0, 1) - mean) * np.float32(0.5)
    s = w.astype(np.float64) @ x.ravel() + b
    return x, np.exp(s - s.max()) / np.exp(s - s.max()).sum()


def test_preprocessing_matches_a_hand_computation(tiny):
    path, weights, w, b = tiny()
    c = Classifier.load(path, weights=weights, resize=(6, 8))
    assert c.preprocess == Preprocess((3, 4, 4), (6, 8), MEAN, 0.5)
    img = np.random.default_rng(1).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    x, p = _by_hand(img, w, b, np.asarray(MEAN, np.float32).reshape(3, 1, 1))
    assert np.array_equal(c.preprocess(img), x)
    assert np.allclose(c.probabilities(img)[0], p, atol=1e-6)
    top = c.classify(img, top=2)[0]
    assert [t.index for t in top] == list(np.argsort(-p)[:2]) and top[0].name is None
    # the same pixels as floats in [0, 1] (caffe.io.load_image), and stored twice as large (an exact 2x2 bilinear
    # downscale: every 2x2 block is one value), give the same input
    assert np.allclose(c.preprocess(img / 255.0), x, atol=1e-4)
    assert np.array_equal(c.preprocess(np.kron(img, np.ones((2, 2, 1), np.uint8))), x)
    # the recipe given explicitly, for the trainval and for its deploy prototxt (which has none to read)
    from dsd_caffe import fileio

    deploy = fileio.write_prototxt(path.parent / "deploy.prototxt",
                                   netgen.deploy(fileio.read_net_prototxt(path), input_shape=(1, 3, 4, 4)))
    for model in (path, deploy):
        given = Classifier.load(model, weights=weights, preprocess=c.preprocess)
        assert np.array_equal(given.probabilities(img), c.probabilities(img))
    # a grey image feeds the same value to all three channels
    grey = img[:, :, 0]
    assert np.array_equal(c.preprocess(grey), c.preprocess(np.repeat(grey[:, :, None], 3, axis=2)))
    # a stack of grey images (N x H x W, as Fashion-MNIST arrays come) is N images, one prediction each
    stack = np.stack([grey, 255 - grey, grey // 2, grey])
    assert np.array_equal(c.probabilities(stack), c.probabilities(list(stack)))
    assert len(c.classify(stack, top=1)) == 4


def test_mean_file_is_cropped_at_the_same_offsets(tiny, tmp_path):
    mean = np.arange(3 * 6 * 8, dtype=np.float32).reshape(3, 6, 8)
    imagedb.write_mean_file(tmp_path / "mean.binaryproto", mean)
    path, weights, w, b = tiny(mean=f'mean_file: "{tmp_path / "mean.binaryproto"}"')
    c = Classifier.load(path, weights=weights)  # the stored size comes from the mean image
    assert c.preprocess.resize == (6, 8)
    img = np.random.default_rng(2).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    x, _ = _by_hand(img, w, b, mean[:, 1:5, 2:6])
    assert np.array_equal(c.preprocess(img), x)


def test_stored_size_and_class_names_from_the_lmdb(tiny, tmp_path):
    lmdb = write_tiny_lmdb(tmp_path / "val_lmdb", np.zeros((2, 3, 6, 6), np.uint8), [0, 1])
    with open(lmdb + ".json", "w") as f:
        json.dump({"classes": ["ant", "bee", "cat"]}, f)
    path, weights, _, _ = tiny(source=lmdb)
    c = Classifier.load(path, weights=weights)
    assert c.preprocess.resize == (6, 6) and c.classes == ["ant", "bee", "cat"]
    assert {t.name for t in c.classify(np.zeros((10, 10, 3), np.uint8), top=3)[0]} == {"ant", "bee", "cat"}


def test_bad_input_is_named(tiny, tmp_path):
    path, weights, _, _ = tiny()
    c = Classifier.load(path, weights=weights, resize=(6, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\].*got \[255.0, 255.0\]"):
        c.probabilities(np.full((6, 8, 3), 255.0))
    with pytest.raises(ValueError, match=r"got shape \(6, 8, 4\)"):
        c.probabilities(np.zeros((6, 8, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        c.probabilities(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png: not an image"):
        c.probabilities(str(tmp_path / "text.png"))
    with pytest.raises(ValueError, match="2 class names for a net with 3 outputs"):
        classify(path, np.zeros((6, 8, 3), np.uint8), weights=weights, resize=(6, 8), classes=["a", "b"])
    with pytest.raises(ValueError, match="top must be"):
        c.classify(np.zeros((6, 8, 3), np.uint8), top=0)
    with pytest.raises(ValueError, match="no crop_size"):
        classifier.from_net_param(_without_crop(netgen.small_squeezenet(channels=3)))
    with pytest.raises(ValueError, match="no Data layer"):
        classifier.from_net_param(netgen.deploy(netgen.small_squeezenet()))
    bare = caffe_env.make_net(netgen.deploy(netgen.small_squeezenet()))
    with pytest.raises(ValueError, match="preprocess="):
        classify(bare, np.zeros((28, 28), np.uint8))


def _without_crop(param):
    for layer in param.layer:
        layer.transform_param.ClearField("crop_size")
    return param


# ------------------------------------------------------------------------------------------ the real SqueezeNet
def test_imagenet_classes_ship_with_the_package():
    names = classifier.imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
    assert (names[281], names[285], names[967], names[968]) == ("tabby, tabby cat", "Egyptian cat", "espresso", "cup")
    if os.path.exists(CLASSES_TXT):
        with open(CLASSES_TXT) as f:
            assert names == f.read().splitlines()


@needs(DSD_TRAINVAL)
def test_imagenet_recipe_is_the_dsd_release_test_transform():
    from dsd_caffe import fileio

    recipe, names = classifier.known_recipe("imagenet")
    released, _ = classifier.from_net_param(fileio.read_net_prototxt(DSD_TRAINVAL), resize=(256, 256))
    assert recipe == released == Preprocess((3, 227, 227), (256, 256), (104.0, 117.0, 123.0), 1.0)
    assert names == classifier.imagenet_classes()


PHOTOS = {  # scikit-image's bundled sample images (no download): what a SqueezeNet must see in them
    "chelsea": {281, 282, 285},  # a tabby cat: tabby, tiger cat or Egyptian cat
    "coffee": {967},  # a cup of espresso
    "camera": {872},  # the cameraman's tripod (a grey image)
}


@pytest.fixture(scope="module")
def squeezenet():
    if not os.path.exists(DC_NET):
        pytest.skip(f"reference file {DC_NET} is absent")
    return Classifier.load("deep-compression-squeezenet", weights=DC_NET)


def test_real_squeezenet_names_real_photos(squeezenet):
    skdata = pytest.importorskip("skimage.data")
    images = [getattr(skdata, name)() for name in PHOTOS]
    results = classify(squeezenet, images, top=3)
    for (name, expected), top in zip(PHOTOS.items(), results):
        assert top[0].index in expected, (name, top)
        assert top[0].name == classifier.imagenet_classes()[top[0].index]
        assert 1 >= top[0].probability >= top[1].probability >= top[2].probability > 0
    cat = results[0]
    assert all(281 <= t.index <= 285 for t in cat), cat  # the top three are all domestic cats
    assert results[1][0].name == "espresso" and results[1][0].probability > 0.9


def test_paths_floats_and_loaded_nets_agree(squeezenet, tmp_path):
    skdata = pytest.importorskip("skimage.data")
    import cv2
    from skimage import img_as_float

    cat = skdata.chelsea()
    cv2.imwrite(str(tmp_path / "cat.png"), cat[:, :, ::-1])  # lossless: the same pixels from the file
    p = squeezenet.probabilities([cat, tmp_path / "cat.png", img_as_float(cat)])
    assert np.array_equal(p[0], p[1])
    # floats are resized without the uint8 rounding of a stored image: the input moves by < 1 grey level
    assert np.array_equal(np.argsort(-p[0])[:5], np.argsort(-p[2])[:5]) and np.allclose(p[0], p[2], atol=0.01)
    net = loading.load("deep-compression-squeezenet", weights=DC_NET)  # a net from dsd_caffe.load knows its recipe
    assert classify(net, cat, top=1) == classify(squeezenet, cat, top=1)


# ------------------------------------------------------------------------------------------ any deploy net
@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """The released Deep Compression SqueezeNet decoded to a caffemodel (as tools/decode_compressed.py does)."""
    from helpers import DC_DEPLOY, shared_file
    from dsd_caffe import deepcompression

    deploy, net = shared_file(DC_DEPLOY), shared_file(DC_NET)
    out = tmp_path_factory.mktemp("decoded") / "squeezenet.caffemodel"
    deepcompression.decode_to_caffemodel(net, deploy, out)
    return deploy, str(out)


def test_a_deploy_net_with_its_caffemodel_classifies_by_a_named_recipe(decoded, caplog):
    skdata = pytest.importorskip("skimage.data")
    deploy, weights = decoded
    images = [skdata.chelsea(), skdata.coffee()]
    top = classify(deploy, images, top=3, weights=weights, preprocess="imagenet")
    assert top[0][0].index in PHOTOS["chelsea"] and top[0][0].name == classifier.imagenet_classes()[top[0][0].index]
    assert top[1][0].name == "espresso"
    import dsd_caffe

    assert dsd_caffe.known_recipe("imagenet") == classifier.known_recipe("imagenet")
    # the zoo name takes the decoded caffemodel too, saying it is not the verified release
    by_name = classify("deep-compression-squeezenet", images, top=3, weights=weights)
    # (netgen's deploy net and the release's prototxt compute the same net in another float order)
    assert [[(p.index, p.name) for p in t] for t in by_name] == [[(p.index, p.name) for p in t] for t in top]
    assert [p.probability for t in by_name for p in t] == pytest.approx([p.probability for t in top for p in t],
                                                                          rel=1e-4)
    assert "is not the verified release of deep-compression-squeezenet" in caplog.text


def test_a_trainval_without_its_lmdb_names_the_recipe_it_fell_back_to(tiny, caplog):
    path, weights, w, b = tiny()
    recipe, names = classifier.from_net_param(__import__("dsd_caffe").fileio.read_net_prototxt(path))
    assert recipe == Preprocess((3, 4, 4), None, MEAN, 0.5) and names is None
    assert "absent_lmdb is not on this machine: preprocessing with Preprocess(input_size=(3, 4, 4)" in caplog.text
    assert "no class names" in caplog.text
