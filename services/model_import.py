"""`tensoryard models import`: a GGUF file becomes a safetensors folder, then a registry version."""

from __future__ import annotations

from pathlib import Path

import grpc
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.registry.client import register_folder
from services.worker.models.gguf_import import import_gguf


def convert_gguf(gguf_path: Path, out_dir: Path, show_progress: bool = True) -> Path:
    """Convert once: an existing folder (renamed into place only when complete) is reused."""
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not show_progress:
        return import_gguf(gguf_path, out_dir)
    columns = (TextColumn("  importing {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("tensors"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(gguf_path.name, total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return import_gguf(gguf_path, out_dir, progress=report)


def import_and_register(
    channel: grpc.Channel, name: str, gguf_path: Path, work_dir: Path, config: dict | None = None,
    description: str = "", show_progress: bool = True,
):
    folder = convert_gguf(gguf_path, work_dir / name, show_progress)
    return register_folder(channel, name, "generation", folder, config or {}, description)
