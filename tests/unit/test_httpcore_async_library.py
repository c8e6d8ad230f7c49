"""httpcore (under httpx, the services' client of each other) asks which async library runs
on every lock, semaphore and shielded close: `import sniffio` each time. Without sniffio
installed that import fails, and a failed import is not remembered, so every call searched
sys.path on disk: 6-8 % of the gateway's CPU in a study-link launch (docs/performance.md,
"Study-link launch"). With sniffio a dependency, the import is a dict look-up."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

from httpcore._synchronization import current_async_library


class Searches(MetaPathFinder):
    """Notes every module the import system goes looking for; finds none itself."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        self.names.append(fullname)
        return None


async def test_httpcore_knows_its_async_library_without_searching_for_a_module() -> None:
    assert current_async_library() == "asyncio"
    searches = Searches()
    sys.meta_path.insert(0, searches)
    try:
        for _ in range(3):
            assert current_async_library() == "asyncio"
    finally:
        sys.meta_path.remove(searches)
    assert searches.names == []
