"""Image tokenizers: the ImageTokenizer interface and PatchVQ, a k-means codebook of raw pixel patches.

PatchVQ cuts an image into p x p patches and replaces each by its nearest codebook entry
(squared L2 over the flattened p*p*3 values). fit() seeds the codebook with distinct patches of
the data, so data with at most codebook_size distinct patches (the toy world) round-trips
encode -> decode exactly; otherwise a few weighted Lloyd iterations refine it. Pure torch:
images cross the boundary as uint8 tensors (B, H, W, 3) or (H, W, 3). Leaves out the MAGVIT-v2
tokenizer of the released checkpoints (same interface, elsewhere) and any file format beyond
one safetensors file plus a JSON config.

Notation: B images, H x W pixels, p patch side, h x w = H/p x W/p patch grid, K codebook size,
D = p*p*3 values per patch, N patches.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "image_tokenizer.safetensors"
CONFIG_FILE = "image_tokenizer.json"
KIND = "patch_vq"
FORMAT_VERSION = 1
MAX_DISTANCE_ELEMENTS = 1 << 22  # patches x codes per distance chunk (32 MiB in float64)
MAX_PIXEL = 255


@runtime_checkable
class ImageTokenizer(Protocol):
    """What the model side needs from an image tokenizer."""

    codebook_size: int
    grid: tuple[int, int]
    image_size: tuple[int, int]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> long codes (B, h, w)."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """long codes (B, h, w) -> uint8 (B, H, W, 3)."""
        ...


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, 3) -> (B, h, w, p*p*3), each patch flattened row-major."""
    B, H, W, C = images.shape
    x = images.reshape(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
    return x.reshape(B, H // p, W // p, p * p * C)


def unpatchify(patches: torch.Tensor, p: int) -> torch.Tensor:
    """(B, h, w, p*p*3) -> (B, H, W, 3); inverse of patchify."""
    B, h, w, _ = patches.shape
    x = patches.reshape(B, h, w, p, p, 3).permute(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, 3)
    return x.reshape(B, h * p, w * p, 3)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for each row of x; ties go to the lowest index.

    x (N, D), codebook (K, D) -> (N,) long. Float64 and chunked over N so memory stays bounded and
    distances between integer pixel values are exact.
    """
    c = codebook.double()
    c2 = (c * c).sum(1)  # (K,)
    chunk = max(1, MAX_DISTANCE_ELEMENTS // max(1, len(c)))
    out = []
    for xs in x.split(chunk):
        xs = xs.double()
        d = (xs * xs).sum(1, keepdim=True) - 2 * xs @ c.T + c2  # (n, K)
        out.append(d.argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _kmeans(points: torch.Tensor, weights: torch.Tensor, codebook: torch.Tensor, iters: int) -> torch.Tensor:
    """Weighted Lloyd iterations; a code that wins no point keeps its previous centroid."""
    for _ in range(iters):
        assign = nearest_code(points, codebook)  # (N,)
        sums = torch.zeros_like(codebook).index_add_(0, assign, points * weights[:, None])
        mass = torch.zeros(len(codebook), dtype=points.dtype).index_add_(0, assign, weights)
        used = mass > 0
        codebook = codebook.clone()
        codebook[used] = sums[used] / mass[used, None]
    return codebook


def _check_images(images: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Validates uint8 (B, H, W, 3) or (H, W, 3); returns the batched view."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 torch tensor, got {kind}; convert with torch.as_tensor(x, "
                         f"dtype=torch.uint8)")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (B, H, W, 3) or (H, W, 3), got {tuple(images.shape)}")
    if image_size is not None and tuple(images.shape[1:3]) != tuple(image_size):
        raise ValueError(f"this tokenizer takes {image_size[0]}x{image_size[1]} (H x W) images, got "
                         f"{images.shape[1]}x{images.shape[2]}; resize them or fit a tokenizer at this size")
    return images


def check_codes(codes, grid: tuple[int, int], codebook_size: int) -> tuple[torch.Tensor, bool]:
    """Validates codes for decode: an integer tensor (B, h, w) or (h, w) on `grid`, values in the codebook.
    Returns (codes as (B, h, w), whether a single grid was given)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer torch tensor, got "
                         f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
    single = codes.dim() == 2
    codes = codes[None] if single else codes
    if codes.dim() != 3 or tuple(codes.shape[1:]) != tuple(grid):
        raise ValueError(f"codes must have shape (B, {grid[0]}, {grid[1]}) or {tuple(grid)}, got {tuple(codes.shape)}; "
                         f"reshape flat sequences with codes.view(-1, *grid)")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes span [{codes.min().item()}, {codes.max().item()}] but valid codes are "
                         f"0..{codebook_size - 1}; subtract the image-token offset first")
    return codes, single


@dataclass(frozen=True, eq=False)
class PatchVQ:
    """Vector quantizer over raw p x p x 3 pixel patches; implements ImageTokenizer."""

    codebook: torch.Tensor
    """(K, p*p*3) float32 patch values in [0, 255]."""
    patch_size: int
    """Patch side p in pixels."""
    image_size: tuple[int, int]
    """(H, W) of the images it encodes; both multiples of patch_size."""

    def __post_init__(self):
        H, W = self.image_size
        if self.patch_size < 1 or H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be whole multiples of patch_size={self.patch_size}")
        D = self.patch_size * self.patch_size * 3
        if self.codebook.dim() != 2 or self.codebook.shape[1] != D or len(self.codebook) == 0:
            raise ValueError(f"codebook must be (K, {D}) for patch_size={self.patch_size}, got "
                             f"{tuple(self.codebook.shape)}")

    @property
    def codebook_size(self) -> int:
        return len(self.codebook)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @classmethod
    def fit(cls, images: torch.Tensor, patch_size: int, codebook_size: int, seed: int = 0,
            iters: int = 10) -> "PatchVQ":
        """Learns a codebook from uint8 images (N, H, W, 3).

        The distinct patches, weighted by frequency, are the k-means points. If there are at most
        codebook_size of them the codebook is exactly those patches (sorted) and the spare slots
        repeat the most frequent patch, so encode -> decode is lossless on this data. Otherwise
        codebook_size distinct patches drawn by frequency (seeded) start `iters` Lloyd iterations.
        """
        images = _check_images(images)
        H, W = images.shape[1:3]
        if patch_size < 1 or H % patch_size or W % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide the image size {H}x{W}; pick a divisor")
        if codebook_size < 1:
            raise ValueError(f"codebook_size={codebook_size} must be >= 1")
        patches = patchify(images, patch_size).reshape(-1, patch_size * patch_size * 3)
        points, counts = torch.unique(patches, dim=0, return_counts=True)  # (U, D), (U,)
        points, weights = points.double(), counts.double()
        if len(points) <= codebook_size:
            spare = points[counts.argmax()].expand(codebook_size - len(points), -1)
            codebook = torch.cat([points, spare])
        else:
            g = torch.Generator().manual_seed(seed)
            start = torch.multinomial(weights, codebook_size, replacement=False, generator=g)
            codebook = _kmeans(points, weights, points[start], iters)
        return cls(codebook=codebook.float().contiguous(), patch_size=patch_size, image_size=(H, W))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> long (B, h, w); a single (H, W, 3) image gives (h, w)."""
        single = images.dim() == 3 if isinstance(images, torch.Tensor) else False
        images = _check_images(images, self.image_size)
        x = patchify(images.to(self.codebook.device), self.patch_size)  # (B, h, w, D)
        codes = nearest_code(x.reshape(-1, x.shape[-1]), self.codebook).reshape(x.shape[:3])
        return codes[0] if single else codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """long (B, h, w) -> uint8 (B, H, W, 3); a single (h, w) grid gives (H, W, 3)."""
        codes, single = check_codes(codes, self.grid, self.codebook_size)
        patches = self.codebook[codes.long().to(self.codebook.device)]  # (B, h, w, D)
        images = unpatchify(patches.round().clamp(0, MAX_PIXEL).to(torch.uint8), self.patch_size)
        return images[0] if single else images

    def save(self, folder: str | Path) -> Path:
        """Writes image_tokenizer.safetensors and image_tokenizer.json into folder; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"codebook": self.codebook.detach().cpu().contiguous()}, str(folder / WEIGHTS_FILE))
        config = {"kind": KIND, "format_version": FORMAT_VERSION, "patch_size": self.patch_size,
                  "codebook_size": self.codebook_size, "image_size": list(self.image_size)}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "PatchVQ":
        """Reads what save() wrote."""
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found; write it with "
                                        f"PatchVQ.fit(...).save({str(folder)!r})")
        config = json.loads((folder / CONFIG_FILE).read_text())
        if config.get("kind") != KIND or config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / CONFIG_FILE} has kind={config.get('kind')!r}, format_version="
                             f"{config.get('format_version')!r}; expected {KIND!r} version {FORMAT_VERSION}")
        codebook = load_file(str(folder / WEIGHTS_FILE))["codebook"]
        if len(codebook) != config["codebook_size"]:
            raise ValueError(f"{folder / WEIGHTS_FILE} holds {len(codebook)} codes but the config says "
                             f"codebook_size={config['codebook_size']}; re-save the tokenizer")
        return cls(codebook=codebook, patch_size=config["patch_size"], image_size=tuple(config["image_size"]))
