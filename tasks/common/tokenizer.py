"""Text tokenizers: any Hugging Face `tokenizer.json` from a local folder, or a tiny one built offline.

The tiny tokenizer is a byte-level BPE trained with the `tokenizers` library whose first ids are
model.tokens.TINY_SPECIAL_TOKENS, so its ids agree with model.tokens.tiny_vocab. Released
checkpoints ship the LLaDA tokenizer, whose special ids are the MMaDA constants.
"""
import os

from model.tokens import TINY_SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"
# A neutral seed corpus so every byte-level merge the toy world needs is learnable.
_SEED_CORPUS = (
    "add remove replace recolour recolor move swap count left right above below top bottom row column "
    "red green blue yellow orange purple cyan pink grey gray white black circle square triangle "
    "the a an of to and is are at in on with every each object objects shape colour color small large "
    "make turn put drop fall falls after where will be there then so result scene image instruction "
    "one two three four five six seven eight zero empty cell grid first second third fourth"
)


class TextTokenizer:
    """encode(str) -> ids without special tokens; decode(ids) -> str, special tokens dropped."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def load(cls, folder: str) -> "TextTokenizer":
        from tokenizers import Tokenizer

        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {folder!r}; save the text tokenizer beside the "
                                    f"checkpoint (TextTokenizer.save) or copy the released tokenizer.json there")
        return cls(Tokenizer.from_file(path))

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self._tok.save(os.path.join(folder, TOKENIZER_FILE))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in this tokenizer")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self._special and i < len(self)],
                                skip_special_tokens=True)


def build_tiny_tokenizer(corpus: list[str] = (), vocab_size: int = 384) -> TextTokenizer:
    """Byte-level BPE with TINY_SPECIAL_TOKENS at ids 0..7; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_SEED_CORPUS] * 4 + list(corpus), trainer=trainer)
    out = TextTokenizer(tok)
    for i, name in enumerate(TINY_SPECIAL_TOKENS):
        assert out.token_id(name) == i, f"special token {name} landed at {out.token_id(name)}, expected {i}"
    return out
