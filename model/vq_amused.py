"""AmusedVQ: the image tokenizer of MMaDA-Parallel-A / Lumina-DiMOO, an aMUSEd VQ-GAN run by diffusers.

The released A checkpoint ships the VQ-GAN in a `vqvae/` subfolder (diffusers `VQModel`:
config.json + diffusion_pytorch_model.safetensors; PA README L89 "trained with tokenizer
Amused-VQ", L103 `--vae_ckpt tyfeld/MMaDA-Parallel-A`). This module wraps that network (it does
not re-implement it) behind the ImageTokenizer interface of model/image_tokenizer.py, mirroring
upstream exactly:
- pixels: uint8 / 255 -> float in [0, 1], no [-1, 1] normalisation (`VaeImageProcessor(
  vae_scale_factor=16, do_normalize=False)`, PA utils/image_utils.py L165-166, Lumina
  data/item_processor.py L124-125);
- encode: `latents = vqvae.encode(x).latents` (= quant_conv(encoder(x))), then the indices are
  `vqvae.quantize(latents)[2][2]`, the nearest codebook row (L2), reshaped to (B, h, w)
  row-major (PA utils/image_utils.py L167-170, Lumina data/item_processor.py L126-128);
- decode: `vqvae.decode(codes, force_not_quantize=True, shape=(B, h, w, C)).sample.clip(0, 1)`,
  which with the config's `lookup_from_codebook=True` is quantize.get_codebook_entry ->
  post_quant_conv -> decoder (PA utils/image_utils.py L58-66; diffusers VQModel.decode);
  pixels back to uint8 by round(x * 255) as VaeImageProcessor.postprocess does;
- downsample factor 2 ** (len(block_out_channels) - 1) = 16 (PA inference.py L96), codebook 8192.

Resizing (a tokenizer-level policy, not upstream's): an image whose size differs from
`image_size` is scaled (bicubic, antialiased) so it covers `image_size`, then centre-cropped to
it; `image_size` is one configurable (H, W), multiples of 16, so a batch shares one grid.
Upstream instead picks, per image, the crop size of `crop_sizes()` with the closest aspect ratio
and crops at a random offset (PA utils/image_utils.py L113-147); `best_crop_size()` reproduces
that choice, so callers can pick `image_size` per aspect bucket the way upstream does.

Pure torch at import time: diffusers is imported lazily by the functions that need it.
Notation: B images, H x W pixels, f downsample factor, h x w = H/f x W/f code grid, C latent channels.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DIFFUSERS_PIN = "diffusers==0.42.1"  # the version this module is tested with
VQVAE_SUBFOLDER = "vqvae"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DEFAULT_IMAGE_SIZE = (512, 512)  # PA inference default --height/--width
MAX_PIXEL = 255

# The aMUSEd VQ-GAN config, as diffusers' scripts/convert_amused.py (make_vqvae) builds it. Assumed
# to be the released A checkpoint's vqvae/config.json (not read from the Hub here).
AMUSED_VQ_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512, 768],
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "in_channels": 3,
    "latent_channels": 64,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "num_vq_embeddings": 8192,
    "out_channels": 3,
    "sample_size": 32,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "mid_block_add_attention": False,
    "lookup_from_codebook": True,
}


def _vqmodel_class():
    try:
        from diffusers import VQModel
    except ImportError as e:
        raise ImportError(f"the A-variant image tokenizer needs diffusers; install it with "
                          f"`pip install {DIFFUSERS_PIN}`") from e
    return VQModel


def build_vqmodel(config: dict | None = None):
    """A VQModel with random weights from a config dict (default: AMUSED_VQ_CONFIG).

    Call it under `with torch.device("meta"):` to get the module tree without any storage.
    """
    return _vqmodel_class()(**(AMUSED_VQ_CONFIG if config is None else config))


def downsample_factor(config) -> int:
    """f = 2 ** (len(block_out_channels) - 1) of a VQModel config (dict or FrozenDict)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def find_vqvae_folder(path: str | Path) -> Path:
    """The folder holding the VQModel files: `path/vqvae` (a checkpoint folder) or `path` itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; pass the A checkpoint folder (the one with "
                                f"{VQVAE_SUBFOLDER}/) or its {VQVAE_SUBFOLDER}/ folder, e.g. a local download of "
                                f"tyfeld/MMaDA-Parallel-A")
    for folder in (path / VQVAE_SUBFOLDER, path):
        if (folder / CONFIG_FILE).is_file():
            if not (folder / WEIGHTS_FILE).is_file():
                raise FileNotFoundError(f"{folder / WEIGHTS_FILE} not found beside {folder / CONFIG_FILE}; copy the "
                                        f"released {VQVAE_SUBFOLDER}/{WEIGHTS_FILE} there")
            return folder
    raise FileNotFoundError(f"neither {path / VQVAE_SUBFOLDER / CONFIG_FILE} nor {path / CONFIG_FILE} exists; pass the "
                            f"A checkpoint folder (with {VQVAE_SUBFOLDER}/{CONFIG_FILE} and {WEIGHTS_FILE}) or that "
                            f"{VQVAE_SUBFOLDER}/ folder itself")


def crop_sizes(num_patches: int = 256, patch_size: int = 32, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Upstream's candidate crop sizes as (H, W): at most num_patches patches, aspect <= max_ratio.

    Same enumeration as generate_crop_size_list((512 // 32) ** 2, 32) (PA utils/image_utils.py
    L136-147), which returns (W, H) pairs.
    """
    out, wp, hp = [], num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            out.append((hp * patch_size, wp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return out


def best_crop_size(height: int, width: int, sizes: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The (H, W) upstream's var_center_crop picks for an image: closest aspect ratio, ties to the larger size.

    PA utils/image_utils.py L127-133 with random_top_k=1 (deterministic; only the crop offset is random there).
    """
    sizes = crop_sizes() if sizes is None else sizes
    keyed = [(min(w / width, h / height) / max(w / width, h / height), (w, h)) for h, w in sizes]
    w, h = max(keyed)[1]
    return h, w


def fit_image(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scales uint8 (B, H, W, 3) images to cover size=(H', W') (bicubic, antialiased), then centre-crops.

    Returns uint8 (B, H', W', 3); images already of that size come back unchanged.
    """
    B, H, W, _ = images.shape
    Ht, Wt = size
    if (H, W) == (Ht, Wt):
        return images
    scale = max(Ht / H, Wt / W)
    Hs, Ws = max(Ht, round(H * scale)), max(Wt, round(W * scale))
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    if (Hs, Ws) != (H, W):
        x = F.interpolate(x, size=(Hs, Ws), mode="bicubic", align_corners=False, antialias=True)
    top, left = (Hs - Ht) // 2, (Ws - Wt) // 2
    x = x[:, :, top:top + Ht, left:left + Wt]
    return x.round().clamp(0, MAX_PIXEL).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1] (VaeImageProcessor, do_normalize=False)."""
    return images.permute(0, 3, 1, 2).float() / MAX_PIXEL


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W), nominally [0, 1] -> uint8 (B, H, W, 3): clip, then round(x * 255) as postprocess does."""
    return (x.float().clamp(0, 1) * MAX_PIXEL).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 torch tensor, got {kind}; convert with "
                         f"torch.as_tensor(x, dtype=torch.uint8)")
    images = images[None] if images.dim() == 3 else images
    if images.dim() != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 1:
        raise ValueError(f"images must have shape (B, H, W, 3) or (H, W, 3), got {tuple(images.shape)}")
    return images


@dataclass(frozen=True, eq=False)
class AmusedVQ:
    """The A variant's VQ image tokenizer; implements ImageTokenizer."""

    model: torch.nn.Module
    """A diffusers VQModel (eval mode, frozen) whose config has lookup_from_codebook=True."""
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    """(H, W) that encode() resizes / crops inputs to; multiples of the downsample factor."""

    def __post_init__(self):
        cfg = self.model.config
        if not cfg.get("lookup_from_codebook", False):
            raise ValueError("the VQModel config has lookup_from_codebook=False, so decode(codes, "
                             "force_not_quantize=True) would not look codes up; use the released vqvae/config.json "
                             "(lookup_from_codebook: true)")
        H, W = self.image_size
        f = self.factor
        if H < f or W < f or H % f or W % f:
            raise ValueError(f"image_size={self.image_size} must be positive multiples of the downsample factor {f}; "
                             f"e.g. {(max(f, H // f * f), max(f, W // f * f))}")

    @property
    def factor(self) -> int:
        return downsample_factor(self.model.config)

    @property
    def codebook_size(self) -> int:
        return self.model.config["num_vq_embeddings"]

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.factor, self.image_size[1] // self.factor)

    @classmethod
    def load(cls, path: str | Path, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> "AmusedVQ":
        """Loads the VQ-GAN from a local A checkpoint folder (with vqvae/) or from the vqvae folder itself."""
        folder = find_vqvae_folder(path)
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("_class_name", "VQModel") != "VQModel":
            raise ValueError(f"{folder / CONFIG_FILE} describes a {config['_class_name']}, not a VQModel; point at the "
                             f"A checkpoint's {VQVAE_SUBFOLDER}/ folder")
        model = _vqmodel_class().from_pretrained(str(folder), torch_dtype=dtype, low_cpu_mem_usage=False)
        model = model.to(device).eval().requires_grad_(False)
        return cls(model=model, image_size=tuple(image_size))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) of any size -> long codes (B, h, w); a single (H, W, 3) image gives (h, w)."""
        single = isinstance(images, torch.Tensor) and images.dim() == 3
        images = fit_image(_check_images(images), self.image_size)
        p = next(self.model.parameters())
        x = to_pixels(images.to(p.device)).to(p.dtype)  # (B, 3, H, W)
        latents = self.model.encode(x).latents  # (B, C, h, w), pre-quantisation
        B, _, h, w = latents.shape
        codes = self.model.quantize(latents)[2][2].reshape(B, h, w).long()
        return codes[0] if single else codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """long codes (B, h, w) -> uint8 (B, h*f, w*f, 3); a single (h, w) grid gives (h*f, w*f, 3).

        Any grid decodes (the VQ-GAN is fully convolutional); encode() always yields self.grid.
        """
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer torch tensor, got "
                             f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        single = codes.dim() == 2
        codes = codes[None] if single else codes
        if codes.dim() != 3 or min(codes.shape) < 1:
            raise ValueError(f"codes must have shape (B, h, w) or (h, w), got {tuple(codes.shape)}; this tokenizer's "
                             f"grid is {self.grid}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes span [{codes.min().item()}, {codes.max().item()}] but the codebook has "
                             f"{self.codebook_size} entries; subtract the image-token offset first")
        p = next(self.model.parameters())
        B, h, w = codes.shape
        shape = (B, h, w, self.model.quantize.vq_embed_dim)  # upstream passes config.latent_channels (equal here)
        x = self.model.decode(codes.long().to(p.device), force_not_quantize=True, shape=shape).sample
        images = to_uint8(x)  # (B, H, W, 3)
        return images[0] if single else images


def load_amused_vq(path: str | Path, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> AmusedVQ:
    """AmusedVQ.load: the A checkpoint folder (with vqvae/) or the vqvae folder itself."""
    return AmusedVQ.load(path, image_size=image_size, device=device, dtype=dtype)
