"""The released SqueezeNet models: where they come from and how to verify them.

Every download is checked by its git blob id (``sha1(b"blob <size>\\0" + content)``, what ``git hash-object``
prints and what GitHub stores), so a copy from any mirror or a local file can be verified without another
checksum. A file is written under a temporary name, verified, and only then renamed into place.

Offline use: ``fetch(name, dest, url="/path/or/file://url")`` copies and verifies a local file, and a file already
at ``dest`` is verified and used as it is. Loading a zoo model as a ready net (``dsd_caffe.load(name,
weights=path)``, verified first) is :mod:`dsd_caffe.loading`.

Command line: ``python -m dsd_caffe.zoo list`` / ``fetch NAME --output DEST [--from-file PATH]`` /
``verify NAME PATH``.
"""
import dataclasses
import logging
import os
import shutil
import urllib.parse
import urllib.request

from . import fileio
from .errors import UserError

log = logging.getLogger(__name__)

#: architectures netgen generates, by ZooModel.architecture
ARCHITECTURES = {"squeezenet_v1.0": "squeezenet_v1_0"}


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    url: str
    filename: str
    blob_id: str = None  # git blob id; the primary check
    sha256: str = None  # plain SHA-256 of the file, used only when no blob id is recorded
    sha1: str = None  # plain SHA-1 of the file, used only when neither of the above is recorded
    size: int = None  # bytes, when known
    naming: str = None  # "han" | "deepscale": the layer names of the released weights
    architecture: str = None  # a key of ARCHITECTURES: the net netgen generates for it (None: give a prototxt)
    format: str = "caffemodel"  # or "deep-compression" (.net, decoded by dsd_caffe.deepcompression)
    dataset: str = "imagenet"  # what it classifies: its preprocessing and class names (dsd_caffe.classifier)
    published: dict = None  # published results

    def net_param(self, kind="deploy"):
        """The matching net as a NetParameter (``kind`` "deploy" or "trainval", as netgen generates it, with the
        trainval's data sources left at netgen's defaults), or None when the project generates none."""
        if kind not in ("deploy", "trainval"):
            raise UserError(f"net kind must be 'deploy' or 'trainval', got {kind!r}")
        if self.architecture is None:
            return None
        from . import netgen

        trainval = getattr(netgen, ARCHITECTURES[self.architecture])(self.naming)
        return trainval if kind == "trainval" else netgen.deploy(trainval)


_V10 = "squeezenet_v1.0"
ZOO = {
    m.name: m
    for m in [
        ZooModel(
            name="dsd-squeezenet",
            description="SqueezeNet v1.0 after Dense-Sparse-Dense training (Han et al.), Han's layer names",
            url="https://raw.githubusercontent.com/songhan/SqueezeNet-DSD-Training/master/"
                "DSD_SqueezeNet_top1_0.617579_top5_0.834742.caffemodel",
            filename="DSD_SqueezeNet_top1_0.617579_top5_0.834742.caffemodel",
            blob_id="ffce3635e4a837e7bc783fea3f48fcc48a1e93a6",
            naming="han", architecture=_V10,
            published={"accuracy_top1": 0.617579, "accuracy_top5": 0.834742, "loss": 1.7059, "iterations": 1000},
        ),
        ZooModel(
            name="squeezenet-v1.0",
            description="DeepScale's dense SqueezeNet v1.0 (the DSD starting point), DeepScale's layer names",
            url="https://raw.githubusercontent.com/DeepScale/SqueezeNet/master/SqueezeNet_v1.0/"
                "squeezenet_v1.0.caffemodel",
            filename="squeezenet_v1.0.caffemodel",
            blob_id="a381d848b43d7048c3b362238ece2386c21d6ff0",
            size=5001403,  # as listed by OpenVINO's Open Model Zoo for the same file
            naming="deepscale", architecture=_V10,
        ),
        ZooModel(
            name="squeezenet-v1.1",
            description="DeepScale's SqueezeNet v1.1 (2.4x less computation than v1.0); the project generates "
                        "no v1.1 prototxt: pass DeepScale's SqueezeNet_v1.1/deploy.prototxt to load()",
            url="https://raw.githubusercontent.com/DeepScale/SqueezeNet/master/SqueezeNet_v1.1/"
                "squeezenet_v1.1.caffemodel",
            filename="squeezenet_v1.1.caffemodel",
            blob_id=None,  # not found in the stored references; size and SHA-256 as listed by OpenVINO's
            size=4950080,  # Open Model Zoo (models/public/squeezenet1.1/model.yml) for forresti/SqueezeNet@a47b6f1
            sha256="72b912ace512e8621f8ff168a7d72af55910d3c7c9445af8dfbff4c2ee960142",
            sha1="3397f026368a45ae236403ccc81cfcbe8ebe1bd0",  # as listed by OpenCV's model downloaders
            naming="deepscale",
        ),
        ZooModel(
            name="deep-compression-squeezenet",
            description="SqueezeNet v1.0 after Deep Compression (pruned 3x + trained quantization), a .net file",
            url="https://raw.githubusercontent.com/songhan/SqueezeNet-Deep-Compression/master/"
                "compressed_SqueezeNet.net",
            filename="compressed_SqueezeNet.net",
            blob_id="b28ec20a342c1f0dd7f0c148be60df1192ff8036",
            size=675763,
            naming="han", architecture=_V10,
            format="deep-compression",
            published={"nonzero": 415921, "weights": 1244448},
        ),
    ]
}


