"""What both engines share around their lifecycle: the state calls the contract names, the status
snapshot, making the model resident, and rendering chat prompts with the model's template. An
engine adds how it loads (`_run`, which also sets the template), how it tokenizes, how deep its
queue is, and what else its status reports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from handler.config import Settings
from handler.deadline import Deadline
from handler.engine.chat_template import ChatTemplate
from handler.engine.lifecycle import EngineState, EngineStatus, Lifecycle
from handler.engine.prompts import render_chat
from handler.engine.residency import ResidencyCache, make_resident
from handler.model_source import Progress, ResolvedModel, resolve_model
from handler.model_source.prefetch import Prefetch


class EngineBase(ABC):
    """The lifecycle half of the engine contract, for engines that hold one `Lifecycle`."""

    thread_name = "coldstart-engine"

    def __init__(
        self,
        settings: Settings,
        resolver: Callable[[Settings, Progress], ResolvedModel] = resolve_model,
        prefetch: Prefetch | None = None,
    ) -> None:
        self.settings = settings
        self.lifecycle = Lifecycle()
        self.prefetch = prefetch  # reading the model ahead since init began, if it is local
        self._resolver = resolver
        self._model: ResolvedModel | None = None
        self._residency = ResidencyCache()
        self._chat_template: ChatTemplate | None = None  # set by the load, if the model has one

    @property
    def state(self) -> EngineState:
        """The lifecycle state."""
        return self.lifecycle.state

    def start(self) -> None:
        """Start loading on a thread of its own (`_run`), once."""
        self.lifecycle.start(self._run, name=self.thread_name)

    def app_built(self) -> None:  # noqa: B027 - a hook; an engine that needs it overrides it
        """The entry point's imports are done (an engine that waits for them overrides this)."""

    def wait_loaded(self, timeout_s: float | None) -> EngineState:
        """Block until the model is loaded or failed, or until `timeout_s`; return the state."""
        return self.lifecycle.wait_loaded(timeout_s)

    def require_loaded(self, deadline: Deadline) -> None:
        """Wait for the model until `deadline` at most; 503 if it is not there."""
        self.lifecycle.require_loaded(deadline, self.start)

    def status(self) -> EngineStatus:
        """Current state and what is known about the model."""
        model = self._model
        return EngineStatus(
            state=self.lifecycle.state,
            reason=self.lifecycle.reason,
            model_id=self.settings.model_id,
            model_path=str(model.path) if model else None,
            model_bytes=model.size_bytes if model else None,
            phases=self.lifecycle.phases,
            queue_depth=self._queue_depth(),
            download=self.lifecycle.download,
            extra={
                **({"resident": self._residency.get(model.path)} if model else {}),
                **({"prefetch": self.prefetch.status()} if self.prefetch else {}),
                **self._status_extra(),
            },
        )

    def make_resident(self) -> int:
        """Read the whole model file into the page cache (finishing the init prefetch)."""
        self.lifecycle.require_usable()
        assert self._model is not None
        resident = make_resident(self._model.path, self.prefetch, self.settings)
        self._residency.refresh(self._model.path)
        return resident

    # ----------------------------------------------------------------- prompts

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], tuple[str, ...]]:
        """Render messages with the model's chat template; return (tokens, extra stop strings)."""
        self.lifecycle.require_usable()
        return render_chat(self._chat_template, messages, self.tokenize, tools)

    @property
    def template_takes_tools(self) -> bool:
        """Whether the model's chat template renders a `tools` list itself."""
        return self._chat_template is not None and self._chat_template.takes_tools

    @abstractmethod
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokens of `text`, by the model's vocabulary."""

    # ----------------------------------------------------------------- per engine

    @abstractmethod
    def _run(self) -> None:
        """The loading thread: resolve, load, `lifecycle.ready()`, then whatever the engine does."""

    def _queue_depth(self) -> int:
        """Requests waiting for the engine."""
        return 0

    def _status_extra(self) -> dict[str, Any]:
        """More for the status, per engine."""
        return {}
