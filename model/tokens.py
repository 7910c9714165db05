"""The joint text + image vocabulary: every special token id, named once.

Layouts share one shape: text ids [0, image_offset), then codebook_size image codes, then spare
rows up to vocab_size. MMaDA / MMaDA-Parallel-M (LLaDA tokenizer, MAGVIT-v2 codes): image code c
at id 126349 + c for c < 8192. Lumina-DiMOO / MMaDA-Parallel-A: 7 more text tokens, codes at
126356 + c. Plain LLaDA-8B is text-only (codebook_size 0). The tiny layout used by the embedded
default puts the same special tokens first in a small offline-built tokenizer, then the image
codes. Holds ids only; the text tokenizer itself lives in tasks/common/tokenizer.py, and reading the
files of a checkpoint folder in model/checkpoint.py.
"""
from dataclasses import asdict, dataclass, replace

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
LLADA_EMBEDDING_ROWS = 126464  # LLaDA-8B embedding_size: the tokenizer padded to a multiple of 128
MMADA_CODEBOOK_SIZE = 8192     # MAGVIT-v2 LFQ, 13 bits
MMADA_VOCAB_SIZE = 134656      # embedding rows: 126464 + 8192

# --- Lumina-DiMOO / MMaDA-Parallel-A ids (upstream-facts §2.2) -------------------------------
LUMINA_TEXT_VOCAB_SIZE = 126356  # LLaDA tokenizer + 7 added tokens = first image id
LUMINA_BOI_ID = 126349           # <boi> start of image
LUMINA_EOI_ID = 126350           # <eoi> end of image
LUMINA_PAD_ID = 126339           # pads the answer text in PA training
ROW_PADDING = 128                # LLaDA-family embeddings round their rows up to a multiple of this

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
    """Number of image codes; 0 for a text-only model (plain LLaDA), see with_codebook."""
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

    def with_codebook(self, codebook_size: int) -> "Vocab":
        """This text-only vocabulary grown by an image codebook, the way MMaDA grew LLaDA-8B: codes
        start at image_offset (the end of the tokenizer) and vocab_size grows by codebook_size, so
        LLADA_VOCAB.with_codebook(8192) == MMADA_VOCAB. The model grows with DiffusionLM.add_rows."""
        if self.codebook_size:
            raise ValueError(f"this vocabulary already has {self.codebook_size} image codes")
        return replace(self, codebook_size=codebook_size, vocab_size=self.vocab_size + codebook_size)


MMADA_VOCAB = Vocab(
    mask_id=MASK_ID, bos_id=BOS_ID, eos_id=EOS_ID, soi_id=SOI_ID, eoi_id=EOI_ID,
    edit_task_id=INTERLEAVE_ID, gen_task_id=T2IT_ID, pad_id=EOS_ID,
    image_offset=LLADA_TOKENIZER_SIZE, codebook_size=MMADA_CODEBOOK_SIZE, vocab_size=MMADA_VOCAB_SIZE,
)
# Plain LLaDA-8B: no image codes. Its image/task ids are the reserved slots MMaDA and
# MMaDA-Parallel-M later trained for them, so growing it by a codebook gives the MMaDA layout.
LLADA_VOCAB = replace(MMADA_VOCAB, codebook_size=0, vocab_size=LLADA_EMBEDDING_ROWS)


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


