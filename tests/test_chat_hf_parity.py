"""pyllm's chat rendering against Hugging Face's ``apply_chat_template`` on real templates.

The templates below are the chat templates shipped in the tokenizer configs of the models named
above each (kept verbatim: a template is a fact of the model format, and every quirk in it —
``trim`` here, no ``trim`` there, a leading space before ``[INST]`` — is what the model was
trained on). SmolLM2's comes from the real GGUF file. Each test writes a tokenizer folder
(``tokenizer.json`` + ``tokenizer_config.json`` with the template and the BOS/EOS tokens), loads
it with ``transformers`` and requires pyllm to render exactly the same string; pyllm takes the
BOS/EOS text from a tokenizer, as :func:`pyllm.runtime.generation.chat_prompt` does. No network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
import tokenizers
import transformers

from pyllm.chat import render
from pyllm.errors import ChatTemplateError
from pyllm.formats.gguf import GGUFReader
from pyllm.runtime.generation import chat_prompt
from pyllm.runtime.llm import LLM


def _template(*lines: str) -> str:
    """A template's text from its lines, one per Python line so it can be read and diffed (a
    line longer than this file allows is split into adjacent literals; the text is unchanged)."""
    return "\n".join(lines)


# meta-llama/Llama-3.1-8B-Instruct
LLAMA_3_1_INSTRUCT = _template(
    r'{{- bos_token }}',
    r'{%- if custom_tools is defined %}',
    r'    {%- set tools = custom_tools %}',
    r'{%- endif %}',
    r'{%- if not tools_in_user_message is defined %}',
    r'    {%- set tools_in_user_message = true %}',
    r'{%- endif %}',
    r'{%- if not date_string is defined %}',
    r'    {%- set date_string = "26 Jul 2024" %}',
    r'{%- endif %}',
    r'{%- if not tools is defined %}',
    r'    {%- set tools = none %}',
    r'{%- endif %}',
    '',
    r'{#- This block extracts the system message, so we can slot it into the right place. #}',
    r"{%- if messages[0]['role'] == 'system' %}",
    r"    {%- set system_message = messages[0]['content']|trim %}",
    r'    {%- set messages = messages[1:] %}',
    r'{%- else %}',
    r'    {%- set system_message = "" %}',
    r'{%- endif %}',
    '',
    r'{#- System message + builtin tools #}',
    r'{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}',
    r'{%- if builtin_tools is defined or tools is not none %}',
    r'    {{- "Environment: ipython\n" }}',
    r'{%- endif %}',
    r'{%- if builtin_tools is defined %}',
    r'''    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ")'''
    r' + "\n\n"}}',
    r'{%- endif %}',
    r'{{- "Cutting Knowledge Date: December 2023\n" }}',
    r'{{- "Today Date: " + date_string + "\n\n" }}',
    r'{%- if tools is not none and not tools_in_user_message %}',
    r'    {{- "You have access to the following functions. To call a function, please respond'
    r' with JSON for a function call." }}',
    r'''    {{- 'Respond in the format {"name": function name, "parameters": dictionary of'''
    r" argument name and its value}.' }}",
    r'    {{- "Do not use variables.\n\n" }}',
    r'    {%- for t in tools %}',
    r'        {{- t | tojson(indent=4) }}',
    r'        {{- "\n\n" }}',
    r'    {%- endfor %}',
    r'{%- endif %}',
    r'{{- system_message }}',
    r'{{- "<|eot_id|>" }}',
    '',
    r'{#- Custom tools are passed in a user message with some extra guidance #}',
    r'{%- if tools_in_user_message and not tools is none %}',
    r'    {#- Extract the first user message so we can plug it in here #}',
    r'    {%- if messages | length != 0 %}',
    r"        {%- set first_user_message = messages[0]['content']|trim %}",
    r'        {%- set messages = messages[1:] %}',
    r'    {%- else %}',
    r'''        {{- raise_exception("Cannot put tools in the first user message when there's no'''
    r' first user message!") }}',
    r'{%- endif %}',
    r"    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}",
    r'    {{- "Given the following functions, please respond with a JSON for a function call'
    r' " }}',
    r'    {{- "with its proper arguments that best answers the given prompt.\n\n" }}',
    r'''    {{- 'Respond in the format {"name": function name, "parameters": dictionary of'''
    r" argument name and its value}.' }}",
    r'    {{- "Do not use variables.\n\n" }}',
    r'    {%- for t in tools %}',
    r'        {{- t | tojson(indent=4) }}',
    r'        {{- "\n\n" }}',
    r'    {%- endfor %}',
    r'    {{- first_user_message + "<|eot_id|>"}}',
    r'{%- endif %}',
    '',
    r'{%- for message in messages %}',
    r"    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in"
    r' message) %}',
    r"        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+"
    r" message['content'] | trim + '<|eot_id|>' }}",
    r"    {%- elif 'tool_calls' in message %}",
    r'        {%- if not message.tool_calls|length == 1 %}',
    r'            {{- raise_exception("This model only supports single tool-calls at once!")'
    r' }}',
    r'        {%- endif %}',
    r'        {%- set tool_call = message.tool_calls[0].function %}',
    r'        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}',
    r"            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}",
    r'            {{- "<|python_tag|>" + tool_call.name + ".call(" }}',
    r'            {%- for arg_name, arg_val in tool_call.arguments | items %}',
    r'''                {{- arg_name + '="' + arg_val + '"' }}''',
    r'                {%- if not loop.last %}',
    r'                    {{- ", " }}',
    r'                {%- endif %}',
    r'                {%- endfor %}',
    r'            {{- ")" }}',
    r'        {%- else  %}',
    r"            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}",
    r'''            {{- '{"name": "' + tool_call.name + '", ' }}''',
    r'''            {{- '"parameters": ' }}''',
    r'            {{- tool_call.arguments | tojson }}',
    r'            {{- "}" }}',
    r'        {%- endif %}',
    r'        {%- if builtin_tools is defined %}',
    r"            {#- This means we're in ipython mode #}",
    r'            {{- "<|eom_id|>" }}',
    r'        {%- else %}',
    r'            {{- "<|eot_id|>" }}',
    r'        {%- endif %}',
    r'    {%- elif message.role == "tool" or message.role == "ipython" %}',
    r'        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}',
    r'        {%- if message.content is mapping or message.content is iterable %}',
    r'            {{- message.content | tojson }}',
    r'        {%- else %}',
    r'            {{- message.content }}',
    r'        {%- endif %}',
    r'        {{- "<|eot_id|>" }}',
    r'    {%- endif %}',
    r'{%- endfor %}',
    r'{%- if add_generation_prompt %}',
    r"    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}",
    r'{%- endif %}',
    '',
)

# meta-llama/Llama-3.2-3B-Instruct
LLAMA_3_2_INSTRUCT = _template(
    r'{{- bos_token }}',
    r'{%- if custom_tools is defined %}',
    r'    {%- set tools = custom_tools %}',
    r'{%- endif %}',
    r'{%- if not tools_in_user_message is defined %}',
    r'    {%- set tools_in_user_message = true %}',
    r'{%- endif %}',
    r'{%- if not date_string is defined %}',
    r'    {%- if strftime_now is defined %}',
    r'        {%- set date_string = strftime_now("%d %b %Y") %}',
    r'    {%- else %}',
    r'        {%- set date_string = "26 Jul 2024" %}',
    r'    {%- endif %}',
    r'{%- endif %}',
    r'{%- if not tools is defined %}',
    r'    {%- set tools = none %}',
    r'{%- endif %}',
    '',
    r'{#- This block extracts the system message, so we can slot it into the right place. #}',
    r"{%- if messages[0]['role'] == 'system' %}",
    r"    {%- set system_message = messages[0]['content']|trim %}",
    r'    {%- set messages = messages[1:] %}',
    r'{%- else %}',
    r'    {%- set system_message = "" %}',
    r'{%- endif %}',
    '',
    r'{#- System message #}',
    r'{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}',
    r'{%- if tools is not none %}',
    r'    {{- "Environment: ipython\n" }}',
    r'{%- endif %}',
    r'{{- "Cutting Knowledge Date: December 2023\n" }}',
    r'{{- "Today Date: " + date_string + "\n\n" }}',
    r'{%- if tools is not none and not tools_in_user_message %}',
    r'    {{- "You have access to the following functions. To call a function, please respond'
    r' with JSON for a function call." }}',
    r'''    {{- 'Respond in the format {"name": function name, "parameters": dictionary of'''
    r" argument name and its value}.' }}",
    r'    {{- "Do not use variables.\n\n" }}',
    r'    {%- for t in tools %}',
    r'        {{- t | tojson(indent=4) }}',
    r'        {{- "\n\n" }}',
    r'    {%- endfor %}',
    r'{%- endif %}',
    r'{{- system_message }}',
    r'{{- "<|eot_id|>" }}',
    '',
    r'{#- Custom tools are passed in a user message with some extra guidance #}',
    r'{%- if tools_in_user_message and not tools is none %}',
    r'    {#- Extract the first user message so we can plug it in here #}',
    r'    {%- if messages | length != 0 %}',
    r"        {%- set first_user_message = messages[0]['content']|trim %}",
    r'        {%- set messages = messages[1:] %}',
    r'    {%- else %}',
    r'''        {{- raise_exception("Cannot put tools in the first user message when there's no'''
    r' first user message!") }}',
    r'{%- endif %}',
    r"    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}",
    r'    {{- "Given the following functions, please respond with a JSON for a function call'
    r' " }}',
    r'    {{- "with its proper arguments that best answers the given prompt.\n\n" }}',
    r'''    {{- 'Respond in the format {"name": function name, "parameters": dictionary of'''
    r" argument name and its value}.' }}",
    r'    {{- "Do not use variables.\n\n" }}',
    r'    {%- for t in tools %}',
    r'        {{- t | tojson(indent=4) }}',
    r'        {{- "\n\n" }}',
    r'    {%- endfor %}',
    r'    {{- first_user_message + "<|eot_id|>"}}',
    r'{%- endif %}',
    '',
    r'{%- for message in messages %}',
    r"    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in"
    r' message) %}',
    r"        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+"
    r" message['content'] | trim + '<|eot_id|>' }}",
    r"    {%- elif 'tool_calls' in message %}",
    r'        {%- if not message.tool_calls|length == 1 %}',
    r'            {{- raise_exception("This model only supports single tool-calls at once!")'
    r' }}',
    r'        {%- endif %}',
    r'        {%- set tool_call = message.tool_calls[0].function %}',
    r"        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}",
    r'''        {{- '{"name": "' + tool_call.name + '", ' }}''',
    r'''        {{- '"parameters": ' }}''',
    r'        {{- tool_call.arguments | tojson }}',
    r'        {{- "}" }}',
    r'        {{- "<|eot_id|>" }}',
    r'    {%- elif message.role == "tool" or message.role == "ipython" %}',
    r'        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}',
    r'        {%- if message.content is mapping or message.content is iterable %}',
    r'            {{- message.content | tojson }}',
    r'        {%- else %}',
    r'            {{- message.content }}',
    r'        {%- endif %}',
    r'        {{- "<|eot_id|>" }}',
    r'    {%- endif %}',
    r'{%- endfor %}',
    r'{%- if add_generation_prompt %}',
    r"    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}",
    r'{%- endif %}',
    '',
)

# Qwen/Qwen2.5-7B-Instruct
QWEN_2_5_INSTRUCT = _template(
    r'{%- if tools %}',
    r"    {{- '<|im_start|>system\n' }}",
    r"    {%- if messages[0]['role'] == 'system' %}",
    r"        {{- messages[0]['content'] }}",
    r'    {%- else %}',
    r"        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}",
    r'    {%- endif %}',
    r'    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user'
    r' query.\n\nYou are provided with function signatures within <tools></tools> XML'
    r' tags:\n<tools>" }}',
    r'    {%- for tool in tools %}',
    r'        {{- "\n" }}',
    r'        {{- tool | tojson }}',
    r'    {%- endfor %}',
    r'    {{- "\n</tools>\n\nFor each function call, return a json object with function name'
    r' and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\":'
    r' <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}',
    r'{%- else %}',
    r"    {%- if messages[0]['role'] == 'system' %}",
    r"        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}",
    r'    {%- else %}',
    r"        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a"
    r" helpful assistant.<|im_end|>\n' }}",
    r'    {%- endif %}',
    r'{%- endif %}',
    r'{%- for message in messages %}',
    r'    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or'
    r' (message.role == "assistant" and not message.tool_calls) %}',
    r"        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' +"
    r" '\n' }}",
    r'    {%- elif message.role == "assistant" %}',
    r"        {{- '<|im_start|>' + message.role }}",
    r'        {%- if message.content %}',
    r"            {{- '\n' + message.content }}",
    r'        {%- endif %}',
    r'        {%- for tool_call in message.tool_calls %}',
    r'            {%- if tool_call.function is defined %}',
    r'                {%- set tool_call = tool_call.function %}',
    r'            {%- endif %}',
    r'''            {{- '\n<tool_call>\n{"name": "' }}''',
    r'            {{- tool_call.name }}',
    r'''            {{- '", "arguments": ' }}''',
    r'            {{- tool_call.arguments | tojson }}',
    r"            {{- '}\n</tool_call>' }}",
    r'        {%- endfor %}',
    r"        {{- '<|im_end|>\n' }}",
    r'    {%- elif message.role == "tool" %}',
    r'        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}',
    r"            {{- '<|im_start|>user' }}",
    r'        {%- endif %}',
    r"        {{- '\n<tool_response>\n' }}",
    r'        {{- message.content }}',
    r"        {{- '\n</tool_response>' }}",
    r'        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}',
    r"            {{- '<|im_end|>\n' }}",
    r'        {%- endif %}',
    r'    {%- endif %}',
    r'{%- endfor %}',
    r'{%- if add_generation_prompt %}',
    r"    {{- '<|im_start|>assistant\n' }}",
    r'{%- endif %}',
    '',
)

# mistralai/Mistral-7B-Instruct-v0.1, as first published (no system role)
MISTRAL_V0_1_INSTRUCT = _template(
    r"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') !="
    r" (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate"
    r" user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{"
    r" '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant'"
    r" %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user"
    r" and assistant roles are supported!') }}{% endif %}{% endfor %}",
)

# mistralai/Mistral-7B-Instruct-v0.2 (an optional system message joins the first user turn)
MISTRAL_V0_2_INSTRUCT = _template(
    r"{%- if messages[0]['role'] == 'system' %}",
    r"    {%- set system_message = messages[0]['content'] %}",
    r'    {%- set loop_messages = messages[1:] %}',
    r'{%- else %}',
    r'    {%- set loop_messages = messages %}',
    r'{%- endif %}',
    '',
    r'{{- bos_token }}',
    r'{%- for message in loop_messages %}',
    r"    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}",
    r"        {{- raise_exception('After the optional system message, conversation roles must"
    r" alternate user/assistant/user/assistant/...') }}",
    r'    {%- endif %}',
    r"    {%- if message['role'] == 'user' %}",
    r'        {%- if loop.first and system_message is defined %}',
    r"            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]'"
    r' }}',
    r'        {%- else %}',
    r"            {{- ' [INST] ' + message['content'] + ' [/INST]' }}",
    r'        {%- endif %}',
    r"    {%- elif message['role'] == 'assistant' %}",
    r"        {{- ' ' + message['content'] + eos_token}}",
    r'    {%- else %}',
    r"        {{- raise_exception('Only user and assistant roles are supported, with the"
    r" exception of an initial optional system message!') }}",
    r'    {%- endif %}',
    r'{%- endfor %}',
    '',
)

# mistralai/Mistral-7B-Instruct-v0.3 (tools; the system message joins the last user turn)
MISTRAL_V0_3_INSTRUCT = _template(
    r'{%- if messages[0]["role"] == "system" %}',
    r'    {%- set system_message = messages[0]["content"] %}',
    r'    {%- set loop_messages = messages[1:] %}',
    r'{%- else %}',
    r'    {%- set loop_messages = messages %}',
    r'{%- endif %}',
    r'{%- if not tools is defined %}',
    r'    {%- set tools = none %}',
    r'{%- endif %}',
    r'{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}',
    '',
    r'{#- This block checks for alternating user/assistant messages, skipping tool calling'
    r' messages #}',
    r'{%- set ns = namespace() %}',
    r'{%- set ns.index = 0 %}',
    r'{%- for message in loop_messages %}',
    r'    {%- if not (message.role == "tool" or message.role == "tool_results" or'
    r' (message.tool_calls is defined and message.tool_calls is not none)) %}',
    r'        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}',
    r'            {{- raise_exception("After the optional system message, conversation roles'
    r' must alternate user/assistant/user/assistant/...") }}',
    r'        {%- endif %}',
    r'        {%- set ns.index = ns.index + 1 %}',
    r'    {%- endif %}',
    r'{%- endfor %}',
    '',
    r'{{- bos_token }}',
    r'{%- for message in loop_messages %}',
    r'    {%- if message["role"] == "user" %}',
    r'        {%- if tools is not none and (message == user_messages[-1]) %}',
    r'            {{- "[AVAILABLE_TOOLS] [" }}',
    r'            {%- for tool in tools %}',
    r'                {%- set tool = tool.function %}',
    r'''                {{- '{"type": "function", "function": {' }}''',
    r'                {%- for key, val in tool.items() if key != "return" %}',
    r'                    {%- if val is string %}',
    r'''                        {{- '"' + key + '": "' + val + '"' }}''',
    r'                    {%- else %}',
    r'''                        {{- '"' + key + '": ' + val|tojson }}''',
    r'                    {%- endif %}',
    r'                    {%- if not loop.last %}',
    r'                        {{- ", " }}',
    r'                    {%- endif %}',
    r'                {%- endfor %}',
    r'                {{- "}}" }}',
    r'                {%- if not loop.last %}',
    r'                    {{- ", " }}',
    r'                {%- else %}',
    r'                    {{- "]" }}',
    r'                {%- endif %}',
    r'            {%- endfor %}',
    r'            {{- "[/AVAILABLE_TOOLS]" }}',
    r'            {%- endif %}',
    r'        {%- if loop.last and system_message is defined %}',
    r'            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}',
    r'        {%- else %}',
    r'            {{- "[INST] " + message["content"] + "[/INST]" }}',
    r'        {%- endif %}',
    r'    {%- elif message.tool_calls is defined and message.tool_calls is not none %}',
    r'        {{- "[TOOL_CALLS] [" }}',
    r'        {%- for tool_call in message.tool_calls %}',
    r'            {%- set out = tool_call.function|tojson %}',
    r'            {{- out[:-1] }}',
    r'            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}',
    r'                {{- raise_exception("Tool call IDs should be alphanumeric strings with'
    r' length 9!") }}',
    r'            {%- endif %}',
    r'''            {{- ', "id": "' + tool_call.id + '"}' }}''',
    r'            {%- if not loop.last %}',
    r'                {{- ", " }}',
    r'            {%- else %}',
    r'                {{- "]" + eos_token }}',
    r'            {%- endif %}',
    r'        {%- endfor %}',
    r'    {%- elif message["role"] == "assistant" %}',
    r'        {{- " " + message["content"]|trim + eos_token}}',
    r'    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}',
    r'        {%- if message.content is defined and message.content.content is defined %}',
    r'            {%- set content = message.content.content %}',
    r'        {%- else %}',
    r'            {%- set content = message.content %}',
    r'        {%- endif %}',
    r'''        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}''',
    r'        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9'
    r' %}',
    r'            {{- raise_exception("Tool call IDs should be alphanumeric strings with'
    r' length 9!") }}',
    r'        {%- endif %}',
    r'''        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}''',
    r'    {%- else %}',
    r'        {{- raise_exception("Only user and assistant roles are supported, with the'
    r' exception of an initial optional system message!") }}',
    r'    {%- endif %}',
    r'{%- endfor %}',
    '',
)


# ---- conversations ------------------------------------------------------------------------------

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "system_multi_turn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "no_system": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
    ],
    "assistant_last": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
    "unicode": [
        {"role": "user", "content": 'Grüße, 世界! 🙂 «quotes» "double" \'single\' <b>&amp; \\n'},
        {"role": "assistant", "content": "Καλημέρα — ok ✓"},
        {"role": "user", "content": "日本語で答えて"},
    ],
    "empty_content": [
        {"role": "system", "content": ""},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "still there?"},
    ],
    "padded_content": [
        {"role": "user", "content": "  leading and trailing spaces \n\n"},
    ],
}

# name: (template, bos token, eos token, conversations the template itself refuses)
TEMPLATES: dict[str, tuple[str, str | None, str, frozenset[str]]] = {
    "llama-3.1": (LLAMA_3_1_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>", frozenset()),
    "llama-3.2": (LLAMA_3_2_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>", frozenset()),
    "qwen-2.5": (QWEN_2_5_INSTRUCT, None, "<|im_end|>", frozenset()),
    # The original Mistral template knows no system role.
    "mistral-v0.1": (
        MISTRAL_V0_1_INSTRUCT,
        "<s>",
        "</s>",
        frozenset({"system_multi_turn", "assistant_last", "empty_content"}),
    ),
    "mistral-v0.2": (MISTRAL_V0_2_INSTRUCT, "<s>", "</s>", frozenset()),
    "mistral-v0.3": (MISTRAL_V0_3_INSTRUCT, "<s>", "</s>", frozenset()),
}

# Llama 3.2 prints today's date unless told one; fixed here so the render is reproducible
# (the default is checked on its own below).
DATE = {"date_string": "26 Jul 2024"}


class _TokenizerView:
    """What pyllm's renderer reads from a tokenizer (bos_id, eos_id, token_to_piece), served by
    the Hugging Face tokenizer under test, so both sides get their BOS/EOS text from one vocab."""

    def __init__(self, hf: Any) -> None:
        self._hf = hf
        self.bos_id = hf.bos_token_id
        self.eos_id = hf.eos_token_id

    def token_to_piece(self, token_id: int) -> str:
        return str(self._hf.convert_ids_to_tokens(token_id))


def _write_tokenizer(folder: Path, template: str, bos: str | None, eos: str) -> Any:
    """A minimal tokenizer folder as a model repository has it, loaded with AutoTokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", eos] if bos is None else ["<unk>", bos, eos]
    model = tokenizers.models.WordLevel({t: i for i, t in enumerate(specials)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": "<unk>",
        "chat_template": template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {
        name: _write_tokenizer(root / name, template, bos, eos)
        for name, (template, bos, eos, _) in TEMPLATES.items()
    }


def _hf_render(hf: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    out = hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(out, str)
    return out


def _pyllm_render(hf: Any, template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return render(messages, template, tokenizer=_TokenizerView(hf), **kwargs)


def _cases() -> Iterator[Any]:
    for name in TEMPLATES:
        for conv in CONVERSATIONS:
            for agp in (True, False):
                yield pytest.param(name, conv, agp, id=f"{name}-{conv}-{'gen' if agp else 'nogen'}")


@pytest.mark.parametrize(("name", "conversation", "add_generation_prompt"), list(_cases()))
def test_conversation_renders_as_transformers(
    hf_tokenizers: dict[str, Any], name: str, conversation: str, add_generation_prompt: bool
) -> None:
    template, _, _, refused = TEMPLATES[name]
    hf = hf_tokenizers[name]
    messages = CONVERSATIONS[conversation]
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt, **DATE}
    if conversation in refused:
        # The template raises: pyllm must refuse with the template's own message, as a
        # ChatTemplateError, where transformers raises a jinja2 TemplateError.
        with pytest.raises(jinja2.TemplateError) as hf_error:
            _hf_render(hf, messages, **kwargs)
        with pytest.raises(ChatTemplateError) as ours:
            _pyllm_render(hf, template, messages, **kwargs)
        assert str(hf_error.value) and str(hf_error.value) in str(ours.value)
        return
    expected = _hf_render(hf, messages, **kwargs)
    assert _pyllm_render(hf, template, messages, **kwargs) == expected
    # Guard against two equally empty renders: every user turn reaches the prompt.
    for m in messages:
        if m["role"] == "user":
            assert m["content"].strip() in expected


def test_special_tokens_reach_the_prompt(hf_tokenizers: dict[str, Any]) -> None:
    """BOS/EOS text comes from the tokenizer (a wrong id or piece shows up here)."""
    messages = CONVERSATIONS["no_system"]
    llama = _pyllm_render(hf_tokenizers["llama-3.1"], LLAMA_3_1_INSTRUCT, messages, **DATE)
    assert llama.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    mistral = _pyllm_render(hf_tokenizers["mistral-v0.2"], MISTRAL_V0_2_INSTRUCT, messages)
    assert mistral == "<s> [INST] Name a colour. [/INST] Blue.</s> [INST] Another one. [/INST]"


# ---- tools and template variables ---------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TOOL_QUESTION = [
    {"role": "system", "content": "Use tools when needed."},
    {"role": "user", "content": "What's the weather in Zürich?"},
]
# A whole tool round: the call (id of 9 characters, as Mistral v0.3 requires) and its result.
TOOL_ROUND = [
    {"role": "user", "content": "What's the weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call0W3a7",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call0W3a7", "name": "get_weather",
     "content": '{"temperature_c": 21, "sky": "clear <sunny>"}'},
]
BUILTIN_CALL = [
    {"role": "user", "content": "Search the news"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function",
             "function": {"name": "brave_search", "arguments": {"query": "pyllm & GGUF"}}}
        ],
    },
]

