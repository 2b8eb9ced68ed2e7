"""The warehouse access layer: the one way the ML layer reaches the warehouse.

Connections and transactions (`connect`, `Session`), identifier quoting
(`quote`), the table catalogue (`declare`, `catalog`), JSON conversion of
stored values (`json_value`, `to_json`), atomic file replacement
(`replace_folder`) and the one-run-at-a-time lock (`RunLock`) each have one
implementation here, and every stage uses it.
This package imports nothing of the stages above it.
"""

from ml.warehouse.catalog import CatalogError, Column, TableSpec, catalog, declare, spec
from ml.warehouse.connection import (
    MEMORY,
    DatabaseBusyError,
    EngineError,
    Reader,
    Session,
    WarehouseError,
    connect,
)
from ml.warehouse.files import fsync, partition_folders, replace_folder, staging_path
from ml.warehouse.runlock import LockHolder, RunLock, RunLockedError, dead_run_message
from ml.warehouse.sql import column_list, double_literal, is_numeric_type, quote, quote_literal
from ml.warehouse.values import finite_or_none, float_or_none, is_missing, json_value, to_json

__all__ = [
    "MEMORY", "CatalogError", "Column", "DatabaseBusyError", "EngineError", "LockHolder", "Reader", "RunLock",
    "RunLockedError", "Session", "TableSpec", "WarehouseError",
    "catalog", "column_list", "connect", "dead_run_message", "declare", "double_literal", "finite_or_none",
    "float_or_none", "fsync", "is_missing",
    "is_numeric_type", "json_value", "partition_folders", "quote", "quote_literal", "replace_folder", "spec",
    "staging_path", "to_json",
]

