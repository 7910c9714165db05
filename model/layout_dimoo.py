"""Sequence layout of MMaDA-Parallel-A / Lumina-DiMOO (aMUSEd codes, a newline token after every image row).

    editing:     INSTR[:-1] <boi> IN_ROWS <eoi> INSTR[-1] | <answer> <boi> OUT_ROWS <eoi> TEXT </answer>
    generation:  INSTR                                    | <answer> <boi> OUT_ROWS <eoi> TEXT </answer>

    INSTR    = tokenizer("<system>SYS</system><user>USER</user>") ids (instruction_text / instruction_ids)
    ROWS     = for each of the h rows: w image ids (code + 126356), then <newline> 126084
    TEXT     = the reasoning trace, padded with <eos> to text_tokens slots

Left of the bar is the prompt (never noised); right of it the output part. Unlike the M layout
(model/layout.py) the output image comes *before* the text, the image block carries a newline id
after each row, and there are no task tokens: the system prompt names the task. The output part's
<answer>, <boi>, newlines, <eoi> and </answer> are fixed sentinels (region PROMPT, never masked), so
the region codes of model/layout.py (PROMPT / IMAGE / TEXT) and its samplers apply unchanged.

Upstream facts (tyfeld/MMaDA-Parallel @5cf8978, path prefix MMaDA-Parallel-A/ = PA; Alpha-VLLM/Lumina-DiMOO @81344e6):
- Ids: PA inference.py L22-31, PA model/modeling_xllmx_dimoo.py L28-34 (PAD 126339), Lumina config.py L27-36.
- Image block = <boi> + (row + newline) * h + <eoi>: PA utils/image_utils.py L149-157 (add_break_line),
  L167-172 (encode_img_with_breaks); Lumina utils/image_utils.py L136-160.
- Edit prompt: the input image block is spliced in before the *last* prompt id,
  `prompt_ids[:-1] + img + prompt_ids[-1:]`: PA inference.py L117, L129; PA train/train.py L140.
- Instruction strings "<system>SYS</system><user>INSTR</user>" and the uncond-text variant with
  INSTR = "<uncondition>": PA utils/prompt_utils.py L209-233; T2I: L37-38. SYS for editing: PA
  inference.py L32-34; for generation: PA utils/prompt_utils.py L11 (Lumina's T2I prompt).
- Output part `[<answer>, <boi>] + (MASK * w + [newline]) * h + [<eoi>] + MASK * T + tok("</answer>")`:
  PA inference.py L146-150; text region = [image_end + 1, +T): L152-156. Training writes the same
  with the clean codes, an unpadded trace and 126355 (PA train/train.py L117, L120, L159, L162);
  `text_tokens=0` gives the image-only answer `<answer> <boi> ... <eoi> </answer>` exactly.
- CFG: uncond-text prompt = the instruction with USER -> <uncondition>, image kept (PA inference.py
  L130); uncond-image prompt = the conditional instruction ids without the image (L131). Training
  conditioning dropout (10%) drops both together (PA train/train.py L125-128).
Deliberate differences: the trace is padded with <eos> to a fixed text_tokens (upstream trains
unpadded, samples a fixed 256-slot region); unconditional sequences are built by concatenating an
unconditional prompt with the output part, as Lumina-DiMOO does (generators/image_to_image_generator.py
L88-92), not by overwriting the conditional prefix in place as PA does (upstream-facts §3.1a).
Unverified: whether the released tokenizer maps each tag to one id and adds no BOS/EOS (then
instruction_ids() equals tokenizing instruction_text()); the vocabulary size 134548 is inferred
(Lumina generators/image_generation_generator.py L82-85 takes the image offset as logits width - 8192).
"""
from collections.abc import Callable
from dataclasses import dataclass

from model.layout import IMAGE, PROMPT, TEXT
from model.tokens import (BOS_ID, EOS_ID, INTERLEAVE_ID, LUMINA_BOI_ID, LUMINA_EOI_ID, LUMINA_PAD_ID,
                          LUMINA_TEXT_VOCAB_SIZE, MASK_ID, T2IT_ID, Vocab)