TOOL_CASES = [
    ("llama-3.1", TOOL_QUESTION, {}, "Given the following functions"),
    ("llama-3.1", TOOL_QUESTION, {"tools_in_user_message": False}, "You have access to the"),
    ("llama-3.1", TOOL_ROUND, {}, '"parameters": {"city": "Zürich"}'),
    ("llama-3.1", BUILTIN_CALL, {"builtin_tools": ["brave_search", "code_interpreter"]},
     '<|python_tag|>brave_search.call(query="pyllm & GGUF")<|eom_id|>'),
    ("llama-3.2", TOOL_QUESTION, {}, "Environment: ipython\n"),
    ("llama-3.2", TOOL_ROUND, {"tools_in_user_message": False}, "<|start_header_id|>ipython"),
    ("qwen-2.5", TOOL_QUESTION, {}, '<tools>\n{"type": "function"'),
    ("qwen-2.5", TOOL_ROUND, {}, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Z'),
    ("mistral-v0.3", TOOL_QUESTION, {}, '[AVAILABLE_TOOLS] [{"type": "function", "function": {'),
    ("mistral-v0.3", TOOL_ROUND, {}, '[TOOL_CALLS] [{"name": "get_weather"'),
]


@pytest.mark.parametrize(
    ("name", "messages", "variables", "marker"),
    TOOL_CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(TOOL_CASES)],
)
def test_tools_render_as_transformers(
    hf_tokenizers: dict[str, Any],
    name: str,
    messages: list[dict[str, Any]],
    variables: dict[str, Any],
    marker: str,
) -> None:
    template = TEMPLATES[name][0]
    hf = hf_tokenizers[name]
    kwargs = {"tools": [WEATHER_TOOL], "add_generation_prompt": True, **DATE, **variables}
    expected = _hf_render(hf, messages, **kwargs)
    assert marker in expected  # the tool path of the template was taken
    assert _pyllm_render(hf, template, messages, **kwargs) == expected


