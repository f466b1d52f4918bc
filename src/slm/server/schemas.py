"""Request bodies: one typed object per endpoint, parsed strictly, turned into GenerationParams.

Types are checked here (pydantic, strict: ``"10"`` is not an integer); ranges are checked once, by
``GenerationParams``. Either way a bad value is an ``InvalidParameter`` that names its field. A grammar
(``response_format``, Ollama's ``format``) is compiled and the tools and tool messages checked here too,
so a bad schema or tool is a 400 before anything is queued. Fields that other servers accept and slm
does not know are ignored; features slm cannot honour (images, echo, llama.cpp's samplers that slm does not
have) are refused by name rather than silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slm.errors import InvalidParameter, RequestError
from slm.generation.constraints import Grammar, requested_grammar
from slm.generation.params import MAX_TOP_LOGPROBS, GenerationParams
from slm.generation.tool_calls import check_tool_messages
from slm.generation.tool_use import ToolUse
from slm.server import llamacpp_fields
from slm.units import parse_duration

MAX_N = 8
"""Most choices per request (each is a sequence in the scheduler)."""

MAX_STOP = 16

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def parse(schema: type[M], body: bytes) -> M:
    """Validate a JSON body; the first problem becomes an error that names the field."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        raise _first_problem(e) from None


def _first_problem(error: ValidationError) -> Exception:
    problem = error.errors(include_url=False)[0]
    raised = problem.get("ctx", {}).get("error")
    if isinstance(raised, InvalidParameter):  # a check of the body's own (model_post_init) named the field
        return raised
    if problem["type"] == "json_invalid":
        return RequestError(f"the request body is not valid JSON: {problem['msg'].removeprefix('Invalid JSON: ')}")
    path = _field_path(problem["loc"])
    if not path:
        return RequestError("the request body must be a JSON object")
    if problem["type"] == "missing":
        return InvalidParameter(path, "is required")
    if problem["type"] == "too_short" and not problem.get("input"):
        return InvalidParameter(path, "must not be empty")
    return InvalidParameter(path, f"{problem['msg']}, got {_show(problem.get('input'))}")


# pydantic adds the union member it tried to a location ("content", "str"); those are not fields.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


def _field_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _UNION_TAG.match(part):
            path += f".{part}" if path else part
    return path


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unsupported(field: str, what: str = "is not supported by this server") -> InvalidParameter:
    return InvalidParameter(field, what)


# --- OpenAI ---------------------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageUrl(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    """Taken and ignored: the model's own processor decides the resolution."""


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant's calls: ``{id, type: function, function: {name, arguments: JSON text}}``."""
    tool_call_id: str | None = None
    """A tool message: the call it answers."""

    def text(self) -> str | list[dict[str, Any]]:
        """The text, or the parts when there are images among them (``slm.model.images`` reads those)."""
        if isinstance(self.content, list):
            if any(isinstance(part, ImagePart) for part in self.content):
                return [part.model_dump(exclude_none=True) for part in self.content]
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    def as_dict(self) -> dict[str, Any]:
        """The message as the chat template takes it ("developer" is the newer name of "system")."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text()}
        extra = {"name": self.name, "tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id}
        return {**message, **{k: v for k, v in extra.items() if v is not None}}


def checked_conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with tool calls and results checked (every result answers an earlier call; arguments are
    objects), or the messages as they are when none has any."""
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return check_tool_messages(messages)
    return messages


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``
    (``{name, schema, strict}``; the answer always follows the schema, strict or not)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    def grammar(self) -> Grammar | None:
        grammar, _ = requested_grammar(response_format=self.model_dump(exclude_none=True))
        return grammar


