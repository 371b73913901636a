"""The tiny checkpoints' tokenizer: byte-level BPE without merges (token ``b`` is byte ``b``), three
special tokens and a chat template (with tool calls), loadable with ``AutoTokenizer.from_pretrained``."""

from __future__ import annotations

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
NUM_BYTE_TOKENS = 256
# NOTE: "<role>: <content>\n" per message, then "assistant:". transformers renders templates with
# trim_blocks, which drops a newline right after a block tag: those are written as {{ '\n' }}. With tools, modelled on Qwen's template:
# a system turn lists them in <tools></tools> and asks for <tool_call>{"name", "arguments"}</tool_call>
# blocks (the hermes format); an assistant's tool calls are written back as such blocks and a tool's
# answer inside <tool_response></tool_response>.
_TOOLS_SYSTEM = (
    "{% set ns = namespace(first=0) %}{% if tools %}system: "
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% set ns.first = 1 %}{% endif %}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n{% endif %}'
)
_MESSAGES = (
    "{% for message in messages[ns.first:] %}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "assistant: {{ message['content'] or '' }}{% for call in message['tool_calls'] %}"
    "{% set f = call['function'] if call['function'] is defined else call %}"
    '<tool_call>\n{"name": "{{ f[\'name\'] }}", "arguments": {{ f[\'arguments\'] | tojson }}}\n</tool_call>'
    "{% endfor %}{{ '\\n' }}"
    "{% elif message['role'] == 'tool' %}tool: <tool_response>\n{{ message['content'] }}\n</tool_response>\n"
    "{% else %}{{ message['role'] }}: {{ message['content'] }}\n{% endif %}{% endfor %}"
)
CHAT_TEMPLATE = _TOOLS_SYSTEM + _MESSAGES + "{% if add_generation_prompt %}assistant:{% endif %}"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what the ByteLevel pre-tokenizer emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def make_tokenizer():
    """Byte-level BPE without merges: token ``b`` is byte ``b``; then the special tokens (ids 256, 257, 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
