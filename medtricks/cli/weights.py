"""`medtricks weights list|verify|path|fetch`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from medtricks.cli.common import (
    console,
    fail,
    weights_app,
)
from medtricks.errors import MedtricksError


@weights_app.command("list")
def weights_list() -> None:
    """List the known pretrained weights, their files, sha256 and whether they are available offline.

    Example: medtricks weights list
    """
    from medtricks.models.weights import REGISTRY, WeightsError, cache_dir, weights_path

    for spec in REGISTRY.values():
        try:
            available = "available" if weights_path(spec, download=False).is_file() else "not cached (downloaded " \
                "on first use; offline: see `medtricks weights path`)"
        except WeightsError:
            available = "package missing"
        console.print(Text(f"{spec.arch}:{spec.name}", style="bold"), f" {available}\n    {spec.description}\n    file "
                      f"{spec.filename}  sha256 {spec.sha256}", highlight=False)
    console.print(f"cache folder: {cache_dir()} (set MEDTRICKS_CACHE to move it; MEDTRICKS_OFFLINE=1 never downloads)")


@weights_app.command("verify")
def weights_verify(file: Annotated[Path, typer.Argument(help="A .pth, .pth.tar or .safetensors file.")]) -> None:
    """Check a weights file: sha256 against the registry, safe loading, and that its keys fit the architecture.

    Example: medtricks weights verify ~/Downloads/resnet50-0676ba61.pth
    """
    from medtricks.models.backbones import archs_fitting
    from medtricks.models.weights import find_by_file, sha256_of

    try:
        if not file.is_file():
            raise MedtricksError(f"{file}: {'a folder' if file.is_dir() else 'no such file'}; give a weights file "
                                 f"(.pth, .pth.tar or .safetensors).")
        spec = find_by_file(file)
        digest = sha256_of(file)
        fits = archs_fitting(file)
    except MedtricksError as exc:
        fail(exc)
    known = f"{spec.arch} '{spec.name}' ({spec.description})" if spec else "not in the registry"
    console.print(f"{file}: sha256 {digest}; {known}; loads safely; keys fit: {', '.join(fits) or 'no known arch'}",
                  highlight=False)
    if not fits:
        raise typer.Exit(2)


@weights_app.command("path")
def weights_path_cmd(name: Annotated[str, typer.Argument(help="ARCH:WEIGHTS, e.g. resnet50:sin_in.")]) -> None:
    """Print where the file for ARCH:WEIGHTS is expected, so it can be copied there on an offline machine.

    Example: medtricks weights path resnet50:imagenet
    """
    from medtricks.models.weights import find_by_name, weights_path

    try:
        spec = find_by_name(name)
        console.print(f"{weights_path(spec, download=False)}\n  from {spec.url}\n  sha256 {spec.sha256}",
                      highlight=False)
    except MedtricksError as exc:
        fail(exc)


@weights_app.command("fetch")
def weights_fetch(name: Annotated[str, typer.Argument(help="ARCH:WEIGHTS, e.g. resnet50:imagenet.")]) -> None:
    """Download (if needed) and verify the file for ARCH:WEIGHTS into the cache, e.g. before going offline.

    Example: medtricks weights fetch resnet50:sin_in
    """
    from medtricks.models.weights import find_by_name, verify, weights_path

    try:
        spec = find_by_name(name)
        path = weights_path(spec)
        digest = verify(path, spec)
    except MedtricksError as exc:
        fail(exc)
    console.print(f"{path}  sha256 {digest}", highlight=False)
