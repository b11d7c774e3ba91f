"""Chat templates (sandboxed Jinja) and the named built-in chat formats.

Every expected prompt below is written out literally: it is the layout each model family was
trained on, not something derived from the code under test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyllm.chat import (
    BOS,
    EOS,
    ChatFormat,
    ChatTemplate,
    TokenId,
    get_format,
    guess_format,
    list_formats,
    parse_fastllm,
    register_format,
    render,
    render_ids,
    render_parts,
    stop_strings,
)
from pyllm.errors import ChatTemplateError, PyllmError

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
    {"role": "user", "content": "Who are you?"},
]
CONVERSATION = [SYSTEM, *TURNS]

# Two turns with a system prompt, plus the generation prompt, in each built-in format.
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there!<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello [/INST] Hi there! </s>"
        "<s>[INST] Who are you? [/INST]"
    ),
    "llama-2-nosys": (
        "<s>[INST] You are a helpful assistant.\nHello [/INST] Hi there! </s>"
        "<s>[INST] Who are you? [/INST]"
    ),
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral-instruct": (
        "<s>[INST] You are a helpful assistant.\n\nHello [/INST]Hi there!</s>"
        "[INST] Who are you? [/INST]"
    ),
    "vicuna": (
        "<s>You are a helpful assistant. USER: Hello ASSISTANT: Hi there!</s>"
        "USER: Who are you? ASSISTANT:"
    ),
    "alpaca": (
        "<s>You are a helpful assistant.\n\n"
        "### Instruction:\nHello\n\n### Response:Hi there!</s>"
        "### Instruction:\nWho are you?\n\n### Response:"
    ),
    "wizardcoder": (
        "<s>You are a helpful assistant.\n\n"
        "### Instruction:\nHello\n\n### Response:Hi there!\n"
        "### Instruction:\nWho are you?\n\n### Response:"
    ),
    "deepseek-coder": (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.\n"
        "### Instruction:\nHello\n### Response:\nHi there!\n<|EOT|>\n"
        "### Instruction:\nWho are you?\n### Response:\n"
    ),
    "internlm": (
        "<s><|System|>:You are a helpful assistant.\n"
        "<|User|>:Hello<eoh>\n<|Bot|>:Hi there!<eoa>\n"
        "<s><|User|>:Who are you?<eoh>\n<|Bot|>:"
    ),
    "internlm2": (
        "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there!<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "xverse": (
        "You are a helpful assistant.\n\n"
        "Human: Hello\n\nAssistant: Hi there!<|endoftext|>"
        "Human: Who are you?\n\nAssistant: "
    ),
    "billa": (
        "<s>You are a helpful assistant.\n"
        "Human: Hello\nAssistant: Hi there!\n"
        "Human: Who are you?\nAssistant: "
    ),
    "yulan": (
        "<s>You are a helpful assistant.\n"
        "[|Human|]:Hello\n[|AI|]:Hi there!\n"
        "[|Human|]:Who are you?\n[|AI|]:"
    ),
    "chinese-alpaca-2": (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello [/INST] Hi there! </s>"
        "<s>[INST] Who are you? [/INST]"
    ),
    "zephyr": (
        "<s><|system|>\nYou are a helpful assistant.</s>\n"
        "<|user|>\nHello</s>\n"
        "<|assistant|>\nHi there!</s>\n"
        "<|user|>\nWho are you?</s>\n"
        "<|assistant|>\n"
    ),
}

EXPECTED_STOPS = {
    "chatml": ["<|im_end|>"],
    "llama-2": ["</s>"],
    "llama-2-nosys": ["</s>"],
    "llama-3": ["<|eot_id|>", "<|end_of_text|>"],
    "mistral-instruct": ["</s>"],
    "vicuna": ["</s>", "USER:"],
    "alpaca": ["</s>", "### Instruction:"],
    "wizardcoder": ["</s>", "### Instruction:"],
    "deepseek-coder": ["<|EOT|>"],
    "internlm": ["<eoa>"],
    "internlm2": ["<|im_end|>"],
    "xverse": ["<|endoftext|>", "Human:"],
    "billa": ["</s>", "\nHuman:"],
    "yulan": ["</s>", "[|Human|]"],
    "chinese-alpaca-2": ["</s>"],
    "zephyr": ["</s>"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_format_two_turns_with_system(name: str) -> None:
    assert render(CONVERSATION, name) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_STOPS))
def test_builtin_format_stop_strings(name: str) -> None:
    assert stop_strings(name) == EXPECTED_STOPS[name]


def test_list_formats_has_every_required_format() -> None:
    assert set(EXPECTED) <= set(list_formats())
    assert list_formats() == sorted(list_formats())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "vicuna",
            "<s>A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions. "
            "USER: Hello ASSISTANT:",
        ),
        (
            "alpaca",
            "<s>Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n### Instruction:\nHello\n\n### Response:",
        ),
        (
            "yulan",
            "<s>The following is a conversation between a human and an AI assistant namely "
            "YuLan, developed by GSAI, Renmin University of China. The AI assistant gives "
            "helpful, detailed, and polite answers to the user's questions.\n"
            "[|Human|]:Hello\n[|AI|]:",
        ),
        (
            "deepseek-coder",
            "<｜begin▁of▁sentence｜>You are an AI programming assistant, utilizing the Deepseek "
            "Coder model, developed by Deepseek Company, and you only answer questions related "
            "to computer science. For politically sensitive questions, security and privacy "
            "issues, and other non-computer science questions, you will refuse to answer\n"
            "### Instruction:\nHello\n### Response:\n",
        ),
        (
            "chinese-alpaca-2",
            "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
            "Hello [/INST]",
        ),
        ("billa", "<s>\nHuman: Hello\nAssistant: "),
        ("llama-2", "<s>[INST] Hello [/INST]"),
        ("chatml", "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_default_system_prompt_when_none_given(name: str, expected: str) -> None:
    assert render(TURNS[:1], name) == expected


def test_without_generation_prompt_and_ending_with_a_reply() -> None:
    assert render(TURNS, "chatml", add_generation_prompt=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n"
    )
    # The BOS that would open another [INST] is not emitted after the last reply.
    assert render(TURNS[:2], "llama-2", add_generation_prompt=False) == (
        "<s>[INST] Hello [/INST] Hi there! </s>"
    )
    assert render(TURNS[:2], "internlm", add_generation_prompt=False) == (
        "<s><|User|>:Hello<eoh>\n<|Bot|>:Hi there!<eoa>\n"
    )


def test_llama_formats_strip_message_whitespace() -> None:
    msgs = [{"role": "user", "content": "  Hello \n"}, {"role": "assistant", "content": " Hi "}]
    assert render(msgs, "llama-2", add_generation_prompt=False) == "<s>[INST] Hello [/INST] Hi </s>"
    assert render(msgs[:1], "chatml") == (
        "<|im_start|>user\n  Hello \n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_aliases_resolve() -> None:
    assert render(CONVERSATION, "llama3") == EXPECTED["llama-3"]
    assert render(CONVERSATION, "qwen") == EXPECTED["chatml"]
    assert get_format("mistral") is get_format("mistral-instruct")


def test_unknown_format_name() -> None:
    with pytest.raises(ChatTemplateError, match="unknown chat format 'llama-9'.*chatml"):
        render(CONVERSATION, "llama-9")
    with pytest.raises(ChatTemplateError):
        stop_strings("no-such-format")


# ---------------------------------------------------------------------------------------------
# BOS/EOS from a tokenizer, fixed token ids, user-defined (fastllm-style) formats
# ---------------------------------------------------------------------------------------------


class FakeTokenizer:
    """Token ids 0..N for a tiny vocabulary; text is split on the vocabulary's special pieces."""

    def __init__(self, bos_id: int | None = 1, eos_id: int | None = 2) -> None:
        self.pieces = ["<unk>", "<BOS>", "<EOS>", "<reserved_106>", "<reserved_107>"]
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.calls: list[tuple[str, bool, bool]] = []

    def token_to_piece(self, token_id: int) -> str:
        return self.pieces[token_id]

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self.calls.append((text, add_special, parse_special))
        out: list[int] = []
        i = 0
        while i < len(text):
            for tid, piece in enumerate(self.pieces):
                if parse_special and tid and text.startswith(piece, i):
                    out.append(tid)
                    i += len(piece)
                    break
            else:
                out.append(1000 + ord(text[i]))  # one id per character
                i += 1
        return out


