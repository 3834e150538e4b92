"""The archive's output tables: Parquet schemas with dtypes and units, and atomic writing.

``DIR/particles.parquet`` is a Hive-partitioned Parquet data set, one folder per batch
(``batch=<name>/part-0.parquet``, the name URI-encoded). Its columns are :data:`PARTICLE_SCHEMA`
(every column of ``particles.csv``, units from :data:`qcloop.measure.PARTICLE_COLUMNS`, also
stored in each Parquet field's metadata under ``unit`` and ``description``) plus the partition
column ``batch``. ``pandas.read_parquet(DIR / "particles.parquet")`` reads it back with the
dtypes of :func:`column_table`; ``batch`` comes back as a ``category`` -- of strings, unless
every batch name of the archive looks like a number, in which case pyarrow's partition-type
inference makes them integers: :func:`read_particles` always keeps them strings.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import pandas as pd

#: columns ``qcloop batch`` adds to the measurement columns
CLASS_COLUMNS = {
    "class": "shape class from the classifier ('particle' without one, 'unknown' below pipeline.unknown_below)",
    "class_probability": "the classifier's probability of the best class (empty without a classifier)",
}
BATCH_DOC = "batch of the image (batch.key rules: regex on the file name or first sub-folder)"
_UNIT = re.compile(r"\((px\^2|nm\^2|px|nm)\b")
_ARROW = {"str": "string", "bool": "bool", "int64": "int64", "float64": "float64"}


def _dtype(column: str) -> str:
    from qcloop.measure import _dtype as measure_dtype

    if column == "class":
        return "str"
    if column == "class_probability":
        return "float64"
    dt = measure_dtype(column)
    return "str" if dt == "object" else dt


def _unit(description: str, dtype: str) -> str:
    m = _UNIT.search(description)
    if m:
        return m.group(1)
    if "degrees" in description:
        return "deg"
    return "1" if dtype == "float64" else ""


def column_table() -> pd.DataFrame:
    """One row per column of particles.parquet: ``column``, ``dtype`` (pandas, on read), ``unit``, ``description``.

    ``unit`` is taken from the description in :data:`qcloop.measure.PARTICLE_COLUMNS` (``px``,
    ``px^2``, ``nm``, ``nm^2``, ``deg``); ``1`` marks a dimensionless number, empty a label,
    count or flag.
    """
    from qcloop.measure import PARTICLE_COLUMNS

    rows = []
    for name, doc in {**PARTICLE_COLUMNS, **CLASS_COLUMNS}.items():
        dt = _dtype(name)
        rows.append({"column": name, "dtype": dt, "unit": _unit(doc, dt), "description": doc})
    rows.append({"column": "batch", "dtype": "category", "unit": "", "description": BATCH_DOC})
    return pd.DataFrame(rows)


def particle_schema() -> Any:
    """The pyarrow schema of each part file of particles.parquet (without the partition column)."""
    import pyarrow as pa

    fields = []
    for row in column_table().itertuples():
        if row.column == "batch":
            continue
        meta = {"unit": row.unit, "description": row.description}
        fields.append(pa.field(row.column, _ARROW[row.dtype], metadata=meta))
    return pa.schema(fields)


def particles_table(particles: pd.DataFrame) -> Any:
    """``particles`` (the ``qcloop batch`` table) as a pyarrow table of :func:`particle_schema`."""
    import pyarrow as pa

    schema = particle_schema()
    frame = particles.reindex(columns=schema.names)
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def partition_dir(batch: str) -> str:
    """The Hive folder name of a batch (``batch=<URI-encoded name>``, as pyarrow decodes it)."""
    return "batch=" + quote(batch, safe="")


def batch_dir(batch: str) -> str:
    """A safe folder name for ``DIR/batches/<batch>/`` (URI-encoded; never ``.`` or ``..``)."""
    name = quote(batch, safe=" ,+=@()[]{}")
    return name.replace(".", "%2E") if name in (".", "..") else name


def read_particles(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_parquet`` of particles.parquet with ``batch`` always a category of strings."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    part = ds.partitioning(pa.schema([("batch", pa.string())]), flavor="hive")
    frame = pd.read_parquet(path, partitioning=part, **kwargs)
    frame["batch"] = frame["batch"].astype("category")
    return frame


def batches_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The batches.parquet table: one row per batch (see docs/archive.md for the columns)."""
    frame = pd.DataFrame(list(rows))
    for col in ("n_images", "n_particles", "n_border", "n_failed"):
        if col in frame:
            frame[col] = frame[col].astype("int64")
    if "passed" in frame:
        frame["passed"] = frame["passed"].astype("boolean")
        frame["confident"] = frame["confident"].astype("boolean")
    return frame


#: images.parquet: the archive's own columns, then the images.csv row of ``qcloop analyze``
IMAGE_COLUMNS = {"image": "string", "batch": "string", "path": "string", "sha256": "string",
                 "status": "string", "reason": "string"}
IMAGE_SUMMARY_COLUMNS = {
    "width_px": "Int64", "height_px": "Int64", "analysed_height_px": "Int64", "pixel_size_nm": "float64",
    "pixel_size_source": "string", "n_particles": "Int64", "ecd_nm_mean": "float64", "ecd_nm_sd": "float64",
    "seconds": "float64",
}


def images_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The images.parquet table: one row per image file (a failed one has empty measurements)."""
    dtypes = {**IMAGE_COLUMNS, **IMAGE_SUMMARY_COLUMNS}
    return pd.DataFrame(list(rows), columns=list(dtypes)).astype(dtypes)


class Staging:
    """Output files written under a temporary folder inside DIR, then moved into place.

    Files are replaced with one ``os.replace`` each (atomic); folders by two renames (the old
    one is moved aside first), so a reader sees the old or the new output, and a run killed
    while writing leaves the previous output whole (the next run removes the leftovers).
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out / f".staging-{os.getpid()}"
        for old in self.out.glob(".staging-*"):
            shutil.rmtree(old, ignore_errors=True)
        for old in self.out.glob(".old-*"):
            shutil.rmtree(old, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def commit(self) -> None:
        for item in sorted(self.dir.iterdir()):
            final = self.out / item.name
            if item.is_dir():
                aside = self.out / f".old-{os.getpid()}-{item.name}"
                if final.exists():
                    os.replace(final, aside)
                os.replace(item, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(item, final)
        self.dir.rmdir()
