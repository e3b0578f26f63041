"""`corral template ...`: build templates, list and delete them, and manage their tags.

    corral template build ./Dockerfile --name my-app:v1     # files: the Dockerfile's directory
    corral template build ./template.py --name my-app       # the module's `template` variable
    corral template list
    corral template tags assign my-app:v1 production        # point `production` at v1's build
    corral template tags list my-app
    corral template tags remove my-app production
    corral template delete my-app

A Python template file is run as a module named `__corral_template__` (so its
`if __name__ == "__main__":` block does not run), with its directory first on `sys.path`, and
must define the template as a module-level variable `template`:

    from corral import Template, wait_for_port
    template = Template().from_template("base").copy("app/", "app/").run_cmd("make -C app")

(`--object NAME` picks another variable.) Its COPY sources are relative to the file's directory.
A Dockerfile's are relative to `--context` (default: the Dockerfile's directory).

`build` shows the build's log as it happens and a progress row per step (base, each step,
finalize; cached steps say so). A failed build ends with one line naming the failing step and a
non-zero exit, like every other error. Connection settings as for `corral sandbox`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import runpy
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Self, cast

import typer
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from corral.cli._output import errors_as_messages, fail, out, print_json
from corral.sdk import (
    BuildException,
    ConnectionOptions,
    LogEntry,
    LogEntryEnd,
    LogEntryStart,
    Template,
    TemplateBase,
    TemplateBuilder,
    TemplateFinal,
    TemplateInfo,
    TemplateTag,
)

__all__ = ["app", "load_template"]

app = typer.Typer(help="Build templates and manage them and their tags.", no_args_is_help=True)
tags_app = typer.Typer(help="List, assign and remove the tags of a template.", no_args_is_help=True)
app.add_typer(tags_app, name="tags")

TemplateLike = TemplateBase | TemplateBuilder | TemplateFinal


@app.callback()
def _connection(
    ctx: typer.Context,
    api_url: Annotated[
        str | None,
        typer.Option(help="API URL (env CORRAL_API_URL or E2B_API_URL; default http://127.0.0.1:3000)"),
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (env CORRAL_API_KEY or E2B_API_KEY)")] = None,
) -> None:
    options: ConnectionOptions = {}
    if api_url:
        options["api_url"] = api_url
    if api_key:
        options["api_key"] = api_key
    ctx.obj = options


def _options(ctx: typer.Context) -> ConnectionOptions:
    """The group's `--api-url`/`--api-key` (click hands `obj` down to every subcommand)."""
    return cast(ConnectionOptions, dict(ctx.obj or {}))


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("[", r"\[")


# -- loading a template -----------------------------------------------------------------------------


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(directory))


def load_template(
    source: Path, *, object_name: str = "template", context: Path | None = None
) -> TemplateLike:
    """The template a Dockerfile or a Python file describes (see the module docstring)."""
    if not source.is_file():
        fail(f"{source} is not a file (give a Dockerfile or a Python file defining `template`)", code=2)
    if source.suffix != ".py":
        if context is not None and not context.is_dir():
            fail(f"--context {context} is not a directory", code=2)
        with errors_as_messages():
            return Template(file_context_path=context or source.resolve().parent).from_dockerfile(source)
    if context is not None:
        fail("--context is for Dockerfiles; a Python template sets Template(file_context_path=...)", code=2)
    path = source.resolve()
    try:
        with _on_sys_path(path.parent):
            namespace = runpy.run_path(str(path), run_name="__corral_template__")
    except SystemExit as exc:
        fail(f"{source} exited while loading (exit code {exc.code})")
    except Exception as exc:  # noqa: BLE001 - the file is the user's code: report whatever it raised
        fail(_one_line(f"cannot load {source}: {type(exc).__name__}: {exc}"))
    if object_name not in namespace:
        fail(
            f"{source} defines no module-level `{object_name}`; "
            f"set `{object_name} = Template().from_template(...)...` (or pass --object NAME)"
        )
    value = namespace[object_name]
    if not isinstance(value, TemplateBase | TemplateBuilder | TemplateFinal):
        kind = type(value)
        hint = "; import Template from corral, not e2b" if kind.__module__.split(".")[0] == "e2b" else ""
        fail(f"`{object_name}` in {source} is a {kind.__module__}.{kind.__qualname__}, not a Template{hint}")
    return value


