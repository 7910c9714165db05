"""MAGVIT-v2 image tokenizer (HF showlab/magvitv2), the one MMaDA and MMaDA-Parallel-M use; pure torch.

Module tree, parameter names, shapes and forward pass follow `models/modeling_magvitv2.py` (VQGANEncoder,
VQGANDecoder, LFQuantizer, MAGVITv2) and `models/common_modules.py` (ResnetBlock, AttnBlock, Downsample, Upsample)
of showlab/Show-o @ 45a5a2de01d1ebd10cd5864d29310a76476cdf23; both files are byte-identical in Gen-Verse/MMaDA
@ 3cdb8709635beb29f66e4e23cd66060872ac3996 and tyfeld/MMaDA-Parallel @ 5cf89786 (`MMaDA-Parallel-M/models/`).
So the released state_dict loads here with strict=True. Its keys (382 tensors for the released architecture):
  encoder.{conv_in, down.{i}.block.{j}.{norm1,conv1,norm2,conv2[,nin_shortcut]}, down.{i<4}.downsample.conv,
           mid.{block_1, attn_1.{norm,q,k,v,proj_out}, block_2}, norm_out, conv_out, quant_conv}.{weight,bias}
  decoder.{post_quant_conv, conv_in, mid.*, up.{i}.block.{j}.*, up.{i>0}.upsample.conv, norm_out,
           conv_out}.{weight,bias}
  quantize.embedding (8192, 13) float and quantize.power_vals (13,) int64: constant buffers of the LFQ.
The HF repo ships config.json (66 bytes: upstream MAGVITv2() takes no arguments, so the architecture is the constructor
defaults, here MagvitV2Config()) and pytorch_model.safetensors (earlier revisions: pytorch_model.bin).

Pipeline (MMaDA-Parallel-M `training/utils.py::image_transform_squash`, `inference.py`): squash-resize to 512x512
(bicubic), [0, 255] -> [-1, 1]; encoder (x16 down) -> z (B, 13, 32, 32); lookup-free quantization: bit i = [z_i > 0],
code = sum_i 2^(12-i) * bit_i (channel 0 is the most significant bit); decode: each bit -> +-1, decoder, then
clamp((x + 1) / 2, 0, 1) * 255 truncated to uint8 as upstream's numpy astype does. Codes are row-major on the grid.

Leaves out training (LFQ commitment and entropy losses, dropout), the unused timestep embedding (temb_ch = 0
upstream), double_z and video. Deviation: the resize is torch's antialiased bicubic (PIL's filter) in two rounded
passes instead of PIL itself; a 480x640 -> 512x512 photo differs from PIL in ~1e-5 of its values, by 1 level.

Notation: B images, H x W input pixels, S = image_size, C = z_channels = LFQ bits, K = 2^C codes,
f = 2^(levels-1) downsample factor, h x w = S/f x S/f code grid.
"""
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from model.image_tokenizer import _check_images, check_codes

CONFIG_FILE = "config.json"
CLASS_NAME = "MAGVITv2"
WEIGHT_FILES = ("pytorch_model.safetensors", "model.safetensors", "pytorch_model.bin")
"""Weight file names looked for, in order (upstream from_pretrained reads pytorch_model.safetensors first)."""
LFQ_BUFFERS = ("quantize.embedding", "quantize.power_vals")
"""Constant buffers; filled in when a checkpoint leaves them out."""
MAX_BATCH = 8  # images per encoder / decoder call, bounds activation memory (512x512 x 128 ch = 128 MiB per tensor)
DOWNLOAD_HINT = ("download it with `huggingface-cli download showlab/magvitv2 --local-dir {folder}` "
                 "or write one with save_magvit2")


