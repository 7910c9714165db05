"""The joint text + image vocabulary: every special token id, named once.

Two layouts share one shape. MMaDA / MMaDA-Parallel-M (LLaDA tokenizer, MAGVIT-v2 codes):
text ids [0, 126349), image code c at id 126349 + c for c < 8192. The tiny layout used by the
embedded default puts the same special tokens first in a small offline-built tokenizer, then the
image codes. Holds ids only; the text tokenizer itself lives in tasks/tokenizer.py.
"""
from dataclasses import asdict, dataclass

# --- LLaDA / MMaDA ids (upstream-facts §2, §2.1) ---------------------------------------------
MASK_ID = 126336              # <|mdm_mask|>
BOS_ID = 126080               # <|startoftext|>, also <|sot|>
EOS_ID = 126081               # <|endoftext|>, also <|eot|>
SOI_ID = 126084               # <|soi|> start of image
EOI_ID = 126085               # <|eoi|> end of image
T2I_ID = 126088               # <|t2i|>
MMU_ID = 126089               # <|mmu|>
IPAD_ID = 126093              # [iPAD]
INTERLEAVE_ID = 126095        # <|interleave|>: thinking-aware editing (MMaDA-Parallel-M)
T2IT_ID = 126096              # <|t2it|>: thinking-aware generation (MMaDA-Parallel-M)
LLADA_TOKENIZER_SIZE = 126349  # len(LLaDA tokenizer) = first image id
MMADA_CODEBOOK_SIZE = 8192     # MAGVIT-v2 LFQ, 13 bits
MMADA_VOCAB_SIZE = 134656      # embedding rows: 126464 + 8192

# --- tiny layout: specials first, in this order, in the offline tokenizer --------------------
TINY_SPECIAL_TOKENS = (
    "<|pad|>", "<|mdm_mask|>", "<|startoftext|>", "<|endoftext|>",
    "<|soi|>", "<|eoi|>", "<|interleave|>", "<|t2it|>",
)


@dataclass(frozen=True)
class Vocab:
    """Special ids and the image-code range of one model's vocabulary."""

    mask_id: int
    """Absorbing [MASK] state of the forward process."""
    bos_id: int
    """Start of a text span."""
    eos_id: int
    """End of a text span; also pads the output text region (supervised, as upstream)."""
    soi_id: int
    """Start of an image block."""
    eoi_id: int
    """End of an image block."""
    edit_task_id: int
    """Task token of thinking-aware editing (<|interleave|> in the M variant)."""
    gen_task_id: int
    """Task token of thinking-aware generation (<|t2it|> in the M variant)."""
    pad_id: int
    """Left padding of batched prompts; never attended to."""
    image_offset: int
    """Id of image code 0; text ids are all below it."""
    codebook_size: int
    """Number of image codes."""
    vocab_size: int
    """Rows of the embedding and of the output head (may exceed image_offset + codebook_size)."""

    def __post_init__(self):
        end = self.image_offset + self.codebook_size
        if end > self.vocab_size:
            raise ValueError(f"image codes end at {end} but vocab_size is {self.vocab_size}; "
                             f"raise vocab_size to at least {end}")
        specials = (self.mask_id, self.bos_id, self.eos_id, self.soi_id, self.eoi_id,
                    self.edit_task_id, self.gen_task_id)
        if max(specials) >= self.image_offset:
            raise ValueError(f"special ids {specials} must lie below image_offset={self.image_offset}")

    @property
    def text_vocab_size(self) -> int:
        return self.image_offset

    def image_id(self, code: int) -> int:
        return self.image_offset + code

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


MMADA_VOCAB = Vocab(
    mask_id=MASK_ID, bos_id=BOS_ID, eos_id=EOS_ID, soi_id=SOI_ID, eoi_id=EOI_ID,
    edit_task_id=INTERLEAVE_ID, gen_task_id=T2IT_ID, pad_id=EOS_ID,
    image_offset=LLADA_TOKENIZER_SIZE, codebook_size=MMADA_CODEBOOK_SIZE, vocab_size=MMADA_VOCAB_SIZE,
)


def tiny_vocab(text_vocab_size: int, codebook_size: int) -> Vocab:
    """Layout of a tiny model: TINY_SPECIAL_TOKENS hold ids 0..7 of its tokenizer."""
    if text_vocab_size <= len(TINY_SPECIAL_TOKENS):
        raise ValueError(f"text_vocab_size={text_vocab_size} leaves no room for ordinary text tokens")
    ids = {name: i for i, name in enumerate(TINY_SPECIAL_TOKENS)}
    return Vocab(
        mask_id=ids["<|mdm_mask|>"], bos_id=ids["<|startoftext|>"], eos_id=ids["<|endoftext|>"],
        soi_id=ids["<|soi|>"], eoi_id=ids["<|eoi|>"], edit_task_id=ids["<|interleave|>"],
        gen_task_id=ids["<|t2it|>"], pad_id=ids["<|pad|>"], image_offset=text_vocab_size,
        codebook_size=codebook_size, vocab_size=text_vocab_size + codebook_size,
    )