# --- Lumina-DiMOO / MMaDA-Parallel-A ids (upstream-facts §2.2; shared ones live in model/tokens.py) ----
NEWLINE_ID = 126084         # end of an image row (same id as MMaDA's <|soi|>)
BOI_ID = LUMINA_BOI_ID      # <boi> / <IMAGE>: start of an image block
EOI_ID = LUMINA_EOI_ID      # <eoi>: end of an image block
UNCONDITION_ID = 126351     # <uncondition>: replaces the user text in unconditional prompts
ANSWER_START_ID = 126354    # <answer>
ANSWER_END_ID = 126355      # </answer>
PAD_ID = LUMINA_PAD_ID      # padding of batched sequences
DIMOO_IMAGE_OFFSET = LUMINA_TEXT_VOCAB_SIZE  # text_vocab_size: id of image code 0
DIMOO_CODEBOOK_SIZE = 8192   # aMUSEd VQ codes
DIMOO_VOCAB_SIZE = 134548    # 126356 + 8192 embedding / logit rows (inferred; a checkpoint's own rows win)

# --- prompt strings -----------------------------------------------------------------------------
SYSTEM_OPEN, SYSTEM_CLOSE, USER_OPEN, USER_CLOSE = "<system>", "</system>", "<user>", "</user>"
UNCONDITION = "<uncondition>"
ANSWER_END = "</answer>"
EDIT_SYSTEM_PROMPT = "Generate an image applying the following editing instruction based on the original image."
GEN_SYSTEM_PROMPT = "Generate an image according to the text prompt."


@dataclass(frozen=True)
class DimooIds:
    """Every id the A layout writes; DIMOO_IDS holds the released ones, a toy model may use small ids."""

    mask_id: int
    newline_id: int
    boi_id: int
    eoi_id: int
    uncondition_id: int
    answer_start_id: int
    answer_end_id: int
    pad_id: int
    bos_id: int
    """LLaDA <|startoftext|>; unused by the layout, kept for the Vocab."""
    eos_id: int
    """Pads the output text region (supervised, as in the M layout)."""
    image_offset: int
    codebook_size: int
    vocab_size: int

    def __post_init__(self):
        tags = (self.mask_id, self.newline_id, self.boi_id, self.eoi_id, self.uncondition_id,
                self.answer_start_id, self.answer_end_id, self.eos_id)
        if len(set(tags)) != len(tags):
            raise ValueError(f"mask/newline/boi/eoi/uncondition/answer/eos ids {tags} must be distinct")
        if max(tags + (self.pad_id, self.bos_id)) >= self.image_offset:
            raise ValueError(f"special ids must lie below image_offset={self.image_offset}")
        if self.image_offset + self.codebook_size > self.vocab_size:
            raise ValueError(f"image codes end at {self.image_offset + self.codebook_size} but vocab_size is "
                             f"{self.vocab_size}; raise vocab_size")

    def image_id(self, code: int) -> int:
        return self.image_offset + code

    def vocab(self, edit_task_id: int = INTERLEAVE_ID, gen_task_id: int = T2IT_ID) -> Vocab:
        """The model.tokens.Vocab of this layout: soi/eoi = <boi>/<eoi>, pad = PAD.

        The A layout has no task tokens (the system prompt names the task) and never writes the
        task ids; they default to the M variant's reserved slots (<|interleave|>, <|t2it|>), untrained
        in the A weights. Newline, <answer>, </answer> and <uncondition> have no Vocab field: they
        stay on DimooIds. A toy DimooIds must pass task ids below its image_offset.
        """
        return Vocab(mask_id=self.mask_id, bos_id=self.bos_id, eos_id=self.eos_id, soi_id=self.boi_id,
                     eoi_id=self.eoi_id, edit_task_id=edit_task_id, gen_task_id=gen_task_id, pad_id=self.pad_id,
                     image_offset=self.image_offset, codebook_size=self.codebook_size, vocab_size=self.vocab_size)


