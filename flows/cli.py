"""`parapipe` command line: each subcommand calls one flow or task. Heavy imports stay inside them."""
import argparse
import sys


def _sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=32, help="text steps on the shared timeline (S)")
    p.add_argument("--image-steps", type=int, default=16, help="image decoding steps")
    p.add_argument("--text-length", type=int, default=32, help="output text slots")
    p.add_argument("--block-length", type=int, default=32, help="semi-autoregressive text block length")
    p.add_argument("--text-cfg", type=float, default=0.0, help="guidance scale on text logits")
    p.add_argument("--image-cfg", type=float, default=0.0, help="guidance scale on image logits")
    p.add_argument("--text-temperature", type=float, default=0.0, help="0 = greedy text")
    p.add_argument("--image-temperature", type=float, default=1.0, help="0 = greedy image codes")
    p.add_argument("--mode", choices=("parallel", "sequential"), default="parallel")
    p.add_argument("--seed", type=int, default=0)


def _sampler_config(a):
    from model.sampling import SamplerConfig

    return SamplerConfig(steps=a.steps, image_steps=a.image_steps, text_block_length=a.block_length,
                         text_cfg=a.text_cfg, image_cfg=a.image_cfg, text_temperature=a.text_temperature,
                         image_temperature=a.image_temperature, mode=a.mode)


def cmd_generate(a) -> None:
    from tasks.generate import generate_to_files

    meta = generate_to_files(a.checkpoint, a.prompt, a.out, _sampler_config(a), text_tokens=a.text_length,
                             image_path=a.image, seed=a.seed, device=a.device)
    print(f"wrote {a.out}: text={meta['text']!r} nfe={meta['nfe']}")


def cmd_init_tiny(a) -> None:
    from tasks.generate import make_tiny_checkpoint

    make_tiny_checkpoint(a.out, seed=a.seed)
    print(f"tiny random checkpoint in {a.out}")


def cmd_run(a) -> None:
    """The most complete pipeline that exists: a tiny random checkpoint, then one generation."""
    import os

    from tasks.generate import generate_to_files, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(os.path.join(a.out, "tiny-random"), seed=a.seed)
    meta = generate_to_files(ckpt, "turn the red circle blue", os.path.join(a.out, "generate"),
                             _sampler_config(a), text_tokens=a.text_length, seed=a.seed)
    print(f"run finished in {a.out}: nfe={meta['nfe']} text={meta['text']!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="parapipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample reasoning text + image from a checkpoint folder")
    g.add_argument("--checkpoint", required=True, help="folder with config.json, safetensors, tokenizer.json")
    g.add_argument("--prompt", required=True, help="instruction (editing) or prompt (generation)")
    g.add_argument("--image", default=None, help="input image for editing (needs image_tokenizer/)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--device", default="cpu")
    _sampler_args(g)
    g.set_defaults(fn=cmd_generate)

    t = sub.add_parser("init-tiny", help="write a tiny random checkpoint folder")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_init_tiny)

    r = sub.add_parser("run", help="the whole pipeline on the embedded default")
    r.add_argument("--out", default="runs/default")
    _sampler_args(r)
    r.set_defaults(fn=cmd_run)

    a = parser.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main(sys.argv[1:])