def test_bos_eos_come_from_tokenizer_or_arguments() -> None:
    tok = FakeTokenizer()
    msgs = TURNS[:2]
    assert render(msgs, "llama-2", tokenizer=tok, add_generation_prompt=False) == (
        "<BOS>[INST] Hello [/INST] Hi there! <EOS>"
    )
    # An explicit argument beats the tokenizer; "" means "no BOS text at all".
    assert render(msgs, "llama-2", tokenizer=tok, bos_token="", add_generation_prompt=False) == (
        "[INST] Hello [/INST] Hi there! <EOS>"
    )
    # A model without a BOS token gets none.
    no_bos = FakeTokenizer(bos_id=None)
    assert render(msgs[:1], "llama-2", tokenizer=no_bos) == "[INST] Hello [/INST]"
    # Templates see the same strings.
    tmpl = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    assert render(msgs, tmpl, tokenizer=tok) == "<BOS>Hello<EOS>"
    assert render(msgs, tmpl) == "Hello"
    assert render(msgs, tmpl, bos_token="<s>", eos_token="</s>") == "<s>Hello</s>"


# Baichuan-2-Chat as fastllm describes it: reserved token ids around the roles.
BAICHUAN_LIKE = ChatFormat.from_fastllm(
    pre_prompt="",
    user_role="<FLM_FIX_TOKEN_3>",
    bot_role="<FLM_FIX_TOKEN_4>",
    history_sep="",
)


