"""Classify images with a Caffe net, preprocessed exactly as the net saw its training images.

A net trained from an LMDB never saw a photo: it saw the LMDB's stored bytes after its Data layer's
``transform_param``. :class:`Preprocess` replays both steps on any image:

1. **Storing** (``make_lmdb`` / Caffe's ``convert_imageset``): decoded by OpenCV, so colour images are BGR and
   grey ones one channel, pixel values are the raw 0-255 bytes, resized bilinearly to the stored size
   (``resize``, e.g. 256x256 for ImageNet).
2. **Data layer in the TEST phase** (Caffe's ``DataTransformer``): a centre crop of ``crop_size`` at offsets
   ``(H - crop) // 2, (W - crop) // 2``; then ``(pixel - mean) * scale`` in float32, with the mean either one
   value per channel (``mean_value``) or the mean image (``mean_file``) cropped at the same offsets.

Where the recipe comes from:

- a **trainval prototxt**: its TEST Data layer's ``transform_param``; the stored size and channel count from its
  LMDB when that is on this machine (its source resolved by :mod:`dsd_caffe.sources`' one rule),
  else from a mean file, else ``resize=`` must say it. The net itself is the trainval's deploy form
  (:func:`dsd_caffe.netgen.deploy`), so no LMDB is needed to classify. Class names: the LMDB's JSON when present.
- a **zoo model** (or a net made by ``dsd_caffe.load(zoo_name)``): its data set's known recipe, :data:`DATASETS`.
  ImageNet is Caffe's SqueezeNet recipe: stored at 256x256, TEST crop 227, mean values 104/117/123 (BGR), scale 1,
  as netgen's SqueezeNet v1.0 trainval (and the DSD release's) says; the 1,000 class names ship with the package
  (``resources/imagenet_classes.txt``, see the README beside it).
- a **deploy prototxt or any caffe.Net**: no transform_param to read, so ``preprocess=`` is required: a
  :class:`Preprocess`, or the name of a known recipe (``preprocess="imagenet"``, :data:`DATASETS`), which brings
  its class names too.
- a trainval whose LMDB is not on this machine: the stored size comes from a mean file or ``resize=``, else the
  images are resized to the net's input (no crop); a warning names the recipe it fell back to.

Images are file paths (read as ``make_lmdb`` reads them) or numpy arrays: HxWx3 RGB or HxW grey, ``uint8`` in
0-255, or floating point in [0, 1] as ``caffe.io.load_image`` and scikit-image give them.
"""
import collections
import dataclasses
import logging
import os

import numpy as np

from . import fileio, imagedb, lmdbio, netcheck, sources
from .errors import UserError

log = logging.getLogger(__name__)

Prediction = collections.namedtuple("Prediction", "index probability name")
Prediction.__doc__ = "One of the top-k classes of an image: class index, probability, class name (None if unknown)."

#: The data sets of the zoo's models: the size their LMDBs store images at, the netgen trainval whose TEST
#: transform_param is the rest of the recipe, and the file of class names in resources/.
DATASETS = {"imagenet": {"resize": (256, 256), "netgen": "squeezenet_v1_0", "classes": "imagenet_classes.txt"}}
BATCH = 10  # images per forward pass


def _class_file(dataset):
    from importlib import resources

    return resources.files(__package__).joinpath("resources", DATASETS[dataset]["classes"]).read_text().splitlines()


