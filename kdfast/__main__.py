"""`python -m kdfast COMMAND ...`: train (the trainer's CLI), demo (kdfast's main job), compare (every method
against cross-entropy), llm-demo (the LLM main job), topk-build and llm-train (distil a Hugging Face causal LM
through a top-k or sampled store), topk-import (other tools' teacher top-k outputs into a store). The benchmarks
run with `make bench` (benchmarks/)."""
import importlib
import importlib.util
import sys

COMMANDS = {
    "train": ("kdfast.train.cli", "train a student (optionally distilled from a teacher)"),
    "demo": ("kdfast.train.demo", "kdfast's main job: distillation on digits, table and chart"),
    "compare": ("kdfast.train.compare", "every distillation method against cross-entropy alone (digits, shapes)"),
    "llm-demo": ("kdfast.train.llm_demo", "the LLM main job: small language models distilled on Python source"),
    "topk-build": ("kdfast.train.topk_build", "run a Hugging Face teacher over text once, keep its top-k or samples"),
    "llm-train": ("kdfast.train.llm_train", "distil a Hugging Face student from a topk-build store"),
    "topk-import": ("kdfast.topk_import", "other tools' teacher top-k outputs (axolotl, OpenAI/vLLM) into a store"),
}
# Commands on Hugging Face models also need the kdfast[hf] extra (requirements-hf.txt).
HF_COMMANDS = ("topk-build", "llm-train")


# The modules of the kdfast[train] extra (requirements-train.txt) that every command needs; the losses alone need
# torch only, so a plain `pip install kdfast` lacks them.
TRAIN_MODULES = {"numpy": "numpy", "tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def missing_train_packages() -> list:
    return [package for module, package in TRAIN_MODULES.items() if importlib.util.find_spec(module) is None]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS)) + 2
        usage = "\n".join(f"  {name:{width}s}{help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: python -m kdfast COMMAND [args]\n\ncommands:\n{usage}", file=sys.stdout if argv else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    missing = missing_train_packages()
    if missing:
        print(f"python -m kdfast {argv[0]} needs the trainer's packages (missing: {', '.join(missing)}): "
              f"pip install \"kdfast[train]\" (from a checkout: pip install \".[train]\")", file=sys.stderr)
        return 1
    if argv[0] in HF_COMMANDS and importlib.util.find_spec("transformers") is None:
        print(f"python -m kdfast {argv[0]} needs Hugging Face transformers: pip install \"kdfast[hf]\" (from a "
              f"checkout: pip install \".[hf]\")", file=sys.stderr)
        return 1
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