@dataclass(frozen=True)
class MagvitV2Config:
    """Architecture; the defaults are the released showlab/magvitv2 (upstream VQGANEncoder / VQGANDecoder defaults)."""

    ch: int = 128
    """Base channel count of encoder and decoder."""
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    """Encoder channel multiplier per level; each level but the last ends in a stride-2 Downsample."""
    num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    """Encoder ResnetBlocks per level."""
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Decoder channel multiplier per level (index 0 = full resolution)."""
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    """Decoder ResnetBlocks per level (index 0 = full resolution)."""
    attn_resolutions: tuple[int, ...] = (5,)
    """Nominal resolutions (from `resolution`, halved per level) that get an AttnBlock after each ResnetBlock; the
    released (5,) never matches 256/128/64/32/16, so the only attention is mid.attn_1."""
    resolution: int = 256
    """Nominal input resolution, used only to place attn_resolutions (as upstream)."""
    z_channels: int = 13
    """Latent channels = LFQ bits C; codebook_size = 2^C."""
    in_ch: int = 3
    out_ch: int = 3
    image_size: int = 512
    """S: images are squash-resized to S x S before encoding (MMaDA-Parallel-M uses 512)."""

    def __post_init__(self):
        for name in ("ch_mult", "num_res_blocks", "decoder_ch_mult", "decoder_num_res_blocks", "attn_resolutions"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        per_level = ("ch_mult", "num_res_blocks", "decoder_ch_mult", "decoder_num_res_blocks")
        levels = {len(getattr(self, k)) for k in per_level}
        if len(levels) != 1 or 0 in levels:
            raise ValueError(f"ch_mult, num_res_blocks, decoder_ch_mult, decoder_num_res_blocks have lengths {levels}; "
                             f"they need one entry per level and equal counts (down- and upsampling must match)")
        bad = [self.ch * m for m in self.ch_mult + self.decoder_ch_mult if (self.ch * m) % 32]
        if bad or not 1 <= self.z_channels <= 30 or self.image_size % self.factor:
            raise ValueError(f"need ch x mult divisible by 32 for GroupNorm (not {bad}), z_channels in 1..30 (got "
                             f"{self.z_channels}), image_size a multiple of {self.factor} (got {self.image_size})")

    @property
    def factor(self) -> int:
        """f: pixels per code along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_json(self) -> dict:
        """config.json contents: the upstream class name plus the fields that differ from the released defaults."""
        default = MagvitV2Config()
        return {"_class_name": CLASS_NAME, **{k: list(v) if isinstance(v, tuple) else v
                                              for k, v in asdict(self).items() if v != getattr(default, k)}}

    @classmethod
    def from_json(cls, raw: dict, path: str = CONFIG_FILE) -> "MagvitV2Config":
        """Reads config.json; '_' keys (diffusers metadata) are ignored, missing fields take the defaults."""
        if raw.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ValueError(f"{path} has _class_name={raw['_class_name']!r}; expected {CLASS_NAME!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in raw.items() if k in known})


# ---------------------------------------------------------------------------------------------------- LFQ (pure)

def lfq_codes(z: torch.Tensor) -> torch.Tensor:
    """Lookup-free quantization: sign bits of z, channel 0 most significant.

    z (B, C, *spatial), e.g. (B, 13, h, w) -> long codes (B, *spatial) = sum_i 2^(C-1-i) * [z_i > 0].
    """
    C = z.shape[1]
    weights = 2 ** torch.arange(C - 1, -1, -1, device=z.device)  # (C,)
    weights = weights.view(1, C, *([1] * (z.dim() - 2)))
    return ((z > 0).long() * weights).sum(1)


def lfq_embed(codes: torch.Tensor, codebook_dim: int = 13) -> torch.Tensor:
    """Inverse of lfq_codes: bit i of each code (MSB first) -> +1 if set, else -1.

    long codes (B, *spatial), e.g. (B, h, w) -> float (B, C, *spatial) = (B, 13, h, w); codes (K,) -> (K, C).
    """
    shifts = torch.arange(codebook_dim - 1, -1, -1, device=codes.device)  # (C,)
    shifts = shifts.view(1, codebook_dim, *([1] * (codes.dim() - 1)))
    bits = (codes.long().unsqueeze(1) >> shifts) & 1  # (B, C, *spatial)
    return bits.float() * 2 - 1


# ---------------------------------------------------------------------------------------------------- modules

def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _conv3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 nin_shortcut when channels change."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), _conv3(c_in, c_out)
        self.norm2, self.conv2 = _norm(c_out), _conv3(c_out, c_out)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, channels as the head dim, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, kernel_size=1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        return x + self.proj_out(h[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, then a 3x3 stride-2 conv: (B, c, H, W) -> (B, c, H/2, W/2)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: (B, c, H, W) -> (B, c, 2H, 2W)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = _conv3(c, c)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` ResnetBlocks, each followed by attn[j] if `attn` is non-empty, then a resampler."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, with_attn: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if with_attn else 0))

    def forward(self, h):
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class VQGANEncoder(nn.Module):
    """(B, in_ch, S, S) in [-1, 1] -> continuous z (B, C, S/f, S/f)."""

    def __init__(self, cfg: MagvitV2Config):
        super().__init__()
        self.conv_in = _conv3(cfg.in_ch, cfg.ch)
        self.down = nn.ModuleList()
        c, res = cfg.ch, cfg.resolution
        for i, (mult, n) in enumerate(zip(cfg.ch_mult, cfg.num_res_blocks)):
            level = Level(c, cfg.ch * mult, n, res in cfg.attn_resolutions)
            c = cfg.ch * mult
            if i < len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c)
                res //= 2
            self.down.append(level)
        self.mid = Mid(c)
        self.norm_out = _norm(c)
        self.conv_out = _conv3(c, cfg.z_channels)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, S, S)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)  # (B, ch*ch_mult[-1], h, w)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))  # (B, C, h, w)


class VQGANDecoder(nn.Module):
    """+-1 codes (B, C, h, w) -> pixels (B, out_ch, h*f, w*f), roughly in [-1, 1]."""

    def __init__(self, cfg: MagvitV2Config):
        super().__init__()
        n_levels = len(cfg.decoder_ch_mult)
        c, res = cfg.ch * cfg.decoder_ch_mult[-1], cfg.resolution // 2 ** (n_levels - 1)
        self.conv_in = _conv3(cfg.z_channels, c)
        self.mid = Mid(c)
        levels = []
        for i in reversed(range(n_levels)):
            out = cfg.ch * cfg.decoder_ch_mult[i]
            level = Level(c, out, cfg.decoder_num_res_blocks[i], res in cfg.attn_resolutions)
            c = out
            if i != 0:
                level.upsample = Upsample(c)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, run last
        self.norm_out = _norm(c)
        self.conv_out = _conv3(c, cfg.out_ch)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, kernel_size=1)  # runs first (upstream order)

    def forward(self, z):
        h = self.mid(self.conv_in(self.post_quant_conv(z)))  # (B, ch*decoder_ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, h*f, w*f)


class LFQuantizer(nn.Module):
    """Holds upstream's constant buffers: embedding (K, C) = lfq_embed(arange(K)), power_vals (C,) = 2^(C-1..0)."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.register_buffer("embedding", lfq_embed(torch.arange(2 ** codebook_dim), codebook_dim))
        self.register_buffer("power_vals", 2 ** torch.arange(codebook_dim - 1, -1, -1))


# ---------------------------------------------------------------------------------------------------- tokenizer

class MagvitV2(nn.Module):
    """MAGVIT-v2 encoder + LFQ + decoder; implements ImageTokenizer (uint8 images <-> long codes)."""

    def __init__(self, config: MagvitV2Config | None = None):
        super().__init__()
        self.config = config or MagvitV2Config()
        self.encoder = VQGANEncoder(self.config)
        self.decoder = VQGANDecoder(self.config)
        self.quantize = LFQuantizer(self.config.z_channels)

    @property
    def codebook_size(self) -> int:
        return 2 ** self.config.z_channels

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.factor
        return (side, side)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> (B, 3, S, S) in [-1, 1] on the model's device and dtype.

        Any H x W is squash-resized to S x S like upstream's PIL transforms.Resize((S, S), BICUBIC): antialiased
        bicubic, width pass then height pass, each rounded to uint8 levels as PIL does; then ToTensor and
        Normalize(0.5, 0.5).
        """
        p = next(self.parameters())
        x = images.to(p.device).permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 255]
        S = self.config.image_size
        for size in ((x.shape[2], S), (S, S)):  # (H, S) then (S, S); a pass whose side already fits is skipped
            if tuple(x.shape[2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
                x = x.round().clamp(0, 255)
        return (x / 255 * 2 - 1).to(p.dtype).contiguous()

    @staticmethod
    def postprocess(x: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, 3, H, W) -> uint8 (B, H, W, 3): clamp((x+1)/2, 0, 1) * 255, truncated (as upstream)."""
        x = ((x.float() + 1) / 2).clamp(0, 1) * 255
        return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3), any H x W -> long codes (B, h, w), row-major grid; (H, W, 3) gives (h, w)."""
        single = isinstance(images, torch.Tensor) and images.dim() == 3
        images = _check_images(images)
        codes = [lfq_codes(self.encoder(self.preprocess(chunk)))  # (b, C, h, w) -> (b, h, w)
                 for chunk in images.split(MAX_BATCH)]
        codes = torch.cat(codes) if codes else torch.zeros(0, *self.grid, dtype=torch.long)
        return codes[0] if single else codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """long codes (B, h, w) -> uint8 (B, S, S, 3); a single (h, w) grid gives (S, S, 3)."""
        codes, single = check_codes(codes, self.grid, self.codebook_size)
        p = next(self.parameters())
        out = [self.postprocess(self.decoder(lfq_embed(chunk.to(p.device), self.config.z_channels).to(p.dtype)))
               for chunk in codes.split(MAX_BATCH)]
        images = torch.cat(out) if out else torch.zeros(0, *self.image_size, 3, dtype=torch.uint8)
        return images[0] if single else images


# ---------------------------------------------------------------------------------------------------- IO

def save_magvit2(model: MagvitV2, folder: str | Path, weights: str = "safetensors") -> Path:
    """Writes config.json + pytorch_model.safetensors (or pytorch_model.bin with weights="bin"), as released."""
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights={weights!r}; use 'safetensors' or 'bin'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_json(), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, str(folder / WEIGHT_FILES[0]), metadata={"format": "pt"})
    else:
        torch.save(state, folder / WEIGHT_FILES[2])
    return folder


def _read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            state = load_file(str(path)) if name.endswith(".safetensors") else \
                torch.load(path, map_location="cpu", weights_only=True)
            return path, state
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(WEIGHT_FILES)}; found {present}); "
                            + DOWNLOAD_HINT.format(folder=folder))


def load_magvit2(folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> MagvitV2:
    """Loads a showlab/magvitv2-format folder (config.json + weights) built on meta, then moved to device/dtype.

    Checkpoints without the two LFQ buffers get them computed; any other missing or unexpected key, or a shape
    mismatch, raises with the keys listed. Returns the model in eval mode with gradients off.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; " + DOWNLOAD_HINT.format(folder=folder))
    config = MagvitV2Config.from_json(json.loads(config_path.read_text()), str(config_path))
    weights_path, state = _read_weights(folder)
    with torch.device("meta"):
        model = MagvitV2(config)
    expected = model.state_dict()
    reference = LFQuantizer(config.z_channels).state_dict()  # real (cpu) constants
    for key in LFQ_BUFFERS:  # derived constants: fill in if absent, and a different code order is an error
        ref = reference[key.split(".", 1)[1]]
        if key not in state:
            state[key] = ref
        elif state[key].shape == ref.shape and not torch.equal(state[key].to(ref.dtype), ref):
            raise ValueError(f"{weights_path} holds a {key} that is not the MSB-first +-1 table of "
                             f"{config.z_channels} bits; this loader assumes upstream's code order")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match the architecture in {config_path}: {len(missing)} "
                         f"missing keys {missing[:20]}, {len(unexpected)} unexpected keys {unexpected[:20]}; fix the "
                         f"architecture fields of config.json (released showlab/magvitv2 has none) or re-download")
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        raise ValueError(f"{weights_path} has {len(shapes)} shape mismatches with {config_path}: {shapes[:20]}")
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
