"""The table catalogue: every warehouse table the ML layer writes, declared once by its owner.

A table's owner is the one module that writes it. It declares the table here
with `declare(...)` (name, grain, columns with their SQL types) next to the code
that fills it, and offers small typed read
functions for everybody else, so no other module spells the table's name or
columns in SQL of its own. Creating a table from its declaration (never from
the first frame written) gives every column an explicit type, even one that
is NULL in every row of the first run.

Like Evidently's `StatTest`, the family is a record plus a registry: the
declarations accumulate in `catalog()` as the owners are imported, and a
duplicate name is an error, so two modules can never both claim a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ml.warehouse.sql import quote


class CatalogError(RuntimeError):
    """A table was declared twice, or a declaration is inconsistent."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str = ""


@dataclass(frozen=True)
class TableSpec:
    """One warehouse table: who writes it, at what grain, with which typed columns.

    `contract_columns` marks tables whose leading columns are the dataset's key
    and as_of columns, named by the feature contract rather than fixed here
    (e.g. `churn_scores`); such a table is created from its first frame, and
    `columns` lists only the fixed part.
    """

    name: str
    owner: str
    grain: str
    description: str
    columns: tuple[Column, ...] = ()
    contract_columns: bool = False
    primary_key: tuple[str, ...] = field(default=())

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def column_types(self) -> dict[str, str]:
        return {c.name: c.type for c in self.columns}

    def ddl(self) -> str:
        """`create table if not exists` with every column's type (fixed-column tables only)."""
        if self.contract_columns or not self.columns:
            raise CatalogError(f"table {self.name!r} takes its columns from the contract; create it from a frame")
        body = [f"{quote(c.name)} {c.type}" for c in self.columns]
        if self.primary_key:
            body.append(f"primary key ({', '.join(quote(c) for c in self.primary_key)})")
        return f"create table if not exists {quote(self.name)} ({', '.join(body)})"


_CATALOG: dict[str, TableSpec] = {}


def declare(
    name: str,
    owner: str,
    grain: str,
    description: str,
    columns: list[tuple[str, str]] | list[tuple[str, str, str]] = (),
    contract_columns: bool = False,
    primary_key: tuple[str, ...] = (),
) -> TableSpec:
    """Register table `name` as written by module `owner`; returns its spec."""
    spec = TableSpec(
        name=name,
        owner=owner,
        grain=grain,
        description=description,
        columns=tuple(Column(*c) for c in columns),
        contract_columns=contract_columns,
        primary_key=tuple(primary_key),
    )
    existing = _CATALOG.get(name)
    if existing is not None and existing.owner != owner:
        raise CatalogError(f"table {name!r} is declared by {existing.owner} and again by {owner}")
    _CATALOG[name] = spec
    return spec


def catalog() -> dict[str, TableSpec]:
    """Every table declared so far (the owners that have been imported), by name."""
    return dict(_CATALOG)


def spec(name: str) -> TableSpec:
    try:
        return _CATALOG[name]
    except KeyError:
        raise CatalogError(f"table {name!r} is not declared in the catalogue") from None