def imagenet_classes():
    """The 1,000 ImageNet class names in the class order of Caffe's ImageNet models (index 281: "tabby, tabby cat")."""
    return _class_file("imagenet")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes the net's input blob (see the module doc).

    ``input_size``: (channels, height, width) of the net's input; ``resize``: (height, width) the images were
    stored at, or None for the input size (no crop); ``mean``: None, per-channel values (one value: all channels)
    or a (C, H, W) mean image of the stored size; ``scale``: the transform_param's scale."""

    input_size: tuple
    resize: tuple = None
    mean: object = None
    scale: float = 1.0

    def __post_init__(self):
        c, h, w = self.input_size
        if c not in (1, 3):
            raise UserError(f"nets with {c}-channel input are not supported; images are grey (1) or colour (3)")
        rh, rw = self.resize or (h, w)
        if rh < h or rw < w:
            raise UserError(f"resize {rh}x{rw} is smaller than the net's input {h}x{w}")

    def __call__(self, image):
        """One image (path or array) -> the (C, H, W) float32 array the net takes."""
        c, h, w = self.input_size
        img = _read(image, c)
        rh, rw = self.resize or (h, w)
        if img.shape[:2] != (rh, rw):
            import cv2

            img = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR).reshape(rh, rw, c)
        top, left = (rh - h) // 2, (rw - w) // 2
        x = img[top:top + h, left:left + w].astype(np.float32).transpose(2, 0, 1)
        if isinstance(self.mean, np.ndarray):
            x -= self.mean[:, top:top + h, left:left + w]
        elif self.mean:
            x -= np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        return x * np.float32(self.scale)