DIMOO_IDS = DimooIds(
    mask_id=MASK_ID, newline_id=NEWLINE_ID, boi_id=BOI_ID, eoi_id=EOI_ID, uncondition_id=UNCONDITION_ID,
    answer_start_id=ANSWER_START_ID, answer_end_id=ANSWER_END_ID, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    image_offset=DIMOO_IMAGE_OFFSET, codebook_size=DIMOO_CODEBOOK_SIZE, vocab_size=DIMOO_VOCAB_SIZE,
)


def ids_for(vocab: Vocab) -> "DimooIds":
    """The layout ids of a checkpoint's vocabulary: the released ones with its mask, pad, eos, offset and codebook."""
    import dataclasses

    return dataclasses.replace(DIMOO_IDS, mask_id=vocab.mask_id, eos_id=vocab.eos_id, image_offset=vocab.image_offset,
                               codebook_size=vocab.codebook_size, boi_id=vocab.soi_id, eoi_id=vocab.eoi_id,
                               vocab_size=vocab.vocab_size, pad_id=vocab.pad_id)


def dimoo_vocab() -> Vocab:
    """The Vocab of the released A checkpoint (MMaDA-Parallel-A / Lumina-DiMOO)."""
    return DIMOO_IDS.vocab()


@dataclass(frozen=True)
class DimooOutputShape:
    """Fixed shape of the A layout's output part; duck-types model.layout.OutputShape."""

    grid: tuple[int, int]
    """(h, w) code grid of the output image (image_size / 16)."""
    text_tokens: int
    """Text slots after <eoi>: the trace, then <eos> padding; 0 gives an image-only answer."""

    def __post_init__(self):
        h, w = self.grid
        if h < 1 or w < 1 or self.text_tokens < 0:
            raise ValueError(f"DimooOutputShape(grid={self.grid}, text_tokens={self.text_tokens}): the grid needs "
                             f"h, w >= 1 and text_tokens >= 0")

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def length(self) -> int:
        """<answer> <boi> h*(w+1) <eoi> text </answer>."""
        return self.grid[0] * (self.grid[1] + 1) + self.text_tokens + 4


def _rows(cells: list[int], grid: tuple[int, int], newline: int) -> list[int]:
    """Row-major cells (h*w) with `newline` after each row of w (add_break_line)."""
    h, w = grid
    if len(cells) != h * w:
        raise ValueError(f"got {len(cells)} image slots for a {h}x{w} grid; use the grid the codes were encoded at")
    return [x for r in range(h) for x in cells[r * w:(r + 1) * w] + [newline]]


def _image_ids(codes: list[int], ids: DimooIds) -> list[int]:
    bad = [c for c in codes if not 0 <= c < ids.codebook_size]
    if bad:
        raise ValueError(f"image codes {bad[:3]} outside [0, {ids.codebook_size})")
    return [ids.image_id(c) for c in codes]


def image_block(codes: list[int], grid: tuple[int, int], ids: DimooIds = DIMOO_IDS) -> list[int]:
    """<boi> (w image ids + <newline>) * h <eoi> for row-major codes of an (h, w) grid."""
    return [ids.boi_id] + _rows(_image_ids(codes, ids), grid, ids.newline_id) + [ids.eoi_id]


def output_regions(shape: DimooOutputShape) -> list[int]:
    """Region code of every output slot: sentinels (incl. newlines) PROMPT, codes IMAGE, trace TEXT."""
    image = _rows([IMAGE] * shape.image_tokens, shape.grid, PROMPT)
    return [PROMPT, PROMPT] + image + [PROMPT] + [TEXT] * shape.text_tokens + [PROMPT]


def output_template(shape: DimooOutputShape, ids: DimooIds = DIMOO_IDS) -> list[int]:
    """The fully masked output part the sampler starts from (PA inference.py L146-150)."""
    image = _rows([ids.mask_id] * shape.image_tokens, shape.grid, ids.newline_id)
    return ([ids.answer_start_id, ids.boi_id] + image + [ids.eoi_id] + [ids.mask_id] * shape.text_tokens
            + [ids.answer_end_id])


