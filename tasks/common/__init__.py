"""What several stages share: the text tokenizer every checkpoint folder carries, and checkpoint-folder
inference (image tokenizer loading, PNG IO, `parapipe generate`, the tiny checkpoint, example outputs).

Used by sft/, pararl/, evaluate/, rl/ and the CLI.
"""
