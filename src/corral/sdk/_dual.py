"""`dual_method`: one public name, two forms, as E2B's SDK has them.

await AsyncSandbox.kill("abc123")      # on the class: by sandbox id, no connect needed
await sandbox.kill()                   # on an instance: this sandbox
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

__all__ = ["dual_method"]


class dual_method:
    """A descriptor binding `on_class` to the class and `on_instance` to an instance."""

    def __init__(
        self, on_class: Callable[..., Any] | classmethod[Any, Any, Any], on_instance: Callable[..., Any]
    ) -> None:
        self.on_class: Callable[..., Any] = (
            on_class.__func__ if isinstance(on_class, classmethod) else on_class
        )
        self.on_instance = on_instance
        self.__doc__ = on_instance.__doc__
        self.__name__ = on_instance.__name__.lstrip("_")

    def __set_name__(self, owner: type, name: str) -> None:
        self.__name__ = name

    def __get__(self, instance: object | None, owner: type | None = None) -> Any:
        if instance is None:
            return types.MethodType(self.on_class, owner)
        return types.MethodType(self.on_instance, instance)