def get(name):
    """The ZooModel called ``name``."""
    if name not in ZOO:
        raise UserError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]


def _hash_file(path, prefix_size=True, algorithm="sha1"):
    prefix = b"blob %d\0" % os.path.getsize(path) if prefix_size else b""
    return fileio.file_digest(path, algorithm, prefix)


def git_blob_id(path):
    """The git blob id of a file: ``sha1(b"blob <size>\\0" + content)`` (what ``git hash-object`` prints)."""
    return _hash_file(os.fspath(path), prefix_size=True)


def verify(path, name):
    """Check ``path`` is the released file of zoo model ``name`` (size when known, then the git blob id, else
    the recorded SHA-256 or SHA-1); returns ``path``.

    Raises ValueError on a mismatch, naming the expected and actual ids."""
    model = get(name)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: {path} does not exist")
    size = os.path.getsize(path)
    if model.size is not None and size != model.size:
        raise UserError(f"{path} is not the released {model.filename}: {size} bytes, expected {model.size}")
    if model.blob_id:
        actual = git_blob_id(path)
        if actual != model.blob_id:
            raise UserError(f"{path} is not the released {model.filename}: git blob id {actual}, expected "
                             f"{model.blob_id}")
    elif model.sha256:
        actual = _hash_file(path, prefix_size=False, algorithm="sha256")
        if actual != model.sha256:
            raise UserError(f"{path} is not the released {model.filename}: SHA-256 {actual}, expected "
                             f"{model.sha256}")
    elif model.sha1:
        actual = _hash_file(path, prefix_size=False)
        if actual != model.sha1:
            raise UserError(f"{path} is not the released {model.filename}: SHA-1 {actual}, expected {model.sha1}")
    else:
        raise UserError(f"no checksum is recorded for {name}; cannot verify {path}")
    log.debug("%s verified as %s", path, name)
    return path


def _local_source(url):
    """The local path ``url`` names (a path or a file:// URL), or None for a remote URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.path)
    if parsed.scheme == "":
        return url
    return None


def _download(url, out, timeout=60):
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(out, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(out), disable=None) as bar:
                for chunk in iter(lambda: r.read(1 << 16), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, HTTPError, timeouts are OSErrors
        raise OSError(f"cannot download {url}: {e}") from None


def fetch(name, dest, url=None, force=False):
    """Get zoo model ``name`` into ``dest`` (a file path, or a folder for the release's file name), verified.

    ``url`` defaults to the release URL; a local path or ``file://`` URL works offline. A file already at the
    destination is verified and used (a mismatch is refused; ``force`` replaces it). The download goes to a
    temporary name beside the destination, is verified, then renamed. Returns the destination path."""
    model = get(name)
    dest = os.fspath(dest)
    if os.path.isdir(dest):
        dest = os.path.join(dest, model.filename)
    if os.path.isfile(dest) and not force:  # anything else there is refused by atomic_path below
        try:
            verify(dest, name)
        except ValueError as e:
            raise UserError(f"{e}; delete it or pass --force to fetch it again") from None
        log.info("%s already holds %s (verified)", dest, name)
        return dest
    source = url or model.url
    local = _local_source(source)
    if local is not None and not os.path.isfile(local):
        raise FileNotFoundError(f"{name}: local file {local} does not exist")
    with fileio.atomic_path(dest, force=True) as tmp:
        if local is not None:
            shutil.copyfile(local, tmp)
        else:
            log.info("downloading %s from %s", name, source)
            _download(source, tmp)
        try:
            verify(tmp, name)
        except ValueError as e:
            raise UserError(f"{source}: {str(e).replace(tmp, 'the download')}") from None
    log.info("%s: %s verified", name, dest)
    return dest


if __name__ == "__main__":  # `python -m dsd_caffe.zoo`, as documented: the command is dsd_caffe.commands.zoo
    from .commands.zoo import main

    main()