def test_parse_fastllm_fixed_tokens() -> None:
    assert parse_fastllm(" <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>x") == (
        " ",
        TokenId(2),
        TokenId(1),
        "x",
    )
    assert parse_fastllm("plain") == ("plain",)
    assert parse_fastllm("") == ()


def test_fixed_token_ids_render_as_parts_and_ids() -> None:
    assert BAICHUAN_LIKE.has_fixed_ids
    assert render_parts(TURNS, BAICHUAN_LIKE) == [3, "Hello", 4, "Hi there!", 3, "Who are you?", 4]
    with pytest.raises(ChatTemplateError, match="fixed token id 3.*tokenizer"):
        render(TURNS, BAICHUAN_LIKE)
    tok = FakeTokenizer()
    assert render(TURNS[:1], BAICHUAN_LIKE, tokenizer=tok) == "<reserved_106>Hello<reserved_107>"
    ids = render_ids(TURNS[:1], BAICHUAN_LIKE, tok)
    assert ids == [3, *(1000 + ord(c) for c in "Hello"), 4]
    assert tok.calls == [("Hello", False, True)]


def test_render_ids_parses_special_text() -> None:
    tok = FakeTokenizer()
    ids = render_ids(TURNS[:1], "llama-2", tok)
    # "<BOS>" in the rendered text became the single BOS id, not five characters.
    assert ids[0] == 1
    assert ids[1:] == [1000 + ord(c) for c in "[INST] Hello [/INST]"]


def test_fastllm_format_matches_fastllm_prompt_building() -> None:
    # fastllm builds: pre_prompt + (user_role + q + bot_role + a + history_sep)* + user_role +
    # q + bot_role. YuLan's published fastllm description, rendered, equals the built-in layout.
    yulan_fastllm = ChatFormat.from_fastllm(
        pre_prompt=(
            "The following is a conversation between a human and an AI assistant namely YuLan, "
            "developed by GSAI, Renmin University of China. The AI assistant gives helpful, "
            "detailed, and polite answers to the user's questions.\n"
        ),
        user_role="[|Human|]:",
        bot_role="\n[|AI|]:",
        history_sep="\n",
    )
    assert render(TURNS, yulan_fastllm) == render(TURNS, "yulan", bos_token="")
    vicuna_text = render(TURNS, yulan_fastllm)
    assert vicuna_text.endswith("\n[|Human|]:Who are you?\n[|AI|]:")