# -- the live build view ----------------------------------------------------------------------------

_LEVEL_STYLE = {"error": "red", "warn": "yellow", "info": "", "debug": "dim"}


class _MarkColumn(SpinnerColumn):
    """A spinner while a step runs, then its mark (✓ / ✗); nothing for steps not reached."""

    def render(self, task: Task) -> RenderableType:
        mark = task.fields.get("mark")
        if mark:
            return Text.from_markup(mark)
        return super().render(task) if task.started and not task.finished else Text(" ")


class BuildView:
    """The build as it happens: its log lines, and below them one progress row per step."""

    def __init__(self, console: Console, template: TemplateLike) -> None:
        plan = template.to_plan()
        total = len(plan.steps)
        rows = [("0", f"base      {plan.base.describe()}")]
        rows += [
            (str(i), f"step {i}/{total}  {_short(step.describe())}") for i, step in enumerate(plan.steps, 1)
        ]
        rows.append(
            ("finalize", "finalize  " + ("start and ready commands" if plan.start_cmd else "defaults"))
        )
        self._console = console
        self._progress = Progress(
            _MarkColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._order = [name for name, _ in rows]
        self._tasks: dict[str, TaskID] = {
            name: self._progress.add_task(text, total=1, start=False, state="", mark="")
            for name, text in rows
        }
        self._current = -1

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def _finish_through(self, index: int) -> None:
        """Every step before `index` is over: those still running or not reached become done."""
        for name in self._order[: max(0, index)]:
            task = self._progress.tasks[self._tasks[name]]
            if not task.finished:
                if not task.started:
                    self._progress.start_task(task.id)
                self._progress.update(task.id, total=1, completed=1, state="[green]done", mark="[green]✓")
                self._progress.stop_task(task.id)

    def on_log(self, entry: LogEntry) -> None:
        """One log entry: printed above the rows; it moves the rows along by its step."""
        if isinstance(entry, LogEntryStart | LogEntryEnd):
            return
        style = _LEVEL_STYLE.get(entry.level, "")
        self._progress.console.print(Text(entry.message, style=style), soft_wrap=True, highlight=False)
        if entry.step is None or entry.step not in self._tasks:
            return
        index = self._order.index(entry.step)
        if index > self._current:
            self._finish_through(index)
            self._current = index
            task_id = self._tasks[entry.step]
            self._progress.start_task(task_id)
            self._progress.update(task_id, total=None, state="[cyan]building")
        if entry.message.startswith("CACHED"):
            task_id = self._tasks[entry.step]
            self._progress.update(task_id, total=1, completed=1, state="[blue]cached", mark="[green]✓")
            self._progress.stop_task(task_id)

    def succeeded(self) -> None:
        """Every row is done."""
        self._finish_through(len(self._order))

    def failed(self, step: str | None) -> None:
        """The row of `step` failed; the rows before it are done."""
        if step is None or step not in self._tasks:
            return
        index = self._order.index(step)
        self._finish_through(index)
        task_id = self._tasks[step]
        if not self._progress.tasks[task_id].started:
            self._progress.start_task(task_id)
        self._progress.update(task_id, total=1, completed=0, state="[red]failed", mark="[red]✗")
        self._progress.stop_task(task_id)


def _short(text: str, limit: int = 60) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit and "\n" not in text.strip() else line[: limit - 1] + "…"


# -- commands ---------------------------------------------------------------------------------------


@app.command()
def build(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="A Dockerfile, or a Python file defining `template`")],
    name: Annotated[str, typer.Option("--name", "-n", help="Template name: NAME or NAME:TAG")],
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Another tag, repeatable")] = None,
    cpu_count: Annotated[int, typer.Option("--cpu", help="CPUs of its sandboxes", min=1)] = 2,
    memory_mb: Annotated[
        int, typer.Option("--memory", help="Memory of its sandboxes in MiB", min=128)
    ] = 1024,
    context: Annotated[
        Path | None, typer.Option(help="Directory COPY sources of a Dockerfile are relative to")
    ] = None,
    object_name: Annotated[
        str, typer.Option("--object", help="The variable of a Python file that holds the template")
    ] = "template",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Build every step again")] = False,
    runtime: Annotated[
        str | None,
        typer.Option(help="OCI runtime of its sandboxes: crun, runc or runsc (gVisor) [default: the server's]"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="No live output; print the build as JSON")] = False,
) -> None:
    """Build a template from a Dockerfile or a Python file, showing its log and steps live."""
    template = load_template(source, object_name=object_name, context=context)
    options = _options(ctx)
    build_tags = list(tag or ()) or None
    if as_json:
        with errors_as_messages():
            info = Template.build(
                template,
                name,
                tags=build_tags,
                cpu_count=cpu_count,
                memory_mb=memory_mb,
                skip_cache=no_cache,
                runtime=runtime,
                **options,
            )
        print_json(info)
        return
    console = out()
    failure: BuildException | None = None
    with errors_as_messages():  # other SDK errors and Ctrl-C: one line, once the view is closed
        view = BuildView(console, template)
        with view:
            try:
                info = Template.build(
                    template,
                    name,
                    tags=build_tags,
                    cpu_count=cpu_count,
                    memory_mb=memory_mb,
                    skip_cache=no_cache,
                    on_build_logs=view.on_log,
                    runtime=runtime,
                    **options,
                )
            except BuildException as exc:
                view.failed(exc.step)
                failure = exc
            else:
                view.succeeded()
    if failure is not None:
        fail(_one_line(f"building {name} failed: {failure}"))
    tags = f" (tags: {', '.join(info.tags)})" if info.tags else ""
    console.print(
        f"Built template [bold]{info.name}[/bold]{tags}: template id {info.template_id}, build {info.build_id}"
    )