class OpenAISampling(Strict):
    """The fields both OpenAI generation endpoints share, and slm's extensions to them: llama.cpp's and
    vLLM's, under their names (``llamacpp_fields`` says which llama.cpp fields are honoured, taken, refused)."""

    model_config = ConfigDict(strict=True, extra="allow")  # llamacpp_fields.check reads the unknown ones

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP)
    seed: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions, as llama.cpp's and vLLM's servers take them.
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    response_format: ResponseFormat | None = None
    """What the answer must be; /v1/completions takes it too, as llama.cpp's and vLLM's servers do."""
    # Beam search, as vLLM names it: best_of beams, the n best returned ranked.
    use_beam_search: bool = False
    best_of: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None
    # llama.cpp's names
    n_predict: int | None = None
    gbnf: str | None = Field(default=None, alias="grammar")
    json_schema: dict[str, Any] | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    samplers: str | list[str] | None = None
    n_cmpl: int | None = Field(default=None, ge=1, le=MAX_N)
    ignore_eos: bool = False
    """Generate past the end-of-generation token (``llamacpp_fields.without_end``; local models only)."""

    def model_post_init(self, context: Any) -> None:
        llamacpp_fields.check(self.model_extra or {})
        if self.n_cmpl is not None:
            if "n" in self.model_fields_set and self.n != self.n_cmpl:
                raise InvalidParameter("n_cmpl", f"is llama.cpp's name for n, and differs from it ({self.n})")
            self.n = self.n_cmpl

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _beams(self) -> dict[str, Any]:
        """The beam-search fields as generation parameters: ``best_of`` beams and the ``n`` best returned.
        Without ``use_beam_search``, ``best_of`` may only equal ``n`` and the beam fields are refused by
        name, never dropped."""
        if not self.use_beam_search:
            if self.best_of is not None and self.best_of != self.n:
                raise _unsupported("best_of", "differs from n only with use_beam_search: true (sampled best_of "
                                   "is not supported by this server)")
            for name in ("length_penalty", "early_stopping"):
                if getattr(self, name) is not None:
                    raise InvalidParameter(name, "applies to beam search: set use_beam_search: true")
            return {}
        beams = self.best_of if self.best_of is not None else self.n
        if beams < 2:
            raise InvalidParameter("best_of", f"must be at least 2 with use_beam_search (the number of beams), "
                                   f"got {beams}")
        if self.n > beams:
            raise InvalidParameter("n", f"must be at most best_of ({beams}) with use_beam_search, got {self.n}")
        return {"num_beams": beams, "num_return_sequences": self.n, "length_penalty": self.length_penalty,
                "early_stopping": self.early_stopping}

    def grammar(self) -> Grammar | None:
        """What the answer must be (None: any text): ``response_format``, or llama.cpp's ``grammar`` (GBNF) or
        ``json_schema``; at most one of them."""
        asked = [name for name in ("response_format", "gbnf", "json_schema") if getattr(self, name) is not None]
        if len(asked) > 1:
            names = ["grammar" if name == "gbnf" else name for name in asked]
            raise InvalidParameter(names[1], f"cannot be combined with {names[0]}: give one of them")
        if self.gbnf is not None:
            return Grammar.gbnf(self.gbnf, "grammar")
        if self.json_schema is not None:
            return Grammar.json_schema(self.json_schema, "json_schema")
        return self.response_format.grammar() if self.response_format is not None else None

    def _llamacpp_names(self, max_tokens: int | None) -> dict[str, Any]:
        """``max_tokens`` and ``repetition_penalty`` as llama.cpp's ``n_predict`` and ``repeat_penalty`` may set
        them (n_predict wins, as there; -1 is no limit)."""
        if self.n_predict is not None:
            if self.n_predict < -1:
                raise InvalidParameter("n_predict", f"must be -1 (no limit) or at least 1, got {self.n_predict}")
            max_tokens = None if self.n_predict == -1 else self.n_predict
            if max_tokens == 0:
                raise InvalidParameter("n_predict", "must be -1 (no limit) or at least 1, got 0")
        penalty = self.repetition_penalty
        if self.repeat_penalty is not None:
            if penalty is not None and penalty != self.repeat_penalty:
                raise InvalidParameter("repeat_penalty", f"is llama.cpp's name for repetition_penalty, and differs "
                                       f"from it ({penalty})")
            penalty = self.repeat_penalty
        return {"max_tokens": max_tokens, "repetition_penalty": penalty}

    def _params(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> GenerationParams:
        params = GenerationParams.of(
            **self._beams(),
            **self._llamacpp_names(max_tokens),
            grammar=self.grammar(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            typical_p=self.typical_p,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=self.logit_bias,
            stop=self.stop,
            seed=self.seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        if self.samplers is not None:
            params = llamacpp_fields.apply_samplers(params, llamacpp_fields.sampler_order(self.samplers))
        return llamacpp_fields.apply_repeat_window(self.repeat_last_n, params)


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them, tool calls and results checked."""
        return checked_conversation([m.as_dict() for m in self.messages])

    def tool_use(self) -> ToolUse | None:
        """The tools offered and how they must be used (None: no tools)."""
        return ToolUse.of(self.tools or None, self.tool_choice, self.parallel_tool_calls)

    def params(self) -> GenerationParams:
        if self.top_logprobs and not self.logprobs:
            raise InvalidParameter("top_logprobs", "needs logprobs: true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(max_tokens, self.logprobs, self.top_logprobs or 0)


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text or a list of token ids."""
        if self.echo:
            raise _unsupported("echo", "echoing the prompt is not supported by this server")
        if self.suffix:
            raise _unsupported("suffix", "insertion (suffix) is not supported by this server")
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompts: list[Any] = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or any(not p for p in prompts):
            raise InvalidParameter("prompt", "is empty")
        if len(prompts) * self.n > MAX_N:
            raise InvalidParameter("prompt", f"{len(prompts)} prompts x n={self.n} is more than {MAX_N} choices")
        return prompts

    def params(self) -> GenerationParams:
        return self._params(self.max_tokens, self.logprobs is not None, self.logprobs or 0)


# --- Ollama ---------------------------------------------------------------------------------------


class OllamaOptions(Strict):
    """The model options of Ollama's Modelfile that slm honours; others (num_ctx, mirostat...) are
    ignored, as Ollama ignores options a runner does not know.

    slm's extensions, named as transformers names them: ``no_repeat_ngram_size`` (no n-gram of that many
    tokens twice, prompt included), and beam search: ``num_beams`` (above 1, search with that many beams),
    ``length_penalty``, ``early_stopping`` (true, false or "never") and ``min_new_tokens``. An Ollama answer
    is one text, so a search answers with its best beam; streamed, that is one line once the search has ended,
    then the last line. A search does not sample: ``temperature``, ``top_k``, ``top_p``, ``min_p`` and
    ``typical_p`` are refused with it unless at the value that means no sampling (0, 0, 1, 0, 1), and so are
    ``stop``, ``format`` and ``logprobs``. ``num_return_sequences`` (several beams) does not fit one answer
    and is refused above 1: /v1/chat/completions returns several (``n`` with ``use_beam_search``)."""

    num_predict: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP)
    no_repeat_ngram_size: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None
    min_new_tokens: int | None = None
    num_return_sequences: int | None = None

    def beams(self) -> dict[str, Any]:
        """The beam-search options as generation parameters; ``length_penalty`` and ``early_stopping`` without
        ``num_beams`` above 1, and ``num_return_sequences`` above 1, are refused by name, never dropped."""
        if self.num_return_sequences not in (None, 1):
            raise InvalidParameter("options.num_return_sequences",
                                   "an Ollama answer is one text (the best beam); for several beams ask "
                                   "/v1/chat/completions with n and use_beam_search")
        if self.num_beams is None or self.num_beams == 1:
            for name in ("length_penalty", "early_stopping"):
                if getattr(self, name) is not None:
                    raise InvalidParameter(f"options.{name}", "applies to beam search: set options.num_beams "
                                                              "above 1")
        return {"num_beams": self.num_beams, "length_penalty": self.length_penalty,
                "early_stopping": self.early_stopping, "min_new_tokens": self.min_new_tokens}


# GenerationParams' field -> the Ollama option that set it, so an error names what the client sent. The
# backend names the beams as OpenAI's request does (best_of, use_beam_search).
_OPTION_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty", "best_of": "num_beams",
                 "use_beam_search": "num_beams"}
_OPTIONS = frozenset({"max_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "seed", "stop", "no_repeat_ngram_size", "num_beams",
                      "length_penalty", "early_stopping", "min_new_tokens", "best_of", "use_beam_search"})
"""The GenerationParams fields that Ollama's ``options`` set (the others are fields of the body), and the
backend's names for them."""


def as_option(error: InvalidParameter) -> InvalidParameter:
    """The same error, naming the Ollama option (``options.num_predict``, not ``max_tokens``)."""
    if error.field not in _OPTIONS:
        return error
    return type(error)(f"options.{_OPTION_NAMES.get(error.field, error.field)}", error.reason)


class OllamaGeneration(Strict):
    """The fields /api/chat and /api/generate share."""

    model: str = Field(min_length=1)
    stream: bool = True
    options: OllamaOptions | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None
    """How long the model stays loaded after this request: seconds or a duration ("5m"), 0 to unload
    it at once, negative to keep it; None: the server's ``--keep-alive``."""
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def keep_alive_seconds(self) -> float | None:
        return None if self.keep_alive is None else parse_duration(self.keep_alive, "keep_alive")

    def grammar(self) -> Grammar | None:
        """``format``: "json" (any JSON object) or a JSON schema; "" is none."""
        if not self.format:
            return None
        if self.format == "json":
            return Grammar.any_json("format")
        if isinstance(self.format, str):
            raise InvalidParameter("format", f"must be 'json' or a JSON schema, got {_show(self.format)}")
        return Grammar.json_schema(self.format, "format")

    def params(self) -> GenerationParams:
        grammar = self.grammar()
        o = self.options or OllamaOptions()
        # num_predict -1 is "no limit", -2 "fill the context": both are slm's None.
        max_tokens = o.num_predict if o.num_predict is None or o.num_predict >= 0 else None
        try:
            return GenerationParams.of(
                **o.beams(),
                max_tokens=max_tokens,
                temperature=o.temperature,
                top_k=o.top_k,
                top_p=o.top_p,
                min_p=o.min_p,
                typical_p=o.typical_p,
                repetition_penalty=o.repeat_penalty,
                presence_penalty=o.presence_penalty,
                frequency_penalty=o.frequency_penalty,
                seed=o.seed if o.seed is None or o.seed >= 0 else None,  # Ollama's -1: a random seed
                stop=o.stop,
                no_repeat_ngram_size=o.no_repeat_ngram_size,
                logprobs=self.logprobs,
                top_logprobs=self.top_logprobs or 0,
                grammar=grammar,
            )
        except InvalidParameter as e:
            raise as_option(e) from None


class OllamaMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant's calls: ``{function: {name, arguments: {...}}}``."""
    tool_name: str | None = None
    """A tool message: the tool that answered (Ollama's results carry no call id)."""

    def as_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        extra = {"tool_calls": self.tool_calls, "name": self.tool_name, "images": self.images or None}
        return {**message, **{k: v for k, v in extra.items() if v is not None}}


class OllamaChatRequest(OllamaGeneration):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None

    def conversation(self) -> list[dict[str, Any]]:
        return checked_conversation([m.as_dict() for m in self.messages])

    def tool_use(self) -> ToolUse | None:
        """The tools offered (Ollama has no ``tool_choice``: the model may call them or answer)."""
        return ToolUse.of(self.tools or None)


class OllamaGenerateRequest(OllamaGeneration):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    """Token ids returned by an earlier /api/generate: the conversation so far."""
    images: list[str] | None = None

    def check(self) -> None:
        if self.suffix:
            raise _unsupported("suffix", "insertion (suffix) is not supported by this server")
        if self.template:
            raise _unsupported("template", "template overrides are not supported; use raw: true")
        if self.images and self.raw:
            raise _unsupported("images", "images go into a chat turn; they cannot be sent with raw: true")


class ModelRequest(Strict):
    """/api/show: the model to describe (``name`` is the older spelling of ``model``)."""

    model: str | None = None
    name: str | None = None

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise InvalidParameter("model", "is required")
        return name
