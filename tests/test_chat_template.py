"""Chat templates render exactly like transformers' ``apply_chat_template``.

The reference is transformers itself, run on the same template source and the same messages. It needs no
torch and no network: a word-level tokenizer built in memory is enough to render a template.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tokenizers
from transformers import PreTrainedTokenizerFast

import slm
from slm.engines.llamacpp import LlamaCppEngine
from slm.errors import InvalidParameter
from slm.generation import builtin_templates
from slm.generation.chat_template import render

# Gemma 3's published template (google/gemma-3-270m-it, tokenizer_config.json).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)
GEMMA3_ROLE_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."

# Phi-3.5-mini-instruct's published template (microsoft/Phi-3.5-mini-instruct, tokenizer_config.json).
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's published template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 3.2's published template (meta-llama/Llama-3.2-1B-Instruct): whitespace control, strftime_now, tojson.
LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system+user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. What do you need?"},
        {"role": "user", "content": "  A haiku about tea, please.  "},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "1, 2, 3.\n"},
    ],
    "non-ascii": [
        {"role": "system", "content": "Réponds en français, s'il te plaît."},
        {"role": "user", "content": " Ça va ? 日本語で答えて — Привет! 🎉👩‍💻 \"quotes\" & <tags> \\n "},
        {"role": "assistant", "content": "Très bien ! 元気です 🙂"},
        {"role": "user", "content": "Ünïcödé\ttab\nnewline"},
    ],
}


def hf_render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool, bos: str, eos: str) -> str:
    """transformers' own rendering of ``template`` (no torch, no network: an in-memory word-level tokenizer)."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="<unk>")
    tokenizer.chat_template = template
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(text, str)
    return text


@pytest.fixture(scope="module")
def smollm2_template(engine: LlamaCppEngine) -> tuple[str, str, str]:
    info = engine.info
    assert info.chat_template, "SmolLM2's GGUF carries its chat template"
    return info.chat_template, info.special.bos_text, info.special.eos_text


@pytest.fixture(scope="module")
def gemma_model(gemma_path: Path) -> Iterator[slm.Model]:
    engine = LlamaCppEngine(gemma_path, n_ctx=512, max_sequences=1)
    with slm.Model("gemma3:270m", engine) as model:
        yield model


@pytest.fixture(scope="module")
def gemma_template(gemma_model: slm.Model) -> tuple[str, str, str]:
    """The template slm renders Gemma with: the file's own, else slm's built-in one for the architecture (the GGUF
    of the `gemma` extra, converted from google/gemma-3-270m, carries no tokenizer.chat_template)."""
    info = gemma_model.info
    assert info.special.bos_text == "<bos>"
    source = info.chat_template or builtin_templates.for_architecture(info.architecture)
    assert source, "slm has no chat template for Gemma 3"
    return source, info.special.bos_text, info.special.eos_text


def test_gemma_template_is_the_published_one(gemma_template: tuple[str, str, str]) -> None:
    assert gemma_template[0] == GEMMA3_TEMPLATE


def test_gemma_model_renders_like_transformers(gemma_model: slm.Model) -> None:
    for messages in CONVERSATIONS.values():
        if messages[-1]["role"] == "assistant":
            continue
        expected = hf_render(GEMMA3_TEMPLATE, messages, True, "<bos>", "<eos>")
        assert gemma_model.apply_chat_template(messages) == expected
        assert expected.startswith("<bos><start_of_turn>user\n")


@pytest.fixture(
    params=["smollm2", "gemma3", "phi3", "llama3", "llama3.2"],
)
def template(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """(template source, bos text, eos text)."""
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_template")
    if request.param == "gemma3":
        return request.getfixturevalue("gemma_template")
    if request.param == "phi3":
        return PHI3_TEMPLATE, "<s>", "<|endoftext|>"
    if request.param == "llama3":
        return LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"
    return LLAMA32_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_render_matches_transformers(
    template: tuple[str, str, str], conversation: str, add_generation_prompt: bool
) -> None:
    source, bos, eos = template
    messages = CONVERSATIONS[conversation]
    expected = hf_render(source, messages, add_generation_prompt, bos, eos)
    got = render(source, messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
    assert got == expected
    # Sanity: the rendering actually carries the conversation (a template that printed nothing would match too).
    assert messages[-1]["content"].strip() in got


def test_non_ascii_survives_unescaped(smollm2_template: tuple[str, str, str]) -> None:
    source, bos, eos = smollm2_template
    text = render(source, CONVERSATIONS["non-ascii"], bos_token=bos, eos_token=eos)
    assert "日本語で答えて" in text and "🎉👩‍💻" in text and "Привет" in text
    assert "\\u" not in text


def test_generation_prompt_is_the_only_difference(smollm2_template: tuple[str, str, str]) -> None:
    source, bos, eos = smollm2_template
    messages = CONVERSATIONS["user"]
    with_prompt = render(source, messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    without = render(source, messages, add_generation_prompt=False, bos_token=bos, eos_token=eos)
    assert with_prompt == without + "<|im_start|>assistant\n"


def test_template_raise_exception_becomes_invalid_parameter(gemma_template: tuple[str, str, str]) -> None:
    source, bos, eos = gemma_template
    bad = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf_render(source, bad, True, bos, eos)  # transformers refuses it too
    with pytest.raises(InvalidParameter) as excinfo:
        render(source, bad, bos_token=bos, eos_token=eos)
    assert GEMMA3_ROLE_ERROR in str(excinfo.value)
    assert excinfo.value.field == "messages"


def test_assistant_first_is_refused_by_gemma(gemma_template: tuple[str, str, str]) -> None:
    source, bos, eos = gemma_template
    with pytest.raises(InvalidParameter, match="Conversation roles must alternate"):
        render(source, [{"role": "assistant", "content": "I speak first"}], bos_token=bos, eos_token=eos)


def test_template_syntax_error_is_invalid_parameter() -> None:
    with pytest.raises(InvalidParameter) as excinfo:
        render("{% for message in messages %}{{ message['content'] }}", CONVERSATIONS["user"])
    assert excinfo.value.field == "messages"
    assert "does not parse" in str(excinfo.value)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ("What is the capital of France?", "messages"),
        ({"role": "user", "content": "a dict, not a list"}, "messages"),
        (None, "messages"),
        ([{"role": "user", "content": "ok"}, "not an object"], "messages[1]"),
        ([{"role": "wizard", "content": "abracadabra"}], "messages[0].role"),
        ([{"content": "no role"}], "messages[0].role"),
        ([{"role": "user", "content": "ok"}, {"role": "assistant", "content": 42}], "messages[1].content"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
    ],
    ids=[
        "empty", "string", "dict", "none", "non-object", "unknown-role", "missing-role", "int-content",
        "missing-content", "none-content",
    ],
)
def test_message_validation_names_the_field(
    messages: object, field: str, smollm2_template: tuple[str, str, str]
) -> None:
    source, bos, eos = smollm2_template
    with pytest.raises(InvalidParameter) as excinfo:
        render(source, messages, bos_token=bos, eos_token=eos)  # type: ignore[arg-type]
    assert excinfo.value.field == field
    assert str(excinfo.value).startswith(f"{field}: ")


def test_unknown_role_message_lists_the_roles(smollm2_template: tuple[str, str, str]) -> None:
    source, bos, eos = smollm2_template
    with pytest.raises(InvalidParameter, match="wizard") as excinfo:
        render(source, [{"role": "wizard", "content": "x"}], bos_token=bos, eos_token=eos)
    for role in ("system", "user", "assistant"):
        assert role in str(excinfo.value)
