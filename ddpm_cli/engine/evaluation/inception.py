"""Inception for FID and KID: torch-fidelity's FeatureExtractorInceptionV3 (TF-Inception 2015-12-05 pool features,
TensorFlow-compatible resize; nothing home-made), and the check that refuses weights files that are more than a
state dict of tensors before torch-fidelity unpickles them."""
from __future__ import annotations

import hashlib
import io
import sys
import warnings
import zipfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch

from ddpm_cli.errors import DataError, DdpmError

FEATURE_LAYER = "2048"  # torch-fidelity's name for the 2048-d pool3 features that FID and KID use
FEATURE_DIM = 2048


def short_reason(e: BaseException) -> str:
    """The first line of an exception's message, for `error: ... (reason)`."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _fidelity_version() -> str:
    try:
        from torch_fidelity.version import __version__ as v
    except ImportError:
        return "unknown"
    return v


@contextmanager
def _exact_fp32(device: torch.device):
    """No TF32 on CUDA while features are computed: the reference statistics must not depend on the card."""
    if device.type != "cuda":
        yield
        return
    saved = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch calls these flags legacy; they still work
        try:
            saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        except RuntimeError:  # torch refuses the legacy flags once the new fp32_precision API was used
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 with C in 1..4 (model.in_channels) -> (B, 3, H, W): alpha dropped, grayscale
    repeated."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise DataError(f"expected uint8 image batches (B, C, H, W), got {got}")
    c = images.shape[1]
    if c in (2, 4):
        images, c = images[:, :c - 1], c - 1
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    raise DataError(f"images have {c} channels; FID needs 1 to 4 (gray, gray + alpha, RGB, RGBA)")


class Inception:
    """torch-fidelity's TF-compatible InceptionV3: uint8 image batches -> 2048-d pool features (float32)."""

    def __init__(self, net: torch.nn.Module, device: torch.device, weights_id: str):
        self.net, self.device, self.weights_id = net, device, weights_id

    @property
    def input_size(self) -> int:
        """The side the images are resized to inside the network (299)."""
        return int(self.net.INPUT_IMAGE_SIZE)

    @property
    def identity(self) -> dict:
        """What the features depend on: weights, resize target, feature layer and the library's version."""
        return {"weights": self.weights_id, "input_size": self.input_size, "layer": FEATURE_LAYER,
                "torch_fidelity": _fidelity_version()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, 2048) float32 on self.device."""
        x = as_rgb_uint8(images).to(self.device, non_blocking=True)
        with _exact_fp32(self.device):
            (features,) = self.net(x)
        return features


# All that the pickle inside a state dict written by torch.save (protocol 2) calls: tensor rebuilding.
_STATE_DICT_GLOBALS = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                       "torch._utils _rebuild_parameter"} | \
    {f"torch {t}Storage" for t in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte",
                                    "Bool")}


def check_state_dict_file(blob: bytes, path: Path) -> None:
    """Refuse a .pth that is more than a state dict of tensors, without unpickling it: its pickle's opcodes are
    read with pickletools and every global it would call must be one that rebuilds tensors. (torch-fidelity then
    loads the file with torch.load; this check is why that is safe.)"""
    from pickletools import genops  # reads opcodes; never unpickles

    what = f"{path} is not a PyTorch state dict (torch.save's zip format); --inception-weights takes " \
           f"torch-fidelity's InceptionV3 weights (.pth)"
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise DdpmError(what)
            data = zf.read(pickles[0])
        for op, arg, _ in genops(data):
            if op.name in ("GLOBAL", "INST") and arg not in _STATE_DICT_GLOBALS:
                raise DdpmError(f"{path}: refused, its pickle would call {arg.replace(' ', '.')}, which a state "
                                f"dict of tensors never needs")
            if op.name in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):
                raise DdpmError(f"{path}: refused, its pickle looks up objects in a way torch.save does not "
                                f"({op.name}); re-save the state dict with torch.save")
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:  # not a zip, or a corrupt pickle
        raise DdpmError(f"{what} ({short_reason(e)})") from None


def check_inception_path(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise DdpmError(f"Inception weights {path} not found; pass a .pth state dict in torch-fidelity's format "
                        f"to --inception-weights, or leave it out to download torch-fidelity's own")
    return path


def load_inception(weights: str | Path | None = None, device: torch.device | str = "cpu") -> Inception:
    """torch-fidelity's FeatureExtractorInceptionV3 on `device`.

    `weights`: a state dict in torch-fidelity's format (its feature_extractor_weights_path); None downloads
    torch-fidelity's own. The file is checked first (check_state_dict_file), so one that is more than a state
    dict of tensors is refused before torch-fidelity loads it."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError:
        raise DdpmError("FID and KID need torch-fidelity: pip install 'ddpm-cli[eval]' (or pip install "
                        "torch-fidelity)") from None
    device = torch.device(device)
    path = None
    if weights is None:
        weights_id = "torch-fidelity:" + URL_INCEPTION_V3.rsplit("/", 1)[-1]
    else:
        path = check_inception_path(weights)
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise DdpmError(f"cannot read Inception weights {path}: {e.strerror or e}") from None
        check_state_dict_file(blob, path)
        weights_id = "sha256:" + hashlib.sha256(blob).hexdigest()[:16]
        del blob
    try:
        with redirect_stdout(sys.stderr):  # its download progress must not mix with our stdout
            net = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE_LAYER],
                                              feature_extractor_weights_path=str(path) if path else None)
    except OSError as e:  # URLError when offline, disk errors in the hub cache
        raise DdpmError(f"could not download torch-fidelity's Inception weights ({short_reason(e)}); offline, pass "
                        f"--inception-weights PATH (a .pth in torch-fidelity's format)") from None
    except RuntimeError as e:  # load_state_dict(strict=True) mismatch
        raise DdpmError(f"{path} does not fit torch-fidelity's InceptionV3 ({short_reason(e)}); pass weights in "
                        f"torch-fidelity's format") from None
    return Inception(net.to(device).eval(), device, weights_id)
