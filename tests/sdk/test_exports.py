"""The public surface is explicit: `corral.__all__` is the SDK's `__all__`, every module declares
`__all__`, every public name is documented, and the SDK needs none of the server's packages."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import corral
import corral.sdk
from tests.sdk._helpers import ROOT


def test_corral_all_is_the_public_sdk() -> None:
    assert set(corral.__all__) == {"__version__", *corral.sdk.__all__}
    for name in corral.sdk.__all__:
        assert getattr(corral, name) is getattr(corral.sdk, name)
    public = {
        name
        for name, value in vars(corral.sdk).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(corral.sdk.__all__)


def test_every_sdk_module_declares_all() -> None:
    for module_info in pkgutil.walk_packages(corral.sdk.__path__, "corral.sdk."):
        module = importlib.import_module(module_info.name)
        assert module.__doc__, module_info.name
        assert isinstance(getattr(module, "__all__", None), list), f"{module_info.name} has no __all__"
        for name in module.__all__:
            assert hasattr(module, name), f"{module_info.name}.__all__ names a missing {name}"


def _documented(owner: str, value: object) -> list[str]:
    missing = [] if inspect.getdoc(value) else [owner]
    if inspect.isclass(value) and not issubclass(value, dict):
        for name, member in vars(value).items():
            if name.startswith("_") or isinstance(member, (int, str)):
                continue
            target = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            documented = target if not hasattr(member, "on_instance") else member.on_instance
            is_api = callable(target) or isinstance(member, property) or hasattr(member, "on_instance")
            if is_api and not inspect.getdoc(documented):
                missing.append(f"{owner}.{name}")
    return missing


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for name in corral.sdk.__all__:
        value = getattr(corral.sdk, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            missing += _documented(name, value)
    assert missing == []


def test_sdk_and_cli_need_only_the_base_install() -> None:
    """Import the SDK and the CLI with the server's packages made unimportable."""
    # (pydantic is not blocked: typer itself depends on it.)
    code = """
import sys
BLOCKED = {"starlette", "uvicorn", "sqlalchemy", "alembic", "connectrpc", "protobuf", "dnslib", "multipart", "python_multipart"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is a server dependency")
        return None
sys.meta_path.insert(0, Block())
import corral
from corral import Sandbox, AsyncSandbox, CommandExitException, SandboxException
import corral.cli.main
from typer.testing import CliRunner
result = CliRunner().invoke(corral.cli.main.app, ["sandbox", "--help"])
assert result.exit_code == 0, result.output
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith(("corral.server", "corral.node"))]
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr
