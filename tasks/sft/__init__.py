"""The sft stage: recipe, image tokenizer fitting, tokenised data, the training loop, Ray Train, held-out eval.

flows/sft.py drives it; toy_eval.py is the exact held-out toy scoring SFT (and ParaRL) report during training.
"""
