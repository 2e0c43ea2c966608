"""Cheap Gradio sessions: a visitor's first event must not cost the proxy tens of milliseconds.

Gradio 6 creates a `SessionState` for every new session hash the queue sees, and its constructor
renders the config of every block of the page (`config_for_block` for ~120 blocks here: 65 ms of
CPU on the event loop, measured with bench/page_refresh.py and cProfile) and keeps it, up to
10,000 sessions. A client that sends each event under a new session hash made every proxy request
wait behind that work. The configs are only read for blocks an event updates (and for deep
links, which this page has none of), so here they are rendered on first use instead, and a value
an event sets is noted and put in the config only if that config is ever rendered.

Written against gradio==6.31.0 (pinned); `install()` checks the constructor it replaces is the
one it was written for, and leaves Gradio alone otherwise.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator
from copy import copy
from typing import Any

from gradio import state_holder

_ORIGINAL_INIT = state_holder.SessionState.__init__
_ORIGINAL_UPDATE_VALUE = state_holder.SessionState._update_value_in_config
# What the replaced constructor sets; if Gradio's changes, ours is not installed.
_EXPECTED = ("self.blocks_config = copy(blocks.default_config)", "self.config_values = {", "self._state_ttl = {}")


class LazyConfigs(dict):
    """`SessionState.config_values`, each block's config rendered the first time it is read."""

    def __init__(self, blocks_config: Any, ids: Iterable[int]) -> None:
        super().__init__()
        self._blocks_config = blocks_config
        self._pending = set(ids)
        self._values: dict[int, Any] = {}  # values set before the block's config was rendered

    def _render(self, key: int) -> Any:
        self._pending.discard(key)
        config = self._blocks_config.config_for_block(key, [], self._blocks_config.blocks[key])
        if key in self._values and "props" in config:
            config["props"]["value"] = self._values.pop(key)
        super().__setitem__(key, config)
        return config

    def set_value(self, key: int, value: Any) -> bool:
        """Note a block's new value without rendering its config; False if it is rendered."""
        if key not in self._pending:
            return False
        self._values[key] = value
        return True

    def _render_all(self) -> None:
        for key in list(self._pending):
            self._render(key)

    def __missing__(self, key: int) -> Any:
        if key in self._pending:
            return self._render(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or key in self._pending

    def __setitem__(self, key: int, value: Any) -> None:
        self._pending.discard(key)
        self._values.pop(key, None)
        super().__setitem__(key, value)

    def get(self, key: int, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 - dict.get skips __missing__

    def __iter__(self) -> Iterator[int]:
        self._render_all()
        return super().__iter__()

    def __len__(self) -> int:
        return super().__len__() + len(self._pending)

    def items(self):  # type: ignore[override]
        self._render_all()
        return super().items()

    def values(self):  # type: ignore[override]
        self._render_all()
        return super().values()

    def keys(self):  # type: ignore[override]
        self._render_all()
        return super().keys()


def _lazy_init(self: Any, blocks: Any) -> None:
    self.blocks_config = copy(blocks.default_config)
    self.config_values = LazyConfigs(self.blocks_config, [k for k in self.blocks_config.blocks if k in blocks.blocks])
    self.state_data = {}
    self._state_ttl = {}
    self.is_closed = False
    self.STATE_TTL_WHEN_CLOSED = 1 if os.getenv("GRADIO_IS_E2E_TEST", None) else 3600


def _lazy_update_value(self: Any, key: int, value: Any) -> None:
    configs = self.config_values
    if isinstance(configs, LazyConfigs) and configs.set_value(key, value):
        return
    _ORIGINAL_UPDATE_VALUE(self, key, value)


def install() -> bool:
    """Make new Gradio sessions cheap; False (and Gradio untouched) if its code is not the expected one."""
    if state_holder.SessionState.__init__ is _lazy_init:
        return True
    try:
        source = inspect.getsource(_ORIGINAL_INIT)
    except (OSError, TypeError):
        return False
    if not all(line in source for line in _EXPECTED):
        return False
    state_holder.SessionState.__init__ = _lazy_init
    state_holder.SessionState._update_value_in_config = _lazy_update_value
    return True
