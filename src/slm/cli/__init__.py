"""The ``slm`` command: thin commands that parse, call the Python API and format.

Every error a user can cause leaves as one line on stderr and an exit code (2 for bad input),
never a traceback.
"""

from __future__ import annotations

import sys

import click

from slm import __version__
from slm.cli.bench import bench, compare
from slm.cli.documents import summarize, translate
from slm.cli.embed import embed
from slm.cli.finetune import finetune
from slm.cli.merge import merge
from slm.cli.models import convert_model, list_models, pull, show
from slm.cli.output import fail
from slm.cli.quality import evaluate, perplexity, quantize
from slm.cli.run import chat, run
from slm.cli.serve import serve
from slm.errors import SlmError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="slm")
def cli() -> None:
    """Run small language models offline: SmolLM2, Gemma 3, the Phi-3 family and any GGUF file.

    \b
    slm run "Why is the sky blue?"          answer with the embedded SmolLM2
    slm run ./model.gguf "Hello"            any GGUF file, or a catalog alias
    slm chat                                an interactive conversation
    slm summarize notes.txt                 one command per everyday task
    slm list                                the catalog, and what is on this machine
    slm show smollm2                        a model's format and the engine it runs on
    slm convert smollm2 --to hf             GGUF -> a Hugging Face folder (the transformers engine)
    slm serve                               OpenAI- and Ollama-compatible HTTP server
    slm bench smollm2 --plot bench.png      speed, memory and the machine's ceiling
    slm compare smollm2 gemma3:270m --prompt "..."   answers side by side
    slm quantize smollm2-hf-fp16 --type q4_k_m   llama.cpp's quantizer, into the store
    slm perplexity smollm2 wiki.txt         how well a model predicts a text
    slm eval a.gguf b.gguf --text wiki.txt  size, bits/weight, perplexity, speed
    slm finetune smollm2-hf data.jsonl --out mine   a LoRA adapter trained on your JSONL
    slm run smollm2 --adapter mine "Hi"     the model through that adapter (serve: a model name each)
    slm merge smollm2-hf --adapter mine --out smollm2-mine   the adapter added into the model's weights
    slm embed minilm "a cat" "a dog"        sentence embeddings (--json: the vectors)
    """


for command in (run, chat, summarize, translate, list_models, show, pull, convert_model, serve, bench, compare,
                quantize, perplexity, evaluate, finetune, merge, embed):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, turning user mistakes into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="slm", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except SlmError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `slm run ... | head`)
        sys.exit(0)
