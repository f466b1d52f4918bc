"""Several answers to one prompt (OpenAI's ``n``), for the price of one prompt evaluation.

    answers = several(engine, prompt_ids, [params.replace(seed=s) for s in (1, 2, 3)])

The prompt is read once, in the first answer's sequence, up to its last token; the other answers fork that
sequence (their KV cache is a copy, not a recomputation, on engines that can copy it). Then every answer
reads the prompt's last token and decodes, all of them in one batched ``engine.evaluate`` a step, each with
its own sampler (and seed), stop strings and, when asked, its own drafts. An answer that ends frees its
sequence at once; the others go on.

The server does the same through its scheduler, beside other requests; this is the loop for one caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from slm.engines.base import Engine
from slm.errors import InvalidParameter
from slm.generation.generator import Generator
from slm.generation.params import GenerationParams
from slm.generation.speculative import Draft, Proposer
from slm.generation.stream import Chunk, TextStream

ProposerFor = Callable[[GenerationParams], Proposer | None]


def several(engine: Engine, prompt: Sequence[int], params: Sequence[GenerationParams],
            proposer_for: ProposerFor = lambda _: None) -> list[list[Chunk]]:
    """One answer to ``prompt`` per entry of ``params``, decoded side by side: each answer's chunks (the last
    has its finish reason, usage and timings). ``proposer_for`` gives an answer its proposer for speculative
    decoding (default: none)."""
    if not prompt:
        raise InvalidParameter("prompt", "is empty")
    if len(params) > engine.max_sequences:
        raise InvalidParameter("n", f"{len(params)} answers need {len(params)} sequences; this engine holds "
                                    f"{engine.max_sequences} (load it with more max_sequences)")
    gens: list[Generator] = []
    try:
        gens.append(Generator(engine, params[0], proposer=proposer_for(params[0])))
        gens[0].append_tokens(prompt)
        head = len(prompt) - 1  # what the answers share: all of the prompt but the token they each read
        if head and len(params) > 1:
            engine.evaluate([(gens[0].seq, list(prompt[:head]))])
            gens[0].mark_evaluated(head)
        for p in params[1:]:
            sequence = (engine.fork(gens[0].seq), prompt[:head]) if head else None
            gens.append(Generator(engine, p, sequence=sequence, proposer=proposer_for(p)))
            gens[-1].append_tokens(prompt[head:])
        return _decode(engine, gens, [TextStream(engine, p, len(prompt)) for p in params])
    finally:
        for gen in gens:
            gen.close()


def _decode(engine: Engine, gens: list[Generator], texts: list[TextStream]) -> list[list[Chunk]]:
    chunks: list[list[Chunk]] = [[] for _ in gens]
    live = list(range(len(gens)))
    while live:
        drafts = [gens[i].draft() if len(gens[i].pending_tokens()) == 1 else Draft([]) for i in live]
        work = [(gens[i].seq, gens[i].pending_tokens() + d.tokens) for i, d in zip(live, drafts, strict=True)]
        drafted = any(d.tokens for d in drafts)
        logits = engine.evaluate(work, keep=[len(d.tokens) + 1 for d in drafts] if drafted else None)
        row = 0
        for i, draft in zip(live, drafts, strict=True):
            rows = logits[row : row + len(draft.tokens) + 1]
            row += len(rows)
            gens[i].take_step(rows, draft)
            chunks[i].extend(texts[i].push(gens[i]))
            if gens[i].is_done():
                gens[i].close()  # its KV cache is free for the others
        live = [i for i in live if not gens[i].is_done()]
    return chunks