def test_register_a_user_format() -> None:
    fmt = ChatFormat(
        pre_prompt=BOS,
        system_suffix="\n",
        user_role="### Human: ",
        user_suffix="\n",
        bot_role="### Assistant:",
        reply_prefix=" ",
        history_sep=(EOS, "\n"),
        bos_token="<s>",
        eos_token="</s>",
        stop=("### Human:",),
    )
    register_format("test-guanaco", fmt)
    try:
        assert "test-guanaco" in list_formats()
        assert render(CONVERSATION, "test-guanaco") == (
            "<s>You are a helpful assistant.\n### Human: Hello\n### Assistant: Hi there!</s>\n"
            "### Human: Who are you?\n### Assistant:"
        )
        assert stop_strings("test-guanaco") == ["### Human:"]
        with pytest.raises(ChatTemplateError, match="already exists"):
            register_format("test-guanaco", fmt)
        with pytest.raises(ChatTemplateError, match="already exists"):
            register_format("chatml", fmt)
        register_format("test-guanaco", fmt.with_(stop=("###",)), overwrite=True)
        assert stop_strings("test-guanaco") == ["###"]
    finally:
        from pyllm.chat import formats

        formats._registry.pop("test-guanaco", None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"user_role": 3.5},
        {"user_role": [True]},
        {"user_role": -1},
        {"stop": "</s>"},
        {"stop": ("",)},
        {"default_system": 7},
    ],
)
def test_bad_chat_format_definitions(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ChatTemplateError):
        ChatFormat(**kwargs)


def test_register_format_rejects_bad_arguments() -> None:
    with pytest.raises(ChatTemplateError):
        register_format("", ChatFormat())
    with pytest.raises(ChatTemplateError):
        register_format("x", "chatml")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Jinja templates
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path: Path) -> str:
    from pyllm.formats.gguf import GGUFReader

    with GGUFReader(smollm2_path) as reader:
        template = reader.metadata["tokenizer.chat_template"]
    assert isinstance(template, str)
    return template


@pytest.mark.model
def test_smollm2_gguf_template_renders_chatml(smollm2_template: str) -> None:
    template = smollm2_template
    assert render(CONVERSATION, template) == EXPECTED["chatml"]
    # Without a system message, SmolLM2's template supplies its own.
    assert render(TURNS[:1], template) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert guess_format(template) == "chatml"
    assert stop_strings(template) == ["<|im_end|>"]


@pytest.mark.model
def test_smollm2_render_ids_with_its_tokenizer(smollm2_path: Path, smollm2_template: str) -> None:
    from pyllm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_path)
    template = smollm2_template
    ids = render_ids(CONVERSATION, template, tok)
    # Every ChatML marker became its single special token, and nothing was lost or added.
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert im_start is not None and im_end is not None
    assert ids.count(im_start) == 5 and ids.count(im_end) == 4
    assert ids[0] == im_start
    assert tok.decode(ids) == EXPECTED["chatml"]


def test_template_features_used_by_real_templates() -> None:
    # trim_blocks/lstrip_blocks, loop controls, namespace, tojson without HTML escaping,
    # strftime_now, tools and extra variables.
    tmpl = (
        "{%- set ns = namespace(n=0) -%}\n"
        "{% for m in messages %}\n"
        "  {% if m.role == 'assistant' %}{% continue %}{% endif %}\n"
        "  {% set ns.n = ns.n + 1 %}\n"
        "{{ m.role }}:{{ m['content'] }};\n"
        "  {% if ns.n == 1 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{{ tools | tojson }}|{{ {'a': '<&>', 'b': 'é'} | tojson(indent=1) }}|{{ date_string }}"
    )
    out = render(
        CONVERSATION,
        tmpl,
        tools=[{"name": "f"}],
        date_string="26 Jul 2024",
    )
    assert out == (
        'system:You are a helpful assistant.;\n[{"name": "f"}]|{\n "a": "<&>",\n "b": "é"\n}'
        "|26 Jul 2024"
    )
    year = render(TURNS, "{{ strftime_now('%Y') }}")
    assert len(year) == 4 and year.isdigit()
    assert render(TURNS, "{{ tools is none }}") == "True"
    gen = "{% if add_generation_prompt %}G{% endif %}"
    assert render(TURNS, gen) == "G"
    assert render(TURNS, gen, add_generation_prompt=False) == ""


