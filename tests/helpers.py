"""Tiny configs and mock models shared by the model tests."""
import torch

from model.tokens import tiny_vocab
from model.transformer import DiffusionLM, ModelConfig

VOCAB = tiny_vocab(text_vocab_size=48, codebook_size=16)


def tiny_config(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=64, vocab_size=VOCAB.vocab_size,
                embedding_size=VOCAB.vocab_size, rope_theta=10000.0)
    return ModelConfig(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> DiffusionLM:
    return DiffusionLM(tiny_config(**kw)).init_weights(seed).eval()


class MockModel(torch.nn.Module):
    """Uniform logits (or a custom function of the input ids), counting forward passes."""

    def __init__(self, vocab_size: int, fn=None):
        super().__init__()
        self.V, self.fn, self.calls = vocab_size, fn, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, last_n=None):
        self.calls += input_ids.shape[0]
        logits = torch.zeros(*input_ids.shape, self.V) if self.fn is None else self.fn(input_ids)
        return logits if last_n is None else logits[:, -last_n:]