def test_llama_3_2_default_date_is_today(hf_tokenizers: dict[str, Any]) -> None:
    """Without ``date_string`` Llama 3.2's template calls ``strftime_now``: both sides must
    print today's date the same way."""
    hf = hf_tokenizers["llama-3.2"]
    messages = CONVERSATIONS["system_multi_turn"]
    for _ in range(2):  # a render that straddles midnight is retried once
        today = datetime.now().strftime("%d %b %Y")
        expected = _hf_render(hf, messages, add_generation_prompt=True)
        ours = _pyllm_render(hf, LLAMA_3_2_INSTRUCT, messages, add_generation_prompt=True)
        if datetime.now().strftime("%d %b %Y") == today:
            break
    assert f"Today Date: {today}\n\n" in expected
    assert ours == expected


# ---- SmolLM2: the template and tokenizer of the real model file ---------------------------------


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path: Path) -> str:
    with GGUFReader(smollm2_path) as reader:
        template = reader.metadata["tokenizer.chat_template"]
    assert isinstance(template, str) and "<|im_start|>" in template
    return template


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path: Path) -> Any:
    """transformers' own tokenizer built from the GGUF file (its vocab, BOS/EOS and template)."""
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_path: Path) -> Iterator[LLM]:
    with LLM(smollm2_path, n_ctx=256) as llm:
        yield llm


@pytest.mark.model
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_renders_as_transformers(
    smollm2_template: str, smollm2_hf: Any, conversation: str, add_generation_prompt: bool
) -> None:
    assert smollm2_hf.chat_template == smollm2_template
    messages = CONVERSATIONS[conversation]
    expected = _hf_render(smollm2_hf, messages, add_generation_prompt=add_generation_prompt)
    ours = _pyllm_render(
        smollm2_hf, smollm2_template, messages, add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    assert expected.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.model
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_smollm2_chat_prompt_tokens_match_transformers(
    smollm2_llm: LLM, smollm2_hf: Any, conversation: str
) -> None:
    """What LLM.chat feeds the model: the same token ids as transformers' tokenized template
    (``<|im_start|>``/``<|im_end|>`` as their single special ids, not spelled out)."""
    messages = CONVERSATIONS[conversation]
    ours, stops = chat_prompt(smollm2_llm, messages, None)
    expected = smollm2_hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert ours == list(expected)
    text = _hf_render(smollm2_hf, messages, add_generation_prompt=True)
    im_start = smollm2_hf.convert_tokens_to_ids("<|im_start|>")
    assert ours.count(im_start) == text.count("<|im_start|>") >= len(messages) + 1
    assert "<|im_end|>" in stops
