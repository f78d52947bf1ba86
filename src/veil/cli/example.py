"""`veil example`: a real model and real rows to try Veil with, trained here on data that ships
with scikit-learn (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import click

EXAMPLES = ("breast-cancer", "digits")


@click.command("example")
@click.argument("name", type=click.Choice(EXAMPLES), default="breast-cancer")
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("model.onnx"),
    show_default=True,
    help="Where to write the ONNX model.",
)
@click.option(
    "--rows",
    "rows_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("rows.csv"),
    show_default=True,
    help="Where to write test rows (CSV with a header).",
)
@click.option("--count", default=5, show_default=True, type=click.IntRange(1, 500), help="How many rows.")
def example(name: str, model_path: Path, rows_path: Path, count: int) -> None:
    """Train the NAME example (scikit-learn → ONNX, input `input`, float32) and write it with a
    few held-out rows, ready for `veil owner publish` and `veil user infer --input`."""
    import numpy as np

    from veil.demo_models import train_demo_models

    with click.progressbar(length=1, label=f"training {name}", file=click.get_text_stream("stderr")) as bar:
        model = next(m for m in train_demo_models() if m.model_id.startswith(name))
        bar.update(1)
    model_path.write_bytes(model.onnx)
    rows = model.x_test[:count]
    header = ",".join(f"f{i}" for i in range(rows.shape[1]))
    np.savetxt(rows_path, rows, delimiter=",", header=header, comments="", fmt="%.7g")
    click.echo(f"{model_path}: {model.description} ({len(model.onnx)} bytes); {rows_path}: {count} rows")