def _when(value: dt.datetime) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _templates_table(templates: Sequence[TemplateInfo]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "TEMPLATE ID", "BUILD ID", "CPUS", "MEMORY", "UPDATED"):
        table.add_column(column, no_wrap=True)
    for info in templates:
        table.add_row(
            ", ".join(info.names) or "-",
            info.template_id,
            info.build_id,
            str(info.cpu_count),
            f"{info.memory_mb} MiB",
            _when(info.updated_at),
        )
    return table


def _tags_table(tags: Sequence[TemplateTag]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("TAG", "BUILD ID", "CREATED"):
        table.add_column(column, no_wrap=True)
    for item in tags:
        table.add_row(item.tag, item.build_id, _when(item.created_at))
    return table


@app.command("list")
def list_(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False
) -> None:
    """List your team's templates (not the server's own, like `base`)."""
    with errors_as_messages():
        templates = Template.list(**_options(ctx))
    if as_json:
        print_json(templates)
    elif not templates:
        out().print("No templates yet; build one with `corral template build`.")
    else:
        out().print(_templates_table(sorted(templates, key=lambda t: t.names[0] if t.names else "")))


@app.command()
def delete(ctx: typer.Context, template: Annotated[str, typer.Argument(help="Template name or id")]) -> None:
    """Delete a template with all its tags (sandboxes already running from it keep running)."""
    with errors_as_messages():
        deleted = Template.delete(template, **_options(ctx))
    if not deleted:
        fail(f"there is no template {template!r} of your team")
    out().print(f"Deleted template {template}")


@tags_app.command("list")
def tags_list(
    ctx: typer.Context,
    template: Annotated[str, typer.Argument(help="Template name or id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List a template's tags and the builds they point to."""
    with errors_as_messages():
        tags = Template.get_tags(template, **_options(ctx))
    if as_json:
        print_json(tags)
    else:
        out().print(_tags_table(tags))


@tags_app.command("assign")
def tags_assign(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="The build to tag: NAME:TAG (or NAME for its default tag)")],
    tags: Annotated[list[str], typer.Argument(help="Tags to point at it")],
) -> None:
    """Point tags at the build another tag names (`assign my-app:v2 production`)."""
    with errors_as_messages():
        info = Template.assign_tags(target, tags, **_options(ctx))
    out().print(f"Tagged build {info.build_id} of {target} as {', '.join(info.tags)}")


@tags_app.command("remove")
def tags_remove(
    ctx: typer.Context,
    template: Annotated[str, typer.Argument(help="Template name")],
    tags: Annotated[list[str], typer.Argument(help="Tags to remove")],
) -> None:
    """Remove tags from a template."""
    with errors_as_messages():
        Template.remove_tags(template, tags, **_options(ctx))
    out().print(f"Removed {', '.join(tags)} from {template}")