def test_generation_tag_is_accepted() -> None:
    tmpl = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "[{{ m.content }}]{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    assert render(TURNS, tmpl) == "Hello[Hi there!]Who are you?"


def test_compiled_template_object() -> None:
    tmpl = ChatTemplate("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    assert tmpl.render(TURNS) == "[user][assistant][user]"
    assert render(TURNS, tmpl) == "[user][assistant][user]"


def test_raise_exception_becomes_chat_template_error() -> None:
    tmpl = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}ok"
    )
    assert render(TURNS, tmpl) == "ok"
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        render(CONVERSATION, tmpl)


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}",  # unclosed block
        "{{ messages[0] ",  # unterminated expression
        "{% endif %}",
        "{{ 1 + }}",
    ],
)
def test_syntax_errors(template: str) -> None:
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render(TURNS, template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ 1 / 0 }}",
        "{{ messages[10].content }}",
        "{{ undefined_thing.attr }}",
        "{{ messages | no_such_filter }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "{{ tools | tojson }}{{ messages | tojson(indent=x.y) }}",
        "{{ 'x' + 1 }}",
    ],
)
def test_runtime_errors(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render(TURNS, template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__['datetime'] }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{{ self.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ messages | attr('__class__') }}",
        "{{ ''['__class__'] }}",
        "{{ messages[0].content.__class__.__subclasses__ }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{{ '{x.__class__}'.format_map({'x': 1}) }}",
        "{{ messages[0].__setitem__('role', 'x') }}",
    ],
)
def test_sandbox_blocks_python_internals(template: str) -> None:
    with pytest.raises(ChatTemplateError) as err:
        render(TURNS, template)
    msg = str(err.value)
    assert "sandbox" in msg or "not allowed" in msg or "unsafe" in msg, msg


@pytest.mark.parametrize(
    "template",
    [
        "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
        "{% set _ = messages[0].update({'role': 'system'}) %}",
        "{% set _ = messages.pop() %}",
        "{% set _ = messages[0].clear() %}",
    ],
)
def test_sandbox_is_immutable(template: str) -> None:
    msgs = [dict(m) for m in TURNS]
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render(msgs, template)
    assert msgs == TURNS  # the caller's messages are untouched


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' * 100000000 }}",
        "{{ ['a'] * 100000000 }}",
        "{{ 10 ** 100000000 }}",
        "{% for i in range(1000000000) %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='x' * 1000000) %}"
        "{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    ],
)
def test_sandbox_bounds_resource_use(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render(TURNS, template)


def test_template_output_cap() -> None:
    # 200 x 100000 characters is more than the output cap; fails fast, not after 20 MB.
    tmpl = "{% for i in range(200) %}{{ 'x' * 100000 }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="exceeds"):
        render(TURNS, tmpl)


def test_errors_are_in_the_pyllm_family() -> None:
    with pytest.raises(PyllmError):
        render(TURNS, "{{ ''.__class__ }}")


# ---------------------------------------------------------------------------------------------
# Message validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list"),
        ({"role": "user", "content": "x"}, "list"),
        (None, "list"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], "no 'role'"),
        ([{"role": 3, "content": "x"}], "no 'role'"),
        ([{"role": "narrator", "content": "x"}], "role 'narrator'"),
        ([{"role": "user"}], "no 'content'"),
        ([{"role": "user", "content": 5}], "must be a str"),
        ([{"role": "user", "content": None}], "must be a str"),
        ([{"role": "user", "content": ["a"]}], "must be a str"),
    ],
)
@pytest.mark.parametrize("target", ["chatml", "{{ messages | length }}"])
def test_malformed_messages(messages: Any, match: str, target: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        render(messages, target)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "assistant", "content": "x"}], "alternate"),
        ([TURNS[0], TURNS[0]], "alternate"),
        ([SYSTEM], "no user message"),
        ([TURNS[0], SYSTEM], "system message"),
        ([SYSTEM, SYSTEM, TURNS[0]], "system message"),
        ([{"role": "tool", "content": "42"}], "role 'tool'"),
    ],
)
def test_format_turn_order(messages: Any, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        render(messages, "llama-2")


def test_templates_accept_tool_messages() -> None:
    msgs = [
        TURNS[0],
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
        {"role": "tool", "content": "42"},
    ]
    tmpl = "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}"
    assert render(msgs, tmpl) == "user=Hello;assistant=None;tool=42;"


def test_bad_template_argument_types() -> None:
    with pytest.raises(ChatTemplateError):
        render(TURNS, 42)  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError):
        render(TURNS, "chatml", bos_token=1)  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match="Jinja template"):
        render(TURNS, "chatml", tools=[{"name": "f"}])


# ---------------------------------------------------------------------------------------------
# Recognising templates
# ---------------------------------------------------------------------------------------------

# Small templates in the style of each family (written for these tests).
FAMILY_TEMPLATES = {
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
        "\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "llama-2": (
        "{% for m in messages %}{% if m.role == 'system' %}<<SYS>>\\n{{ m.content }}\\n<</SYS>>"
        "{% elif m.role == 'user' %}{{ bos_token }}[INST] {{ m.content }} [/INST]"
        "{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}"
    ),
    "mistral-instruct": (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}"
        " [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "internlm2": (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endfor %}"
    ),
    "deepseek-coder": (
        "{% for m in messages %}{% if m.role == 'user' %}### Instruction:\n{{ m.content }}\n"
        "{% else %}### Response:\n{{ m.content }}\n<|EOT|>\n{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{# <|system|> <|user|> <|assistant|> #}"
    ),
    "vicuna": (
        "{% for m in messages %}{{ 'USER: ' if m.role == 'user' else 'ASSISTANT: ' }}"
        "{{ m.content }}{% endfor %}"
    ),
}


# CONVERSATION through each family template, with BOS "<B>" and EOS "<E>" so their places show.
FAMILY_RENDERED = {
    "llama-3": (
        "<B><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama-2": (
        "<<SYS>>\\nYou are a helpful assistant.\\n<</SYS>><B>[INST] Hello [/INST] Hi there! <E>"
        "<B>[INST] Who are you? [/INST]"
    ),
    "mistral-instruct": (
        "<B>You are a helpful assistant.<E>[INST] Hello [/INST]Hi there!<E>"
        "[INST] Who are you? [/INST]"
    ),
    "internlm2": (
        "<B><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n"
    ),
    "deepseek-coder": (
        "### Response:\nYou are a helpful assistant.\n<|EOT|>\n### Instruction:\nHello\n"
        "### Response:\nHi there!\n<|EOT|>\n### Instruction:\nWho are you?\n"
    ),
    "zephyr": (
        "<|system|>\nYou are a helpful assistant.<E>\n<|user|>\nHello<E>\n"
        "<|assistant|>\nHi there!<E>\n<|user|>\nWho are you?<E>\n"
    ),
    "vicuna": (
        "ASSISTANT: You are a helpful assistant.USER: HelloASSISTANT: Hi there!"
        "USER: Who are you?"
    ),
}


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_guess_format(name: str) -> None:
    template = FAMILY_TEMPLATES[name]
    assert guess_format(template) == name
    assert stop_strings(template) == EXPECTED_STOPS[name]
    # Recognising the family must not change how the template itself renders.
    rendered = render(CONVERSATION, template, bos_token="<B>", eos_token="<E>")
    assert rendered == FAMILY_RENDERED[name]


def test_guess_format_unknown_and_names() -> None:
    gemma_like = (
        "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
        "{% endfor %}"
    )
    assert guess_format(gemma_like) is None
    assert stop_strings(gemma_like) == ["<end_of_turn>"]
    phi3_like = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    assert guess_format(phi3_like + "<|user|><|assistant|><|system|>") is None
    assert guess_format("{{ messages }}") is None
    assert stop_strings("{{ messages }}") == []
    assert guess_format("llama2") == "llama-2"
    assert guess_format("zephyr") == "zephyr"
    with pytest.raises(ChatTemplateError):
        guess_format(None)  # type: ignore[arg-type]