def _read(image, channels):
    """An image as stored in an LMDB: HxWxC, BGR or grey, uint8 (or float32 in 0-255 from a float image)."""
    import cv2

    if isinstance(image, (str, os.PathLike)):
        path = fileio.require_file(image, "image")
        flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
        img = cv2.imdecode(np.fromfile(path, np.uint8), flag)  # as make_lmdb decodes
        if img is None:
            raise UserError(f"image {path}: not an image, or a corrupt one (OpenCV could not decode it)")
        return img.reshape(img.shape[0], img.shape[1], channels)
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or min(img.shape[:2]) < 1:
        raise UserError(f"an image array must be HxW (grey) or HxWx3 (RGB), got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating):
        if not (np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1):
            raise UserError(f"a float image must hold values in [0, 1] (as caffe.io.load_image gives), got "
                            f"[{img.min()}, {img.max()}]; pass uint8 for 0-255 pixels")
        img = img.astype(np.float32) * np.float32(255)
    elif img.dtype != np.uint8:
        raise UserError(f"an image array must be uint8 (0-255) or float in [0, 1], got dtype {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], channels, axis=2)
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.ascontiguousarray(img[:, :, ::-1])  # RGB -> BGR


def _lmdb_facts(layer, base):
    """{"resize", "channels", "classes"} from a Data layer's LMDB when it is on this machine, else {}. Its source
    resolves by ``sources.resolve`` against ``base``, the prototxt's folder; a relative source of a net made in
    memory (``base`` None) names no file, so nothing is read for it (not whatever lies in the current folder)."""
    source = layer.data_param.source
    if not os.path.isabs(source) and base is None:
        return {}
    path = sources.resolve(source, base)
    if not os.path.isdir(path):
        return {}
    info = lmdbio.lmdb_info(path)
    sidecar = fileio.sidecar_path(path)
    classes = fileio.read_json(sidecar).get("classes") if os.path.isfile(sidecar) else None
    return {"resize": (info["height"], info["width"]), "channels": info["channels"], "classes": classes}


def _data_layer(net_param):
    """The Data layer of the TEST phase, or None (a deploy net)."""
    return next((l for l in netcheck.included_layers(net_param, "TEST") if l.type == "Data"), None)


def from_net_param(net_param, resize=None, base=None):
    """(Preprocess, class names or None) from the TEST Data layer of a trainval NetParameter (see the module
    doc); ``resize`` overrides the stored image size. ``base``: the folder of the prototxt the net was read from,
    where its relative sources lie (None: a net made in memory, whose relative sources are not looked up)."""
    layer = _data_layer(net_param)
    where = f"net {net_param.name!r}"
    if layer is None:
        raise UserError(f"{where} has no Data layer in the TEST phase: no transform_param to read")
    tp = layer.transform_param
    facts = _lmdb_facts(layer, base)
    given_resize = resize is not None
    mean = imagedb.read_mean_file(tp.mean_file) if tp.HasField("mean_file") else tuple(tp.mean_value) or None
    image_mean = isinstance(mean, np.ndarray)
    if resize is None:
        resize = facts.get("resize") or (tuple(mean.shape[1:]) if image_mean else None)
    if facts:
        channels = facts["channels"]
    elif image_mean:
        channels = mean.shape[0]
    else:
        channels = len(mean) if mean and len(mean) > 1 else None
    where += f", layer {layer.name!r}"
    if channels is None:
        raise UserError(f"{where}: the channel count is unknown (its LMDB {layer.data_param.source} is not here and "
                        "it has no per-channel mean); give preprocess=Preprocess(...)")
    if not (tp.crop_size or resize):
        raise UserError(f"{where}: no crop_size and its LMDB {layer.data_param.source} is not here; give resize=")
    h, w = (tp.crop_size, tp.crop_size) if tp.crop_size else resize
    recipe = Preprocess((channels, h, w), resize, mean, tp.scale)
    if not facts:
        log.warning("%s: its LMDB %s is not on this machine: preprocessing with %s (stored size %s) and no class "
                    "names; give resize= (the size the LMDB stored its images at) and classes= for the net's own",
                    where, layer.data_param.source, recipe, "given" if given_resize else
                    "from the mean file" if image_mean else "unknown: the net's input size, no crop")
    return recipe, facts.get("classes")


def known_recipe(dataset):
    """(Preprocess, class names) of a known data set (:data:`DATASETS`: "imagenet")."""
    from . import netgen

    if dataset not in DATASETS:
        raise UserError(f"no known preprocessing for data set {dataset!r}; known: {', '.join(DATASETS)}")
    d = DATASETS[dataset]
    recipe, _ = from_net_param(getattr(netgen, d["netgen"])(), resize=d["resize"])
    return recipe, _class_file(dataset)


class Classifier:
    """A caffe.Net with its preprocessing and class names: ``probabilities(images)``, ``classify(images, top)``.

    ``net`` is a deploy-style net whose input blob (``net.inputs[0]``) takes the images. ``preprocess`` defaults
    to the known recipe of a net made by ``dsd_caffe.load(zoo_name)``; ``classes`` (a list of names, or a text file
    with one name a line) to that data set's names, else none. Outputs not made by a Softmax layer are turned into
    probabilities with a softmax."""

    def __init__(self, net, preprocess=None, classes=None):
        from . import loading

        if isinstance(preprocess, str):  # a known recipe by name: its preprocessing and class names
            preprocess, names = known_recipe(preprocess)
            classes = names if classes is None else classes
        model = loading.loaded_model(net)
        if model is not None:
            recipe, names = known_recipe(model.dataset)
            preprocess = preprocess or recipe
            classes = names if classes is None else classes
        if preprocess is None:
            raise UserError("this net carries no preprocessing (it has no transform_param to read); give "
                            f"preprocess= a known recipe ({', '.join(DATASETS)}) or Preprocess(...), or load it "
                            "with dsd_caffe.load(zoo name) or Classifier.load(trainval prototxt)")
        if not net.inputs:
            raise UserError("the net has no input blob (it reads a Data layer): classify with its deploy form, "
                            "e.g. Classifier.load(trainval prototxt, weights=...)")
        self.net, self.preprocess, self.input, self.output = net, preprocess, net.inputs[0], net.outputs[-1]
        shape = tuple(net.blobs[self.input].data.shape[1:])
        if shape != tuple(preprocess.input_size):
            raise UserError(f"the net's input is {shape}, the preprocessing makes {tuple(preprocess.input_size)}")
        producer = [name for name in net._layer_names if self.output in net.top_names[name]][-1]
        self.softmax = net.layer_dict[producer].type != "Softmax"
        self.classes = _class_names(classes)

    @classmethod
    def load(cls, model, weights=None, preprocess=None, classes=None, resize=None, gpu=None, **zoo_args):
        """A Classifier for a zoo model name (weights fetched or verified as ``dsd_caffe.load`` does,
        ``zoo_args``: ``url``, ``cache``, ``prototxt``) or a prototxt path with ``weights`` (a caffemodel).
        ``preprocess``, when given, replaces the recipe read from a trainval or known for a zoo model: a
        :class:`Preprocess` or a known recipe's name ("imagenet")."""
        from . import loading, masks, netgen, zoo

        if isinstance(model, str) and model in zoo.ZOO:
            return cls(loading.load(model, weights=weights, gpu=gpu, **zoo_args), preprocess, classes)
        param = sources.read_net(model, require=())
        if _data_layer(param) is None:  # a deploy prototxt
            return cls(loading.load(model, weights=weights, gpu=gpu), preprocess, classes)
        if isinstance(preprocess, str):
            preprocess, names = known_recipe(preprocess)
            classes = names if classes is None else classes
        if preprocess is None:
            base = os.path.dirname(os.path.abspath(model)) if isinstance(model, (str, os.PathLike)) else None
            preprocess, lmdb_classes = from_net_param(param, resize, base)
            classes = lmdb_classes if classes is None else classes
        deploy = netgen.deploy(masks.remove_mask_layer(param), input_shape=(1, *preprocess.input_size))
        return cls(loading.load(deploy, weights=weights, gpu=gpu), preprocess, classes)

    def probabilities(self, images):
        """(N, classes) float32 class probabilities of ``images`` (one image, or a list of them)."""
        images = _image_list(images)
        out = []
        for i in range(0, len(images), BATCH):
            batch = np.stack([self.preprocess(im) for im in images[i:i + BATCH]])
            blob = self.net.blobs[self.input]
            blob.reshape(*batch.shape)
            blob.data[...] = batch
            self.net.forward()
            out.append(self.net.blobs[self.output].data.reshape(len(batch), -1).copy())
        scores = np.concatenate(out)
        if self.softmax:
            e = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores = e / e.sum(axis=1, keepdims=True)
        if self.classes is not None and len(self.classes) != scores.shape[1]:
            raise UserError(f"{len(self.classes)} class names for a net with {scores.shape[1]} outputs")
        return scores

    def classify(self, images, top=5):
        """The ``top`` most probable classes of each image, best first: one list of :data:`Prediction` per image
        (also for a single image)."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise UserError(f"top must be a whole number >= 1, got {top!r}")
        result = []
        for p in self.probabilities(images):
            best = np.argsort(-p, kind="stable")[:top]
            result.append([Prediction(int(k), float(p[k]), self.classes[k] if self.classes else None)
                           for k in best])
        return result


def _class_names(classes):
    if classes is None or isinstance(classes, (list, tuple)):
        return None if classes is None else list(classes)
    with open(fileio.require_file(classes, "class names file")) as f:
        return f.read().splitlines()


def _image_list(images):
    """One image (a path, an HxW grey or HxWxC colour array, C 3 or 4) or many (a list, an NxHxWx3 array, or an
    NxHxW array of grey images: a 3-D array whose last axis is not colour channels)."""
    one_array = isinstance(images, np.ndarray) and (images.ndim == 2 or
                                                    (images.ndim == 3 and images.shape[2] in (3, 4)))
    if isinstance(images, (str, os.PathLike)) or one_array:
        return [images]
    images = list(images)
    if not images:
        raise UserError("no images to classify")
    return images


def classify(model, images, top=5, **kwargs):
    """The ``top`` classes of each image, best first (one list of ``Prediction(index, probability, name)`` per
    image). ``model``: a :class:`Classifier`, a ``caffe.Net`` (made by ``dsd_caffe.load(zoo name)``, or give
    ``preprocess=``), a zoo model name or a prototxt path (``kwargs`` as :meth:`Classifier.load`: ``weights``,
    ``preprocess``, ``classes``, ``resize``, ``gpu``, ...).

    Example: ``classify("deep-compression-squeezenet", "cat.jpg", weights="compressed_SqueezeNet.net")``."""
    if not isinstance(model, Classifier):
        make = Classifier.load if isinstance(model, (str, os.PathLike)) else Classifier
        model = make(model, **kwargs)
    elif kwargs:
        raise UserError(f"a Classifier is ready as it is; {', '.join(kwargs)} cannot change it")
    return model.classify(images, top)