def output_target(shape: DimooOutputShape, image_codes: list[int], text_ids: list[int],
                  ids: DimooIds = DIMOO_IDS) -> list[int]:
    """The clean output part: <answer>, the image block, the trace <eos>-padded to text_tokens, </answer>."""
    if len(image_codes) != shape.image_tokens:
        raise ValueError(f"got {len(image_codes)} image codes for a {shape.grid[0]}x{shape.grid[1]} output grid; "
                         f"encode the target at the output image size")
    if len(text_ids) > shape.text_tokens:
        raise ValueError(f"trace of {len(text_ids)} tokens exceeds text_tokens={shape.text_tokens}; "
                         f"raise text_tokens or filter long traces")
    text = list(text_ids) + [ids.eos_id] * (shape.text_tokens - len(text_ids))
    return [ids.answer_start_id] + image_block(image_codes, shape.grid, ids) + text + [ids.answer_end_id]


def instruction_text(system_prompt: str, user_text: str | None) -> str:
    """"<system>SYS</system><user>USER</user>"; None puts <uncondition> in place of the user text."""
    user = UNCONDITION if user_text is None else user_text
    return f"{SYSTEM_OPEN}{system_prompt}{SYSTEM_CLOSE}{USER_OPEN}{user}{USER_CLOSE}"


@dataclass(frozen=True)
class PromptTags:
    """Token ids of the four instruction tags (one id each if the tokenizer has them as added tokens)."""

    system_open: tuple[int, ...]
    system_close: tuple[int, ...]
    user_open: tuple[int, ...]
    user_close: tuple[int, ...]

    @classmethod
    def from_encoder(cls, encode: Callable[[str], list[int]]) -> "PromptTags":
        """Tags tokenised with `encode` (str -> ids, no special tokens added)."""
        return cls(*(tuple(encode(t)) for t in (SYSTEM_OPEN, SYSTEM_CLOSE, USER_OPEN, USER_CLOSE)))


def instruction_ids(tags: PromptTags, system_ids: list[int], user_ids: list[int] | None,
                    ids: DimooIds = DIMOO_IDS) -> list[int]:
    """Ids of instruction_text() assembled from parts; None puts <uncondition> in place of the user ids."""
    user = [ids.uncondition_id] if user_ids is None else list(user_ids)
    return (list(tags.system_open) + list(system_ids) + list(tags.system_close) + list(tags.user_open) + user
            + list(tags.user_close))


def edit_prompt(instruction: list[int], image_codes: list[int] | None, grid: tuple[int, int] | None = None,
                ids: DimooIds = DIMOO_IDS) -> list[int]:
    """Editing prompt: the input image block spliced in before the last instruction id.

    instruction: ids of instruction_text(EDIT_SYSTEM_PROMPT, user) (or of its <uncondition> form).
    image_codes: row-major codes of the input image on `grid`; None drops the image (CFG / dropout).
    """
    if len(instruction) < 1:
        raise ValueError("the instruction ids are empty; tokenise instruction_text(...) first")
    if image_codes is None:
        return list(instruction)
    if grid is None:
        raise ValueError("edit_prompt needs the input image's grid (h, w) alongside its codes")
    return list(instruction[:-1]) + image_block(image_codes, grid, ids) + list(instruction[-1:])


def generation_prompt(instruction: list[int]) -> list[int]:
    """Generation prompt: the instruction ids of instruction_text(GEN_SYSTEM_PROMPT, prompt) as they are."""
    if len(instruction) < 1:
        raise ValueError("the instruction ids are empty; tokenise instruction_text(...) first")
    return list(instruction)


def edit_cfg_prompts(instruction: list[int], uncond_instruction: list[int], image_codes: list[int],
                     grid: tuple[int, int], ids: DimooIds = DIMOO_IDS) -> tuple[list[int], list[int], list[int]]:
    """(conditional, uncond-text, uncond-image) editing prompts for the two image guidance terms.

    uncond-text keeps the image and uses the <uncondition> instruction; uncond-image keeps the
    instruction and drops the image. Each is joined with the same output part by concatenation.
    """
    return (edit_prompt(instruction, image_codes, grid, ids), edit_prompt(uncond_instruction, image_codes, grid, ids),
            edit_prompt(instruction, None))
