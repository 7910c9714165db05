"""Image tokenizer fitting over a samples table, and PNG bytes <-> uint8 tensors."""
import io

import numpy as np
import pyarrow.compute as pc
import torch
from prefect import task

from model.image_tokenizer import PatchVQ
from storage.parquet import read_table

FIT_IMAGES = 2000  # images the codebook is fitted on (the toy world needs a few hundred)


def png_to_tensor(data: bytes) -> torch.Tensor:
    """PNG / JPEG bytes -> uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy())


def tensor_to_png(image: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.cpu().numpy()).save(buf, format="PNG")
    return buf.getvalue()


@task
def fit_image_tokenizer(root: str, dataset: str, out: str, patch_size: int = 8, codebook_size: int = 16,
                        seed: int = 0) -> str:
    """Fits a PatchVQ on the train split's input and output images; saves it to `out`."""
    tbl = read_table(root, "samples", run=dataset, filter=pc.field("split") == "train",
                     columns=["input_image", "output_image"])
    if tbl.num_rows == 0:
        raise ValueError(f"no train samples in {root!r} dataset {dataset!r}; run the aggregate flow first")
    blobs = [b for col in ("output_image", "input_image") for b in tbl.column(col).to_pylist() if b][:FIT_IMAGES]
    images = torch.stack([png_to_tensor(b) for b in blobs])  # (B, H, W, 3)
    vq = PatchVQ.fit(images, patch_size=patch_size, codebook_size=codebook_size, seed=seed)
    vq.save(out)
    return out