# --- vocabulary of a released folder (config.json + tokenizer files, no parapipe_vocab) ------
# Names a tokenizer gives each role, and the config.json key that may state the same id.
ROLE_TOKENS = {
    "mask_id": ("<|mdm_mask|>", "mask_token_id"), "bos_id": ("<|startoftext|>", "bos_token_id"),
    "eos_id": ("<|endoftext|>", "eos_token_id"), "soi_id": ("<|soi|>", None), "eoi_id": ("<|eoi|>", None),
    "edit_task_id": ("<|interleave|>", None), "gen_task_id": ("<|t2it|>", None), "pad_id": ("<|pad|>", "pad_token_id"),
}
# Ids of roles the released tokenizers do not name, by tokenizer size. MMaDA uses reserved LLaDA
# slots (prompting_utils.py); Lumina-DiMOO / PA fix theirs in code and have no task tokens, so the
# M-style task ids there are the same reserved slots, untrained in those weights.
RELEASED_SPECIALS = {
    LLADA_TOKENIZER_SIZE: dict(mask_id=MASK_ID, bos_id=BOS_ID, eos_id=EOS_ID, soi_id=SOI_ID, eoi_id=EOI_ID,
                               edit_task_id=INTERLEAVE_ID, gen_task_id=T2IT_ID, pad_id=EOS_ID),
    LUMINA_TEXT_VOCAB_SIZE: dict(mask_id=MASK_ID, bos_id=BOS_ID, eos_id=EOS_ID, soi_id=LUMINA_BOI_ID,
                                 eoi_id=LUMINA_EOI_ID, edit_task_id=INTERLEAVE_ID, gen_task_id=T2IT_ID,
                                 pad_id=LUMINA_PAD_ID),
}
# The LLaDA tokenizer's named specials: assumed when a folder of the published LLaDA / MMaDA
# shape ships no tokenizer files.
LLADA_TOKEN_IDS = {"<|mdm_mask|>": MASK_ID, "<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}


def released_codebook_size(config: dict, spare_rows: int) -> int:
    """Image codes of a released model: config `codebook_size` (MMaDA), else read off the embedding
    rows beyond the text ids: fewer than ROW_PADDING is LLaDA's padding (text-only); 8192 plus
    such padding is the 8192-code VQ of MMaDA (MAGVIT-v2) and Lumina-DiMOO (aMUSEd VQ)."""
    if "codebook_size" in config:
        return int(config["codebook_size"])
    if spare_rows < ROW_PADDING:
        return 0
    if 0 <= spare_rows - MMADA_CODEBOOK_SIZE < ROW_PADDING:
        return MMADA_CODEBOOK_SIZE
    raise ValueError(f"{spare_rows} embedding rows beyond the text ids match no released layout "
                     f"(< {ROW_PADDING}: text-only; {MMADA_CODEBOOK_SIZE}(+padding): 8192-code VQ); "
                     f"add codebook_size to config.json")


def released_vocab(config: dict, rows: int, token_ids: dict[str, int] | None,
                   tokenizer_size: int | None) -> Vocab:
    """The vocabulary of a released folder, from its config.json and tokenizer files.

    Text ids end at the tokenizer size (plus MMaDA's num_new_special_tokens); image codes follow
    (released_codebook_size). Each special id is the tokenizer's id of its name (ROLE_TOKENS), which
    must agree with the config key that states it; else the config key; else the released ids for
    this tokenizer size (RELEASED_SPECIALS). Pad never conflicts: the released layout's pad (PA pads
    with 126339), else pad_token_id, else <|pad|>, else eos.

    Args:
        config: the config.json dict.
        rows: embedding rows of the model.
        token_ids: token name -> id from the tokenizer files; None when none ship.
        tokenizer_size: first id past the tokenizer (len(tokenizer)); None if unknown.
    Raises:
        ValueError: on a conflict (a name and a config key disagree, an id outside the text ids,
            more ids than rows) or when the layout cannot be told.
    """
    if token_ids is None:
        if rows not in (LLADA_EMBEDDING_ROWS, MMADA_VOCAB_SIZE):
            raise ValueError(f"no tokenizer files, and embedding_size={rows} is not a published LLaDA/MMaDA one "
                             f"({LLADA_EMBEDDING_ROWS}, {MMADA_VOCAB_SIZE}); copy the released tokenizer.json "
                             f"beside config.json")
        token_ids, tokenizer_size = LLADA_TOKEN_IDS, LLADA_TOKENIZER_SIZE
    if tokenizer_size is None:
        raise ValueError("the tokenizer files do not tell the tokenizer size; ship tokenizer.json beside config.json")
    offset = tokenizer_size + int(config.get("num_new_special_tokens") or 0)
    codebook = released_codebook_size(config, rows - offset)
    if offset + codebook > rows:
        raise ValueError(f"{offset} text ids + {codebook} image codes need {offset + codebook} embedding rows "
                         f"but embedding_size={rows}; the tokenizer or codebook_size does not belong to these weights")
    fallback = RELEASED_SPECIALS.get(tokenizer_size, {})
    ids, missing = {}, []
    for role, (name, key) in ROLE_TOKENS.items():
        named, stated = token_ids.get(name), config.get(key) if key else None
        if role == "pad_id":  # never attended to, so no conflict: the released code's pad, else the config's
            order = (fallback.get(role), stated, named, ids["eos_id"])
        elif named is not None and stated is not None and named != stated:
            raise ValueError(f"the tokenizer has {name} at id {named} but config.json says {key}={stated}; "
                             f"they must agree (is the tokenizer from another model?)")
        else:
            order = (named, stated, fallback.get(role))
        vid = next((v for v in order if v is not None), None)
        if vid is None:
            missing.append(name)
        elif not 0 <= vid < offset:
            where = f"config.json {key}={vid}" if vid == stated else f"tokenizer {name}={vid}"
            raise ValueError(f"{where} is not a text id: the text ids end at {offset} (tokenizer size "
                             f"{tokenizer_size}) and image codes or spare rows follow")
        ids[role] = vid
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} and its size {tokenizer_size} matches no "
                         f"released layout ({', '.join(map(str, RELEASED_SPECIALS))}); add these tokens to the "
                         f"tokenizer")
    return Vocab(**ids, image_offset=offset, codebook_size=codebook, vocab_size=rows)
